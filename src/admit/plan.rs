//! Reading a request: who pays, and how many tokens it may cost.

use std::borrow::Cow;

use http::request::Parts;
use http::{Extensions, HeaderMap};

use crate::budget::BudgetKeys;
use crate::config::Config;
use crate::extract::{
    find_pair, header_estimate, header_tenant, BodyEstimate, MissingEstimate, MissingTenant,
    Plan as EstimatePlan,
};
use crate::fair::Priority;
use crate::Error;

/// What the layer makes of a request before anything is reserved.
pub(crate) enum Plan<'a> {
    /// Reserve `tokens` for the tenant, in a priority class.
    Reserve(Cow<'a, str>, u64, Priority),
    /// The estimate comes from the body: read it, then estimate and reserve.
    ReadBody(Cow<'a, str>, BodyEstimate, Priority),
    /// Let the request through without reserving anything.
    Unmetered,
    /// Refuse the request.
    Refuse(Error),
}

/// Reads the tenant and the estimate in place, from the request's headers and
/// extensions, when the layer's sources allow it (headers and extensions, no shared
/// budgets): the request then need not be taken apart into `Parts` and put together
/// again. With two header sources, one walk over a small header map finds both.
/// `None`: a source needs the `Parts`; use [`plan`](Self::plan).
#[inline]
pub(crate) fn plan_in_place<'a>(
    config: &'a Config,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
) -> Option<Plan<'a>> {
    if config
        .options
        .as_deref()
        .is_some_and(|o| !o.budgets.is_empty() || o.priority.is_some())
    {
        return None; // a budget's key or the priority may need the `Parts`
    }
    let (tenant, estimate) = match (config.tenant.header_name(), config.estimator.header_name()) {
        (Some(t), Some(e)) => {
            let (tenant, estimate) = find_pair(headers, t, e);
            (
                header_tenant(tenant, t, config.max_tenant_len),
                Some((estimate, e)),
            )
        }
        _ => (
            config
                .tenant
                .in_place(headers, extensions, config.max_tenant_len)?,
            None,
        ),
    };
    let tenant = match tenant.and_then(|tenant| charge(config, tenant)) {
        Ok(Some(tenant)) => tenant,
        Ok(None) => return Some(Plan::Unmetered),
        Err(error) => return Some(Plan::Refuse(error)),
    };
    let tokens = match estimate {
        Some((found, name)) => header_estimate(found, name),
        None => config.estimator.in_place(headers)?,
    };
    Some(metered(config, tenant, tokens, Priority::Standard))
}

/// Reads the tenant and the estimate from the request's head, whatever the sources.
pub(crate) fn plan<'a>(config: &'a Config, parts: &'a Parts) -> Plan<'a> {
    let tenant = config.tenant.extract(parts, config.max_tenant_len);
    let tenant = match tenant.and_then(|tenant| charge(config, tenant)) {
        Ok(Some(tenant)) => tenant,
        Ok(None) => return Plan::Unmetered,
        Err(error) => return Plan::Refuse(error),
    };
    let source = config.options.as_ref().and_then(|o| o.priority.as_ref());
    let class = match source.map(|source| source.read(&parts.headers, &parts.extensions)) {
        None => Priority::Standard,
        Some(Ok(class)) => class,
        Some(Err(error)) => return Plan::Refuse(error),
    };
    match config.estimator.plan(parts) {
        EstimatePlan::Ready(tokens) => metered(config, tenant, tokens, class),
        EstimatePlan::Body(body) => Plan::ReadBody(tenant, body, class),
    }
}

/// The estimate of a request whose output allowance is a guess (the estimator's
/// default, or one learned from earlier answers) rather than a limit the client set:
/// `tokens`, its output part cut to what the smallest cap it is charged to (the
/// tenant's, a shared budget's under `keys`, a token window's limit) can hold next to
/// its `prompt`.
///
/// So a guess never makes a request unadmittable: at worst it waits for the whole cap.
/// Only what the client sent can be too large (413): its prompt, or an explicit
/// `max_tokens`. A response that produces more than its reservation grows it as it
/// streams, as any other does.
pub(crate) fn fit_guess(
    config: &Config,
    tenant: &str,
    keys: &BudgetKeys,
    prompt: u64,
    tokens: u64,
) -> u64 {
    let cap = config.ledger.cap(tenant);
    let cap = keys.smallest_cap().map_or(cap, |budget| budget.min(cap));
    let windows = config
        .windows
        .iter()
        .filter(|window| window.counts_tokens());
    let windows = windows.map(|window| window.limit(tenant));
    let cap = windows.fold(cap, u64::min);
    tokens.min(cap.max(prompt))
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

/// The plan for `tenant`, given the estimate the request carries, if any.
fn metered<'a>(
    config: &Config,
    tenant: Cow<'a, str>,
    tokens: Result<Option<u64>, Error>,
    class: Priority,
) -> Plan<'a> {
    match (tokens, &config.missing_estimate) {
        (Ok(Some(tokens)), _) | (Ok(None), &MissingEstimate::Default(tokens)) => {
            Plan::Reserve(tenant, tokens, class)
        }
        (Ok(None), MissingEstimate::Unmetered) => Plan::Unmetered,
        (Ok(None), MissingEstimate::Reject) => Plan::Refuse(Error::MissingEstimate),
        (Err(error), _) => Plan::Refuse(error),
    }
}
