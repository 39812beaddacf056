//! The names of the headers the layer sends about the cap.
//!
//! OpenAI's (`x-ratelimit-…-tokens`) go on every refusal over a cap and, with
//! [`openai_ratelimit_headers`](crate::TenantTokenLayer::openai_ratelimit_headers), on
//! admitted responses; the IETF draft's (`RateLimit-Policy`, `RateLimit`) with
//! [`ietf_ratelimit_headers`](crate::TenantTokenLayer::ietf_ratelimit_headers).

use std::time::Duration;

use http::header::{HeaderName, HeaderValue};

/// `x-ratelimit-limit-tokens`: the tenant's cap, as OpenAI names it.
pub const X_RATELIMIT_LIMIT_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-limit-tokens");
/// `x-ratelimit-remaining-tokens`: what was left of the cap when the request was refused.
pub const X_RATELIMIT_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");

/// `x-ratelimit-reset-tokens`: how long until a [window](crate::TokenWindow) is full
/// again, in OpenAI's format (`6m0s`, `1s`, `20ms`).
pub const X_RATELIMIT_RESET_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-reset-tokens");

/// `RateLimit-Policy`: the IETF draft's field naming a quota policy (here, the tenant's
/// in-flight token cap), sent when [`TenantTokenLayer::ietf_ratelimit_headers`](crate::TenantTokenLayer::ietf_ratelimit_headers) is on.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`: the IETF draft's field saying what is left of the quota now.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The name of the one policy the layer reports in the IETF fields.
const POLICY: &str = "in-flight";

/// The `RateLimit-Policy` value for a tenant's cap: the quota `q` in units `qu` of
/// tokens, with no window (`w`): the quota is what may be in flight at once.
pub(crate) fn policy_field(cap: u64) -> HeaderValue {
    let value = format!("\"{POLICY}\";q={cap};qu=\"tokens\"");
    HeaderValue::try_from(value).expect("digits and ASCII")
}

/// The `RateLimit` value: `r` tokens remaining, and `t` seconds until it is worth trying
/// again, when known.
pub(crate) fn limit_field(remaining: u64, reset: Option<u64>) -> HeaderValue {
    let value = match reset {
        Some(seconds) => format!("\"{POLICY}\";r={remaining};t={seconds}"),
        None => format!("\"{POLICY}\";r={remaining}"),
    };
    HeaderValue::try_from(value).expect("digits and ASCII")
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-…`: milliseconds under a second
/// (`20ms`), else hours, minutes and seconds, the seconds rounded up (`1s`, `6m0s`,
/// `2h0m5s`).
pub(crate) fn reset_field(duration: Duration) -> HeaderValue {
    let value = if duration < Duration::from_secs(1) {
        let millis = duration.as_nanos().div_ceil(1_000_000);
        format!("{millis}ms")
    } else {
        let seconds = crate::error::seconds_up(duration);
        let (hours, minutes, seconds) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
        match (hours, minutes) {
            (0, 0) => format!("{seconds}s"),
            (0, _) => format!("{minutes}m{seconds}s"),
            _ => format!("{hours}h{minutes}m{seconds}s"),
        }
    };
    HeaderValue::try_from(value).expect("digits and ASCII")
}
