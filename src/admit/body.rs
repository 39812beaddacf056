//! Admitting a request whose estimate needed its body, once the body is read: the
//! estimate, the budgets it draws from, the output allowance a guess gets, the admission,
//! and what its response is to be read for.

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::HeaderValue;

use super::{admit, Admission};
use crate::budget::BudgetKeys;
use crate::config::Config;
use crate::extract::BodyEstimate;
use crate::fair::Priority;
use crate::reservation::usage::{ask, Learn, Tap};
use crate::step::Step;
use crate::window::Sizing;
use crate::Error;

/// What a request whose body was read becomes.
pub(crate) struct BodyAdmission {
    pub(crate) admission: Admission,
    /// The body to forward: as read, or asking for its stream's usage.
    pub(crate) body: Bytes,
    /// The reader of the response's usage, on a layer that reads usage.
    pub(crate) reader: Option<Tap>,
}

/// Admits a request of `tenant` in `class` whose body was `read` (or failed to be),
/// estimated by `estimate`. `parts` is its head, whose `Content-Length` is made to match
/// a body that asks for its stream's usage.
pub(crate) fn admit_read(
    config: &Arc<Config>,
    tenant: &str,
    class: Priority,
    estimate: &BodyEstimate,
    parts: &mut Parts,
    read: Result<Bytes, Error>,
) -> BodyAdmission {
    let learned = config.learned(tenant);
    let want_model = config.wants_model() || config.ask_usage;
    let estimated = match read {
        Ok(body) => estimate
            .estimate_learning(parts, &body, want_model, &learned)
            .map(|estimated| (body, estimated)),
        Err(error) => Err(error),
    };
    let (body, estimated) = match estimated {
        Ok(read) => read,
        Err(error) => {
            return BodyAdmission {
                admission: Step::Now(Err(error)),
                body: Bytes::new(),
                reader: None,
            }
        }
    };
    let model = estimated.model.as_deref();
    let keys = config.budget_keys(parts, Some(&body), model);
    let tokens = match estimated.unlimited {
        true => fit_guess(config, tenant, &keys, estimated.prompt, estimated.tokens),
        false => estimated.tokens,
    };
    let sizing = Sizing {
        prompt: Some(estimated.prompt),
        model: estimated.model.as_deref().map(Arc::from),
    };
    let admission = admit(config, tenant, tokens, Some(&sizing), keys, class);
    let (body, asked) = match config.ask_usage {
        true => ask_usage(parts, body),
        false => (body, false),
    };
    let reader = config.read_usage.then(|| {
        let (adaptive, calibration) = (config.adaptive.as_ref(), config.calibration.as_ref());
        let prompt = estimated.prompt;
        let learn = Learn::new(adaptive, calibration, tenant, estimated, asked);
        Tap::new(prompt, learn, asked)
    });
    BodyAdmission {
        admission,
        body,
        reader: reader.flatten(),
    }
}

/// The body to forward, and whether it asks for its stream's usage: `body` asking for it
/// when it is a stream that did not say (with its `Content-Length` made to match), else
/// `body`.
#[cold]
fn ask_usage(parts: &mut Parts, body: Bytes) -> (Bytes, bool) {
    let Some(asked) = ask(&body) else {
        return (body, false);
    };
    if parts.headers.contains_key(CONTENT_LENGTH) {
        let length = HeaderValue::from(asked.len());
        parts.headers.insert(CONTENT_LENGTH, length);
    }
    (asked, true)
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
fn fit_guess(config: &Config, tenant: &str, keys: &BudgetKeys, prompt: u64, tokens: u64) -> u64 {
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
