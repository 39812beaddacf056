//! The layer's settings, shared by every service it makes.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::Response;

use crate::budget::BudgetKeys;
use crate::extract::PrioritySource;
use crate::extract::{Estimator, MissingEstimate, MissingTenant, TenantSource};
use crate::fair::Queue;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::retry_after::HoldTimes;
use crate::{Rejection, ShadowMode, SharedBudget, TokenWindow};

pub(crate) type RejectFn = dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync;

/// Everything a layer was configured with. Options few layers use sit in one box,
/// `None` for most layers, so that a plain layer's admission skips them by its shape
/// rather than by a flag kept in step with them.
#[derive(Clone)]
pub(crate) struct Config {
    /// Where reservations are counted.
    pub(crate) ledger: Ledger,
    /// Where the tenant comes from, and what a request without one gets.
    pub(crate) tenant: TenantSource,
    pub(crate) missing_tenant: MissingTenant,
    pub(crate) max_tenant_len: usize,
    /// Where the estimate comes from, and what a request without one gets.
    pub(crate) estimator: Estimator,
    pub(crate) missing_estimate: MissingEstimate,
    /// Whether admitted requests carry a `ReservationHandle`.
    pub(crate) reservation_handle: bool,
    /// Which headers about the cap responses carry.
    pub(crate) limit_headers: LimitHeaders,
    /// Whether response bodies are read for the usage the upstream reports.
    pub(crate) read_usage: bool,
    /// Whether streamed requests are asked for their usage (`ask_stream_usage`).
    pub(crate) ask_usage: bool,
    /// Learned output allowances, for requests without an output limit.
    pub(crate) adaptive: Option<Arc<crate::extract::openai::Adaptive>>,
    /// Prompt estimates calibrated per model.
    pub(crate) calibration: Option<Arc<crate::extract::openai::Calibration>>,
    /// The `Retry-After` of a 429 when it is not derived from hold times.
    pub(crate) retry_after: Duration,
    /// Builds refusal responses instead of the default JSON.
    pub(crate) on_rejection: Option<Arc<RejectFn>>,
    /// Limits over time every request is charged to as well; none for most layers.
    pub(crate) windows: Vec<TokenWindow>,
    /// Shadow mode, shared budgets, waiting, hold times: `None` until one is set.
    pub(crate) options: Option<Box<Options>>,
    /// What the metrics recorder is told (nothing without the `metrics` feature).
    pub(crate) metrics: Arc<Metrics>,
}

/// Which headers about the cap responses carry.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct LimitHeaders {
    /// OpenAI's `x-ratelimit-limit-tokens` / `x-ratelimit-remaining-tokens`.
    pub(crate) openai: bool,
    /// The IETF draft's `RateLimit-Policy` / `RateLimit`.
    pub(crate) ietf: bool,
}

impl LimitHeaders {
    pub(crate) fn any(self) -> bool {
        self.openai || self.ietf
    }
}

impl Config {
    pub(crate) fn new(ledger: Ledger) -> Self {
        Self {
            ledger,
            tenant: TenantSource::header(http::HeaderName::from_static("x-tenant-id")),
            missing_tenant: MissingTenant::default(),
            max_tenant_len: TenantSource::DEFAULT_MAX_LEN,
            estimator: Estimator::header(http::HeaderName::from_static("x-token-estimate")),
            missing_estimate: MissingEstimate::default(),
            reservation_handle: false,
            limit_headers: LimitHeaders::default(),
            read_usage: false,
            ask_usage: false,
            adaptive: None,
            calibration: None,
            retry_after: Duration::from_secs(1),
            on_rejection: None,
            windows: Vec::new(),
            options: None,
            metrics: Arc::default(),
        }
    }

    /// What the estimate of a request by `tenant` uses of what the layer has learned.
    pub(crate) fn learned<'a>(&'a self, tenant: &'a str) -> crate::extract::openai::Learned<'a> {
        let output = self.adaptive.as_deref();
        crate::extract::openai::Learned::new(output, self.calibration.as_deref(), tenant)
    }

    /// The rarely used options, created on first use.
    pub(crate) fn options_mut(&mut self) -> &mut Options {
        self.options.get_or_insert_with(Box::default)
    }

    /// The budget keys a request draws from: none without budgets. `body` is the body the
    /// estimator read, `model` the model it found there.
    #[inline]
    pub(crate) fn budget_keys(
        &self,
        parts: &Parts,
        body: Option<&Bytes>,
        model: Option<&str>,
    ) -> BudgetKeys {
        match self.options.as_deref() {
            Some(options) if !options.budgets.is_empty() => {
                BudgetKeys::find(&options.budgets, parts, body, model)
            }
            _ => BudgetKeys::default(),
        }
    }

    /// Whether a budget is keyed by the model the estimator finds in the body, or a
    /// window prices by it.
    pub(crate) fn wants_model(&self) -> bool {
        let options = self.options.as_deref();
        let budgets = options.is_some_and(|o| o.budgets.iter().any(SharedBudget::by_model));
        budgets || self.windows.iter().any(TokenWindow::wants_model)
    }
}

/// The options few layers use; see [`Config::options`].
#[derive(Clone, Default)]
pub(crate) struct Options {
    pub(crate) shadow: ShadowMode,
    /// Requests admitted in shadow mode that would have been refused, counted across
    /// every service the layer (and its clones) made.
    pub(crate) shadowed: Arc<AtomicU64>,
    /// Caps shared by every tenant that requests draw from too.
    pub(crate) budgets: Vec<SharedBudget>,
    /// Where requests over a cap wait for capacity, when they may.
    pub(crate) queue: Option<Arc<Queue>>,
    /// Hold times and the longest `Retry-After` to derive from them, when switched on.
    pub(crate) hold_times: Option<(Arc<HoldTimes>, Duration)>,
    /// Where a request's priority class comes from; every request is `Standard` without.
    pub(crate) priority: Option<PrioritySource>,
    /// Each tenant's weight in the fair share of a budget; 1 without.
    pub(crate) weight: Option<Arc<WeightFn>>,
}

pub(crate) type WeightFn = dyn Fn(&str) -> u32 + Send + Sync;
