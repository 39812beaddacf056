//! Reading a request's head: who pays, how many tokens it may cost, and in which class.

use std::borrow::Cow;

use crate::config::Config;
use crate::extract::{
    find_pair, header_estimate, header_tenant, BodyEstimate, Estimate, Head, MissingEstimate,
    MissingTenant,
};
use crate::fair::Priority;
use crate::Error;

/// What a request's head says of it.
pub(crate) enum Plan<'a> {
    /// Reserve `tokens` for the tenant, in a priority class.
    Reserve(Cow<'a, str>, u64, Priority),
    /// Anything else, decided already.
    Decided(Decision),
}

/// What becomes of a request that is not reserved for at once; unlike a plan to reserve,
/// it borrows nothing of the request, which can then be taken apart or forwarded.
pub(crate) enum Decision {
    /// Refuse the request.
    Refuse(Error),
    /// Let it through without reserving anything.
    Unmetered,
    /// The estimate needs the body: read it, then admit the tenant's request in its class.
    ReadBody(String, BodyEstimate, Priority),
}

/// Reads the tenant, the estimate and the class from `head`.
///
/// `None` when `head` has no `Parts` and a source hands your function the `Parts`, or the
/// layer has budgets (a budget's key may be a function of them): the request is then
/// taken apart and read again, whole. No function of yours is called before that answer,
/// so none is called twice: the tenant is read first, then the estimate, and only then
/// the class.
///
/// Refusals come in that order too: a missing or invalid tenant, then an invalid class,
/// then an invalid or missing estimate.
#[inline(always)]
pub(crate) fn read_head<'a>(config: &'a Config, head: Head<'a>) -> Option<Plan<'a>> {
    let max_len = config.max_tenant_len;
    // With both in headers, one walk over a small header map finds both.
    let (tenant, found) = match (config.tenant.header_name(), config.estimator.header_name()) {
        (Some(t), Some(e)) => {
            let (tenant, estimate) = find_pair(head.headers, t, e);
            (header_tenant(tenant, t, max_len), Some((estimate, e)))
        }
        _ => (config.tenant.read(head, max_len)?, None),
    };
    let tenant = match tenant.and_then(|tenant| charge(config, tenant)) {
        Ok(Some(tenant)) => tenant,
        Ok(None) => return Some(Plan::Decided(Decision::Unmetered)),
        Err(error) => return Some(refuse(error)),
    };
    let tokens = match found {
        Some((found, name)) => header_estimate(found, name),
        None => match config.estimator.read(head)? {
            Estimate::Ready(tokens) => tokens,
            // The body's budgets are found once it is read: a key may be the model in it.
            Estimate::Body(body) => {
                return Some(match class(config, head) {
                    Ok(class) => {
                        Plan::Decided(Decision::ReadBody(tenant.into_owned(), body, class))
                    }
                    Err(error) => refuse(error),
                })
            }
        },
    };
    let options = config.options.as_deref();
    if options.is_some_and(|options| !options.budgets.is_empty()) && head.parts.is_none() {
        return None; // a budget's key may be a function of the `Parts`
    }
    let class = match class(config, head) {
        Ok(class) => class,
        Err(error) => return Some(refuse(error)),
    };
    Some(match (tokens, &config.missing_estimate) {
        (Ok(Some(tokens)), _) | (Ok(None), &MissingEstimate::Default(tokens)) => {
            Plan::Reserve(tenant, tokens, class)
        }
        (Ok(None), MissingEstimate::Unmetered) => Plan::Decided(Decision::Unmetered),
        (Ok(None), MissingEstimate::Reject) => refuse(Error::MissingEstimate),
        (Err(error), _) => refuse(error),
    })
}

/// The request's priority class: `Standard` unless the layer reads one.
#[inline(always)]
fn class(config: &Config, head: Head<'_>) -> Result<Priority, Error> {
    let source = config.options.as_deref().and_then(|o| o.priority.as_ref());
    match source {
        None => Ok(Priority::Standard),
        Some(source) => source.read(head.headers, head.extensions),
    }
}

fn refuse(error: Error) -> Plan<'static> {
    Plan::Decided(Decision::Refuse(error))
}

/// The tenant to charge, given the one the request names, if any: `None` lets the
/// request through unmetered.
fn charge<'a>(
    config: &'a Config,
    tenant: Option<Cow<'a, str>>,
) -> Result<Option<Cow<'a, str>>, Error> {
    match (tenant, &config.missing_tenant) {
        (Some(tenant), _) => Ok(Some(tenant)),
        (None, MissingTenant::DefaultTenant(id)) => Ok(Some(Cow::Borrowed(id))),
        (None, MissingTenant::Unmetered) => Ok(None),
        (None, MissingTenant::Reject | MissingTenant::Unauthorized) => Err(Error::MissingTenant),
    }
}
