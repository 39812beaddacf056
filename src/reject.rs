//! How a refused request becomes a response.

use std::fmt::{self, Write as _};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::headers::{
    limit_field, policy_field, reset_field, RATELIMIT, RATELIMIT_POLICY, X_RATELIMIT_LIMIT_TOKENS,
    X_RATELIMIT_REMAINING_TOKENS, X_RATELIMIT_RESET_TOKENS,
};
use crate::Error;

/// A request the layer refused, on its way to becoming a response.
///
/// The default response ([`to_response`](Self::to_response)) is OpenAI-shaped JSON, so
/// OpenAI client SDKs raise their usual errors (a 429 becomes their rate-limit error and is
/// retried after `Retry-After`). Replace it with
/// [`TenantTokenLayer::on_rejection`](crate::TenantTokenLayer::on_rejection).
#[derive(Debug, Clone)]
pub struct Rejection {
    error: Error,
    status: StatusCode,
    retry_after: Duration,
    ratelimit_fields: bool,
}

impl Rejection {
    pub(crate) fn new(
        error: Error,
        status: StatusCode,
        retry_after: Duration,
        ratelimit_fields: bool,
    ) -> Self {
        Self {
            error,
            status,
            retry_after,
            ratelimit_fields,
        }
    }

    /// Why the request was refused.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The status the default response carries.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// When to retry, for a request that may fit later (429); `None` when retrying cannot
    /// help. Never under one second: `Retry-After` counts whole seconds and 0 would invite
    /// a tight retry loop.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.error {
            // When the window will hold the request, from its refill rate.
            Error::WindowExceeded(ref refusal) => {
                Some(refusal.retry_after.max(Duration::from_secs(1)))
            }
            Error::TenantOverloaded { .. }
            | Error::BudgetOverloaded { .. }
            | Error::Shed { .. }
            | Error::BackendUnavailable { .. } => {
                Some(self.retry_after.max(Duration::from_secs(1)))
            }
            _ => None,
        }
    }

    /// The default response: the status, `content-type: application/json`, a body
    /// `{"error":{"message","type","param","code"}}`, and for cap refusals
    /// `x-ratelimit-limit-tokens`, `x-ratelimit-remaining-tokens` and (429 only)
    /// `Retry-After` in whole seconds (for a window, also `x-ratelimit-reset-tokens`); with the IETF fields on, `RateLimit-Policy` and
    /// (429 only) `RateLimit` too.
    pub fn to_response(&self) -> Response<Bytes> {
        let error_type = match (self.status, &self.error) {
            (
                _,
                Error::TenantOverloaded { .. }
                | Error::BudgetOverloaded { .. }
                | Error::WindowExceeded(_)
                | Error::Shed { .. },
            ) => "tokens",
            (StatusCode::UNAUTHORIZED, _) => "authentication_error",
            (_, Error::BackendUnavailable { .. }) => "server_error",
            _ => "invalid_request_error",
        };
        let mut body = String::with_capacity(160);
        body.push_str(r#"{"error":{"message":"#);
        push_json_string(&mut body, &self.error.to_string());
        body.push_str(r#","type":"#);
        push_json_string(&mut body, error_type);
        body.push_str(r#","param":null,"code":"#);
        push_json_string(&mut body, self.error.code());
        body.push_str("}}");

        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let retry_after = self.retry_after().map(crate::error::seconds_up);
        match self.error {
            Error::TenantOverloaded { in_flight, cap, .. } => {
                let remaining = cap.saturating_sub(in_flight);
                headers.insert(X_RATELIMIT_LIMIT_TOKENS, cap.into());
                headers.insert(X_RATELIMIT_REMAINING_TOKENS, remaining.into());
                if self.ratelimit_fields {
                    headers.insert(RATELIMIT_POLICY, policy_field(cap));
                    headers.insert(RATELIMIT, limit_field(remaining, retry_after));
                }
            }
            Error::RequestTooLarge { cap, .. } => {
                headers.insert(X_RATELIMIT_LIMIT_TOKENS, cap.into());
                if self.ratelimit_fields {
                    headers.insert(RATELIMIT_POLICY, policy_field(cap));
                }
            }
            // The budget's own figures; the IETF fields describe the tenant's policy only.
            Error::BudgetOverloaded { in_flight, cap, .. } => {
                headers.insert(X_RATELIMIT_LIMIT_TOKENS, cap.into());
                headers.insert(
                    X_RATELIMIT_REMAINING_TOKENS,
                    cap.saturating_sub(in_flight).into(),
                );
            }
            Error::BudgetTooLarge { cap, .. } => {
                headers.insert(X_RATELIMIT_LIMIT_TOKENS, cap.into());
            }
            // The window's figures, as OpenAI sends them for its own limits (a spend
            // window's are not tokens: `Retry-After` alone).
            Error::WindowExceeded(ref refusal) if refusal.counts_tokens() => {
                headers.insert(X_RATELIMIT_LIMIT_TOKENS, refusal.limit.into());
                headers.insert(X_RATELIMIT_REMAINING_TOKENS, refusal.remaining.into());
                headers.insert(X_RATELIMIT_RESET_TOKENS, reset_field(refusal.reset));
            }
            Error::WindowTooLarge(ref refusal) if refusal.counts_tokens() => {
                headers.insert(X_RATELIMIT_LIMIT_TOKENS, refusal.limit.into());
            }
            _ => {}
        }
        if let Some(seconds) = retry_after {
            headers.insert(RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status, self.error)
    }
}

/// Appends `text` as a JSON string literal.
fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
