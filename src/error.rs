//! Why a request was not admitted.

use std::fmt;
use std::time::Duration;

use http::StatusCode;

/// Why a request was refused, by the tracker or by the layer in front of it.
///
/// Each variant maps to one HTTP status ([`status`](Self::status)) and one stable,
/// machine-readable code ([`code`](Self::code)) used in the JSON error body.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The request fits the tenant's cap, but not next to what is in flight now. Retry
    /// later. HTTP 429.
    TenantOverloaded {
        /// The tenant.
        tenant_id: String,
        /// Tokens the request asked for.
        requested: u64,
        /// Tokens the tenant had in flight when it was refused.
        in_flight: u64,
        /// The tenant's cap.
        cap: u64,
    },
    /// The request alone is larger than the tenant's cap: retrying cannot help. HTTP 413.
    RequestTooLarge {
        /// The tenant.
        tenant_id: String,
        /// Tokens the request asked for.
        tokens: u64,
        /// The tenant's cap.
        cap: u64,
    },
    /// The request fits its tenant's cap, but not a shared budget (an upstream's capacity,
    /// a model's) next to what every tenant has in flight there now. Retry later. HTTP 429.
    BudgetOverloaded {
        /// The budget, as its [`SharedBudget`](crate::SharedBudget) keys it.
        budget: String,
        /// Tokens the request asked for.
        requested: u64,
        /// Tokens the budget had in flight when the request was refused.
        in_flight: u64,
        /// The budget's cap.
        cap: u64,
    },
    /// The request alone is larger than a shared budget's cap: retrying cannot help. HTTP
    /// 413.
    BudgetTooLarge {
        /// The budget, as its [`SharedBudget`](crate::SharedBudget) keys it.
        budget: String,
        /// Tokens the request asked for.
        tokens: u64,
        /// The budget's cap.
        cap: u64,
    },
    /// The request fits the tenant's limit over time ([`TokenWindow`](crate::TokenWindow)),
    /// but not what is left of it now. Retry after
    /// [`WindowRefusal::retry_after`]. HTTP 429.
    WindowExceeded(Box<WindowRefusal>),
    /// The request alone is larger than the tenant's limit over time: retrying cannot
    /// help. HTTP 413.
    WindowTooLarge(Box<WindowRefusal>),
    /// A [spend window](crate::TokenWindow::spend) has no price for the request's model,
    /// and no default price. HTTP 400.
    UnpricedModel {
        /// The model the request named ("" for none).
        model: String,
    },
    /// No tenant could be found on the request. HTTP 400, or 401 if so configured.
    MissingTenant,
    /// A tenant id was present but unusable. HTTP 400.
    InvalidTenant {
        /// What is wrong with it.
        reason: String,
    },
    /// No token estimate could be found on the request. HTTP 400.
    MissingEstimate,
    /// A token estimate was present but unusable (not a number, negative, too large for
    /// 64 bits, a malformed `max_tokens`, …). HTTP 400.
    InvalidEstimate {
        /// What is wrong with it.
        reason: String,
    },
    /// The request body is longer than the estimator reads. HTTP 413.
    BodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The request body is not the JSON the estimator expects. HTTP 400.
    MalformedBody {
        /// What is wrong with it.
        reason: String,
    },
    /// The request body could not be read (the client aborted or sent broken framing).
    /// HTTP 400.
    BodyRead {
        /// The error the body returned.
        reason: String,
    },
    /// A `Sheddable` request arrived while requests were waiting for the budget it draws
    /// from: refused at once rather than queued behind them. Retry later. HTTP 429.
    Shed {
        /// The tenant.
        tenant_id: String,
        /// The budget others are waiting for.
        budget: String,
    },
    /// The request's priority class could not be read. HTTP 400.
    InvalidPriority {
        /// What is wrong with it.
        reason: String,
    },
    /// The shared ledger (Redis) could not be asked and the failure policy refuses rather
    /// than admit blind. Retry later. HTTP 503.
    BackendUnavailable {
        /// What went wrong; logged, left out of the message sent to the client.
        reason: String,
    },
}

impl Error {
    /// The HTTP status this error answers with by default.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::TenantOverloaded { .. }
            | Error::BudgetOverloaded { .. }
            | Error::WindowExceeded(_)
            | Error::Shed { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::RequestTooLarge { .. }
            | Error::BudgetTooLarge { .. }
            | Error::WindowTooLarge(_)
            | Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::MissingTenant
            | Error::InvalidTenant { .. }
            | Error::MissingEstimate
            | Error::InvalidEstimate { .. }
            | Error::MalformedBody { .. }
            | Error::InvalidPriority { .. }
            | Error::UnpricedModel { .. }
            | Error::BodyRead { .. } => StatusCode::BAD_REQUEST,
            Error::BackendUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable, machine-readable code for this error (the `code` of the JSON body).
    pub fn code(&self) -> &'static str {
        match self {
            Error::TenantOverloaded { .. } => "rate_limit_exceeded",
            Error::RequestTooLarge { .. } => "request_too_large",
            Error::BudgetOverloaded { .. } => "budget_exceeded",
            Error::BudgetTooLarge { .. } => "request_too_large_for_budget",
            Error::WindowExceeded(_) => "window_exceeded",
            Error::WindowTooLarge(_) => "request_too_large_for_window",
            Error::UnpricedModel { .. } => "unpriced_model",
            Error::MissingTenant => "missing_tenant",
            Error::InvalidTenant { .. } => "invalid_tenant",
            Error::MissingEstimate => "missing_token_estimate",
            Error::InvalidEstimate { .. } => "invalid_token_estimate",
            Error::BodyTooLarge { .. } => "body_too_large",
            Error::MalformedBody { .. } => "invalid_json",
            Error::BodyRead { .. } => "body_read_error",
            Error::Shed { .. } => "shed",
            Error::InvalidPriority { .. } => "invalid_priority",
            Error::BackendUnavailable { .. } => "backend_unavailable",
        }
    }

    /// The shared budget that refused the request, for the budget errors.
    pub fn budget(&self) -> Option<&str> {
        match self {
            Error::BudgetOverloaded { budget, .. }
            | Error::BudgetTooLarge { budget, .. }
            | Error::Shed { budget, .. } => Some(budget),
            _ => None,
        }
    }

    /// The tenant the error concerns, where one is known.
    pub fn tenant_id(&self) -> Option<&str> {
        match self {
            Error::TenantOverloaded { tenant_id, .. }
            | Error::RequestTooLarge { tenant_id, .. }
            | Error::Shed { tenant_id, .. } => Some(tenant_id),
            Error::WindowExceeded(refusal) | Error::WindowTooLarge(refusal) => {
                Some(&refusal.tenant_id)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TenantOverloaded {
                tenant_id,
                requested,
                in_flight,
                cap,
            } => write!(
                f,
                "tenant `{tenant_id}` is over its in-flight token cap: {requested} tokens \
                 requested, {in_flight} of {cap} already in flight"
            ),
            Error::RequestTooLarge {
                tenant_id,
                tokens,
                cap,
            } => write!(
                f,
                "request of {tokens} tokens can never fit tenant `{tenant_id}`'s cap of {cap} \
                 tokens in flight"
            ),
            Error::BudgetOverloaded {
                budget,
                requested,
                in_flight,
                cap,
            } => write!(
                f,
                "budget `{budget}` is over its in-flight token cap: {requested} tokens \
                 requested, {in_flight} of {cap} already in flight"
            ),
            Error::BudgetTooLarge {
                budget,
                tokens,
                cap,
            } => write!(
                f,
                "request of {tokens} tokens can never fit budget `{budget}`'s cap of {cap} \
                 tokens in flight"
            ),
            Error::WindowExceeded(refusal) => {
                let WindowRefusal {
                    tenant_id, window, ..
                } = &**refusal;
                write!(
                    f,
                    "tenant `{tenant_id}` is over its {window} limit of {}: {} requested, {} \
                     left; try again in {}s",
                    Amount(window, refusal.limit),
                    Amount(window, refusal.requested),
                    Amount(window, refusal.remaining),
                    seconds_up(refusal.retry_after)
                )
            }
            Error::WindowTooLarge(refusal) => {
                let WindowRefusal {
                    tenant_id, window, ..
                } = &**refusal;
                write!(
                    f,
                    "request of {} can never fit tenant `{tenant_id}`'s {window} limit of {}",
                    Amount(window, refusal.requested),
                    Amount(window, refusal.limit),
                )
            }
            Error::UnpricedModel { model } if model.is_empty() => {
                f.write_str("the request names no model, and spend is limited by model price")
            }
            Error::UnpricedModel { model } => {
                write!(
                    f,
                    "model `{model}` has no price, and spend is limited by model price"
                )
            }
            Error::MissingTenant => f.write_str("no tenant identified on the request"),
            Error::InvalidTenant { reason } => write!(f, "invalid tenant id: {reason}"),
            Error::MissingEstimate => f.write_str("no token estimate on the request"),
            Error::InvalidEstimate { reason } => write!(f, "invalid token estimate: {reason}"),
            Error::BodyTooLarge { limit } => {
                write!(f, "request body is larger than the {limit} bytes allowed")
            }
            Error::MalformedBody { reason } => write!(f, "malformed JSON body: {reason}"),
            Error::BodyRead { reason } => write!(f, "could not read the request body: {reason}"),
            Error::Shed { tenant_id, budget } => write!(
                f,
                "sheddable request of tenant `{tenant_id}` refused: requests are waiting for \
                 budget `{budget}`"
            ),
            Error::InvalidPriority { reason } => write!(f, "invalid priority: {reason}"),
            // The reason (a Redis error) is for logs, not for the client the message is
            // sent to.
            Error::BackendUnavailable { .. } => {
                f.write_str("token accounting is unavailable; retry later")
            }
        }
    }
}

impl std::error::Error for Error {}

/// How a [window](crate::TokenWindow) refused a request ([`Error::WindowExceeded`],
/// [`Error::WindowTooLarge`]). Amounts are tokens, or for a spend window millionths of
/// its currency unit.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WindowRefusal {
    /// The tenant.
    pub tenant_id: String,
    /// The window, as its [`name`](crate::TokenWindow::name) says (`"tokens per
    /// minute"`).
    pub window: String,
    /// What the request asked for.
    pub requested: u64,
    /// What was left in the window when the request was refused.
    pub remaining: u64,
    /// The tenant's limit in this window.
    pub limit: u64,
    /// How long until the window holds the request, from the rate it refills at (if
    /// nothing else is charged meanwhile); zero for a request that can never fit.
    pub retry_after: Duration,
    /// How long until the window is full again.
    pub reset: Duration,
}

impl WindowRefusal {
    /// Whether the window counts tokens (its figures go in OpenAI's token headers), not
    /// spend.
    pub(crate) fn counts_tokens(&self) -> bool {
        counts_tokens(&self.window)
    }
}

/// Whether the window named `window` counts tokens, not spend.
pub(crate) fn counts_tokens(window: &str) -> bool {
    window.starts_with("tokens ")
}

/// An amount in a window's units: tokens, or millionths of a currency unit written as
/// the amount (`0.015000` for 15,000).
struct Amount<'a>(&'a str, u64);

impl fmt::Display for Amount<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Amount(window, amount) = *self;
        match counts_tokens(window) {
            true => write!(f, "{amount}"),
            false => write!(f, "{}.{:06}", amount / 1_000_000, amount % 1_000_000),
        }
    }
}

/// `duration` in whole seconds, rounded up: when a retry can be sure to fit.
pub(crate) fn seconds_up(duration: Duration) -> u64 {
    duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0))
}
