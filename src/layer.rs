//! The layer: configuration, shared by every service it wraps.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::Response;
use tower_layer::Layer;

use crate::config::Config;
use crate::extract::{Estimator, MissingEstimate, MissingTenant, TenantSource};
use crate::fair::Queue;
use crate::ledger::Ledger;
use crate::{
    Rejection, ShadowMode, SharedBudget, TenantTokenService, TenantTokenTracker, TokenLedger,
};

/// Caps the tokens each tenant has in flight, in front of any HTTP service.
///
/// For each request the layer finds the tenant ([`TenantSource`]) and a token estimate
/// ([`Estimator`]), reserves the estimate against the tenant's cap in the
/// [`TenantTokenTracker`], and holds the reservation until the response body has been
/// sent in full or dropped. A tenant over its cap gets 429 with `Retry-After`; see
/// [`Error`](crate::Error) for every refusal and its status.
///
/// Defaults: tenant from the `x-tenant-id` header, estimate from the `x-token-estimate`
/// header, 400 when either is missing, `Retry-After: 1`.
///
/// The layer is cheap to clone: every clone, and every service it makes, shares one
/// configuration and the one tracker, so one ledger counts every request. Give routes
/// different layers (other estimators, other trackers) for per-route settings.
///
/// ```
/// use std::sync::Arc;
/// use tower_tenant_tokens::{Estimator, OpenAiEstimator, TenantTokenLayer, TenantTokenTracker};
///
/// let tracker = Arc::new(TenantTokenTracker::new(50_000));
/// let layer = TenantTokenLayer::new(tracker)
///     .tenant_header(http::HeaderName::from_static("x-tenant-id"))
///     .estimator(OpenAiEstimator::new());
/// let app = axum::Router::new()
///     .route("/v1/chat/completions", axum::routing::post(|| async { "hi" }))
///     .layer(layer);
/// # let _: axum::Router = app;
/// ```
#[derive(Clone)]
pub struct TenantTokenLayer {
    config: Arc<Config>,
}

impl TenantTokenLayer {
    /// How many requests may wait for capacity per tenant with
    /// [`wait_for_capacity`](Self::wait_for_capacity); the next is refused at once.
    pub const MAX_WAITING_PER_TENANT: usize = 1_000;

    /// A layer counting against `ledger`, with the defaults above: a
    /// [`TenantTokenTracker`] in an `Arc`, or a Redis tracker shared by every replica
    /// (feature `redis`, see [`TokenLedger`](crate::TokenLedger)).
    ///
    /// With Redis, each metered request waits for one round trip before the inner service
    /// is called (none while a replica's headroom holds it). Refusals are the same as in
    /// memory, plus `503` with `Retry-After` when Redis cannot be asked and the tracker's
    /// failure policy is to fail closed.
    pub fn new(ledger: impl Into<TokenLedger>) -> Self {
        Self::with_ledger(ledger.into().0)
    }

    fn with_ledger(ledger: Ledger) -> Self {
        Self {
            config: Arc::new(Config::new(ledger)),
        }
    }

    /// The in-memory tracker this layer counts against; `None` for a layer counting in
    /// Redis.
    pub fn tracker(&self) -> Option<&Arc<TenantTokenTracker>> {
        self.config.ledger.local()
    }

    /// Takes the tenant from header `name` (see [`TenantSource::header`]).
    pub fn tenant_header(self, name: HeaderName) -> Self {
        self.tenant_source(TenantSource::header(name))
    }

    /// Takes the tenant from the [`TenantScope`](crate::TenantScope) your authentication
    /// inserted into the request extensions (see [`TenantSource::extension`]).
    pub fn tenant_from_extension(self) -> Self {
        self.tenant_source(TenantSource::extension())
    }

    /// Takes the tenant from `source`.
    pub fn tenant_source(self, source: TenantSource) -> Self {
        self.with(|config| config.tenant = source)
    }

    /// Takes the estimate from header `name` (see [`Estimator::header`]).
    pub fn estimate_header(self, name: HeaderName) -> Self {
        self.estimator(Estimator::header(name))
    }

    /// Estimates with `estimator`: an [`Estimator`], or anything that converts into one
    /// such as [`OpenAiEstimator`](crate::OpenAiEstimator).
    pub fn estimator(self, estimator: impl Into<Estimator>) -> Self {
        let estimator = estimator.into();
        self.with(|config| config.estimator = estimator)
    }

    /// What to do when a request has no tenant (default: refuse with 400).
    pub fn on_missing_tenant(self, policy: MissingTenant) -> Self {
        self.with(|config| config.missing_tenant = policy)
    }

    /// What to do when a request has no estimate (default: refuse with 400).
    pub fn on_missing_estimate(self, policy: MissingEstimate) -> Self {
        self.with(|config| config.missing_estimate = policy)
    }

    /// The longest tenant id taken from a header, in bytes (default
    /// [`TenantSource::DEFAULT_MAX_LEN`]); longer ids are refused with 400.
    pub fn max_tenant_len(self, bytes: usize) -> Self {
        self.with(|config| config.max_tenant_len = bytes)
    }

    /// The `Retry-After` sent with 429, rounded up to whole seconds, at least 1 (default
    /// 1 s).
    pub fn retry_after(self, retry_after: Duration) -> Self {
        self.with(|config| config.retry_after = retry_after)
    }

    /// Derives the 429's `Retry-After` from what is in flight, up to `max` (default: off,
    /// the fixed [`retry_after`](Self::retry_after) is sent).
    ///
    /// The layer then times every reservation from admission to release and keeps the mean
    /// hold time (exponentially weighted, each new sample counting for 1/8, across
    /// tenants). A refused request is told to come back after that mean times the share of
    /// the tenant's in-flight tokens that must be released before it fits: a request that
    /// needs a sliver of what is in flight retries sooner than one that needs all of it.
    /// Until the first reservation has ended, and for refusals other than 429, the fixed
    /// value is sent. Never under one second (`Retry-After` counts whole seconds).
    ///
    /// The cost: reading the clock twice per request and one shared atomic update at each
    /// release.
    pub fn retry_after_from_in_flight(self, max: Duration) -> Self {
        let times = Arc::default();
        self.with(|config| config.options_mut().hold_times = Some((times, max)))
    }

    /// Builds refusal responses with `f` instead of the default OpenAI-shaped JSON
    /// ([`Rejection::to_response`], which `f` may call and then adjust).
    pub fn on_rejection<F>(self, f: F) -> Self
    where
        F: Fn(&Rejection) -> Response<Bytes> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        self.with(|config| config.on_rejection = Some(f))
    }

    /// Whether admitted requests carry a [`ReservationHandle`](crate::ReservationHandle) in
    /// their extensions (default: no).
    ///
    /// The handle lets a handler reconcile the estimate with real usage: turn it on when a
    /// handler extracts `Extension<ReservationHandle>` (axum answers such a handler with
    /// 500 "Missing request extension" otherwise). It is off by default because it costs
    /// more than the rest of the layer together: a shared slot for the reservation and, in
    /// a request that had none, the extensions map with its table and boxed entry (four
    /// small allocations a request). Admission, release and
    /// every guarantee are the same either way.
    pub fn reservation_handle(self, enabled: bool) -> Self {
        self.with(|config| config.reservation_handle = enabled)
    }

    /// Whether admitted responses carry `x-ratelimit-limit-tokens` (the tenant's cap) and
    /// `x-ratelimit-remaining-tokens` (what is left of it as the response starts, this
    /// request's reservation included), as OpenAI's API sends them (default: no). Headers
    /// the inner service set itself are left alone.
    pub fn openai_ratelimit_headers(self, enabled: bool) -> Self {
        self.with(|config| config.limit_headers.openai = enabled)
    }

    /// Whether responses carry the IETF draft's `RateLimit-Policy` and `RateLimit` fields
    /// (draft-ietf-httpapi-ratelimit-headers; default: no). Headers the inner service set
    /// itself are left alone.
    ///
    /// The policy is named `in-flight`, its quota `q` is the tenant's cap in units
    /// (`qu`) of `"tokens"`, with no window (`w`): what may be in flight at once. Admitted
    /// responses say what is left as they start (`r`, this request included); a 429 says
    /// what is left and when to retry (`t`, as `Retry-After`); a 413 carries the policy
    /// only.
    ///
    /// ```text
    /// RateLimit-Policy: "in-flight";q=4096;qu="tokens"
    /// RateLimit: "in-flight";r=1200
    /// ```
    pub fn ietf_ratelimit_headers(self, enabled: bool) -> Self {
        self.with(|config| config.limit_headers.ietf = enabled)
    }

    /// Makes every request also draw from `budget`, a cap all tenants share (an upstream's
    /// capacity, one per model, …), all or nothing with its tenant's cap; see
    /// [`SharedBudget`]. Call again to add more budgets. A budget counts in this process, or
    /// in Redis for every replica when its ledger is a Redis tracker
    /// ([`TokenLedger`](crate::TokenLedger)).
    pub fn shared_budget(self, budget: SharedBudget) -> Self {
        self.with(|config| config.options_mut().budgets.push(budget))
    }

    /// Charges every request to `window` too, a limit on the tokens each tenant uses over
    /// time (per minute, per day, …), all or nothing with its tenant's cap and the shared
    /// budgets; see [`TokenWindow`](crate::TokenWindow). Call again to add more windows (a
    /// minute's and a day's).
    ///
    /// With windows, OpenAI's `x-ratelimit-…-tokens` headers
    /// ([`openai_ratelimit_headers`](Self::openai_ratelimit_headers)) describe the window
    /// with the least left, as OpenAI's API does, with `x-ratelimit-reset-tokens` (how long
    /// until it is full); the IETF fields keep describing the in-flight cap.
    pub fn window(self, window: crate::TokenWindow) -> Self {
        self.with(|config| config.windows.push(window))
    }

    /// Lets a request over its tenant's cap (or a shared budget) wait up to `max_wait` for
    /// capacity instead of being refused at once (default: refused at once).
    ///
    /// Within a tenant, waiting requests queue first come first served: only the first in
    /// line may reserve, and a new request queues behind any already waiting, so a large
    /// request is not starved by a stream of small ones.
    ///
    /// Across tenants waiting for a [shared budget](Self::shared_budget), the next request
    /// admitted when the budget frees is chosen by [`Priority`](crate::Priority) (a higher
    /// class strictly first), then fairly: each tenant counts the tokens admitted for it
    /// from shared budgets, divided by its [weight](Self::tenant_weight), and the tenant
    /// with the smallest count goes next (a tenant that starts waiting again after an idle
    /// spell starts at the smallest count among those waiting: idle time banks no credit).
    /// So a tenant that asks for little gets its fair share of a saturated upstream next to
    /// one that keeps many requests going. Once it is a request's turn, no other request
    /// takes that budget's capacity: new requests queue behind it, so a large request is not
    /// starved by smaller ones either. A `Sheddable` request that arrives while others wait
    /// for a budget it draws from is refused at once ([`Error::Shed`](crate::Error::Shed)).
    ///
    /// Every release through this layer wakes the waiting requests, whichever tenant
    /// released; they also look again every 50 ms, for capacity that comes back otherwise (a
    /// raised cap, a reservation made outside the layer). When the time is up the request
    /// gets its 429 as usual. A request larger than a cap (413) never waits; at most
    /// [`MAX_WAITING_PER_TENANT`](Self::MAX_WAITING_PER_TENANT) wait per tenant, and the
    /// next is refused at once. A client that goes away while its request waits (the
    /// response future is dropped) leaves the queue and holds nothing.
    ///
    /// For a shared budget counted in Redis, the order is kept in Redis, one for every
    /// replica, and a release on any replica wakes the waiting requests (see the
    /// [budgets guide](crate::guide::budgets#one-fair-order-for-every-replica)). Otherwise
    /// the queue is this process's: a request is woken by this process's releases, and
    /// looks again now and then for capacity other replicas released. Needs tokio's timer
    /// (any `#[tokio::main]` runtime has it).
    pub fn wait_for_capacity(self, max_wait: Duration) -> Self {
        let queue = Arc::new(Queue::new(max_wait, Self::MAX_WAITING_PER_TENANT));
        self.with(|config| config.options_mut().queue = Some(queue))
    }

    /// Reads each request's [`Priority`](crate::Priority) class from header `name`
    /// (`critical`, `standard` or `sheddable`; see
    /// [`PrioritySource::header`](crate::PrioritySource::header)). Without a priority
    /// source every request is `Standard`. Classes order waiting requests: see
    /// [`wait_for_capacity`](Self::wait_for_capacity).
    pub fn priority_header(self, name: HeaderName) -> Self {
        self.priority_source(crate::PrioritySource::header(name))
    }

    /// Reads each request's [`Priority`](crate::Priority) class from `source`.
    pub fn priority_source(self, source: crate::PrioritySource) -> Self {
        self.with(|config| config.options_mut().priority = Some(source))
    }

    /// Each tenant's weight in the fair share of a saturated shared budget (default 1 for
    /// every tenant; 0 counts as 1): a tenant of weight 3 gets three times the tokens of a
    /// tenant of weight 1 when both wait. Called when a request drawing from a budget is
    /// admitted, in a layer that [waits for capacity](Self::wait_for_capacity); keep it
    /// fast, as a cap function.
    pub fn tenant_weight<F>(self, weight: F) -> Self
    where
        F: Fn(&str) -> u32 + Send + Sync + 'static,
    {
        let weight = Arc::new(weight);
        self.with(|config| config.options_mut().weight = Some(weight))
    }

    /// Trials the caps without enforcing them, for every tenant or some (see
    /// [`ShadowMode`]; default [`ShadowMode::Off`]): a request the cap would refuse is
    /// counted, logged and admitted.
    pub fn shadow(self, mode: ShadowMode) -> Self {
        self.with(|config| config.options_mut().shadow = mode)
    }

    /// How many requests shadow mode has admitted that the cap would have refused, across
    /// every service this layer (and its clones) made.
    pub fn shadow_refusals(&self) -> u64 {
        let options = self.config.options.as_ref();
        options.map_or(0, |options| {
            options.shadowed.load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(Arc::make_mut(&mut self.config));
        self
    }
}

#[cfg(feature = "openai")]
impl TenantTokenLayer {
    /// Whether the layer reads the usage the upstream reports in each admitted response
    /// (default: no), keeping the reservation true to what the response costs:
    ///
    /// - as the body streams, the reservation grows whenever what the response has
    ///   produced (the prompt plus the output so far: reported usage where the stream
    ///   carries it, else the decoded text of its deltas at 4 bytes a token) passes what
    ///   it holds. Admitted work is never refused; growth past the cap is allowed and
    ///   shows in [`TenantTokenState::overcommits`](crate::TenantTokenState::overcommits).
    ///   So what is in flight never falls below what has been produced;
    /// - when the response ends (or the client goes away, or the body fails) after the
    ///   upstream reported usage, the reservation is resized to the reported total just
    ///   before it is released, so the release (and the `metrics` usage ratio) is exact.
    ///
    /// It reads JSON answers and server-sent event streams that are not compressed, in the
    /// formats of OpenAI's Chat Completions (`usage`, and the final chunk a stream carries
    /// with `stream_options.include_usage`), OpenAI's Responses API (`usage`, the
    /// `response.completed` event) and Anthropic's Messages API (`message_start` and
    /// `message_delta` usage). Every byte passes through unchanged (unless
    /// [`ask_stream_usage`](Self::ask_stream_usage) is on); usage that is garbage
    /// or missing is ignored, never an error to the client. What it keeps per response is
    /// bounded: a usage object of up to 4 KiB, and the unfinished tail of one
    /// server-sent event line of up to 64 KiB (a longer line is not counted). With an
    /// [`OpenAiEstimator`](crate::OpenAiEstimator), the estimate's prompt part is the
    /// prompt above until usage says otherwise; with other estimators the prompt counts
    /// as 0, so live growth starts when the output alone passes the estimate.
    ///
    /// Off, the layer does not look at response bodies at all.
    pub fn read_usage(self, enabled: bool) -> Self {
        self.with(|config| config.read_usage = enabled)
    }

    /// Whether the layer asks streamed chat completions for their usage (default: no);
    /// turns [`read_usage`](Self::read_usage) on.
    ///
    /// A streamed request (`"stream": true`) whose body the layer reads (an
    /// [`OpenAiEstimator`](crate::OpenAiEstimator)) and that did not say whether it wants
    /// usage (no `stream_options.include_usage`) is forwarded with
    /// `"stream_options":{"include_usage":true}` added (and its `Content-Length` made to
    /// match), so the upstream reports the stream's usage and the reservation settles on
    /// it, as LiteLLM does. What that adds to the answer, the `"usage":null` member of
    /// each chunk and the last chunk carrying the usage, is taken out of the stream before
    /// it reaches the client, which receives the stream it would have received without
    /// the option (its `Content-Length`, if any, is dropped: the stream is shorter).
    /// A request that chose for itself, either way, is forwarded as it came, and its
    /// stream passes unchanged.
    ///
    /// Use it in front of upstreams that speak OpenAI's Chat Completions (those that
    /// reject unknown fields would refuse `stream_options`), on the Chat Completions and
    /// Completions routes only: the Responses API and Anthropic's Messages API refuse the
    /// field, so give their routes a clone of the layer with this off (clones share the
    /// tracker and everything learned). An upstream that ignores the option is counted on
    /// the text its streams carry, and logged once per model. Streams are passed on a whole
    /// line at a time: a line split across frames waits for its end (up to 64 KiB; a
    /// longer line passes unchanged as it comes).
    pub fn ask_stream_usage(self, enabled: bool) -> Self {
        self.with(|config| {
            config.ask_usage = enabled;
            config.read_usage |= enabled;
        })
    }

    /// Learns the output allowance of requests that set no `max_tokens`-like limit from
    /// what such requests produced, per tenant and model, in `learned` (see
    /// [`AdaptiveOutput`](crate::AdaptiveOutput)); turns
    /// [`read_usage`](Self::read_usage) on, which measures the outputs.
    ///
    /// Only an [`OpenAiEstimator`](crate::OpenAiEstimator)'s estimates use it: for a
    /// request without an output limit, the allowance is the learned one for its tenant
    /// and model once enough outputs are known, the estimator's
    /// [`default_output_tokens`](crate::OpenAiEstimator::default_output_tokens) until then.
    /// A response that ends normally is learned from; one cut short (an error, a client
    /// gone) is not. Keep `learned` to show what it learned
    /// ([`snapshot`](crate::AdaptiveOutput::snapshot)); one table may serve several layers.
    pub fn adaptive_output(self, learned: Arc<crate::AdaptiveOutput>) -> Self {
        self.with(|config| {
            config.read_usage = true;
            config.adaptive = Some(learned);
        })
    }

    /// Calibrates prompt estimates per model from the prompt tokens upstreams report, in
    /// `calibration` (see [`PromptCalibration`](crate::PromptCalibration)); turns
    /// [`read_usage`](Self::read_usage) on, which reads the reports.
    ///
    /// Only an [`OpenAiEstimator`](crate::OpenAiEstimator)'s estimates use it: once a
    /// model has reported a few prompts, a request to it reserves the prompt its text is
    /// predicted to take there rather than its bytes divided by
    /// [`bytes_per_token`](crate::OpenAiEstimator::bytes_per_token). Every response that
    /// reports its prompt tokens is learned from, cut short or not. Keep `calibration` to
    /// show what it learned ([`snapshot`](crate::PromptCalibration::snapshot)); one table
    /// may serve several layers. Off by default.
    pub fn calibrate_prompts(self, calibration: Arc<crate::PromptCalibration>) -> Self {
        self.with(|config| {
            config.read_usage = true;
            config.calibration = Some(calibration);
        })
    }
}

#[cfg(feature = "metrics")]
impl TenantTokenLayer {
    /// Whether the layer's metrics carry a `tenant` label, and for how many tenants
    /// (default [`TenantLabels::Off`](crate::metrics::TenantLabels::Off); see the
    /// [`metrics`](crate::metrics) module for what is recorded).
    pub fn metrics_tenant_labels(self, labels: crate::metrics::TenantLabels) -> Self {
        self.with(|config| config.metrics = Arc::new(config.metrics.with_labels(labels)))
    }

    /// The `route` label of this layer's metrics on the estimate's accuracy: the ratio of
    /// actual to estimated tokens and the streams that outran their estimate (default:
    /// none). Give each route's layer its own name (`"chat"`, `"embeddings"`, …) to see
    /// where the estimates are off; the names are yours, so the series stay bounded.
    pub fn metrics_route(self, route: &'static str) -> Self {
        self.with(|config| config.metrics = Arc::new(config.metrics.with_route(route)))
    }
}

impl<S> Layer<S> for TenantTokenLayer {
    type Service = TenantTokenService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TenantTokenService::new(inner, Arc::clone(&self.config))
    }
}

impl fmt::Debug for TenantTokenLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.config;
        let options = config.options.as_deref();
        f.debug_struct("TenantTokenLayer")
            .field("tenant", &config.tenant)
            .field("estimator", &config.estimator)
            .field("missing_tenant", &config.missing_tenant)
            .field("missing_estimate", &config.missing_estimate)
            .field("max_tenant_len", &config.max_tenant_len)
            .field("retry_after", &config.retry_after)
            .field(
                "retry_after_from_in_flight",
                &options.and_then(|o| o.hold_times.as_ref().map(|(_, max)| max)),
            )
            .field("reservation_handle", &config.reservation_handle)
            .field("limit_headers", &config.limit_headers)
            .field("read_usage", &config.read_usage)
            .field("ask_stream_usage", &config.ask_usage)
            .field("adaptive_output", &config.adaptive)
            .field("calibrate_prompts", &config.calibration)
            .field("shadow", &options.map(|o| &o.shadow))
            .field("budgets", &options.map(|o| &o.budgets))
            .field(
                "wait_for_capacity",
                &options.and_then(|o| o.queue.as_ref().map(|queue| queue.max_wait)),
            )
            .field("priority", &options.and_then(|o| o.priority.as_ref()))
            .field(
                "tenant_weight",
                &options.is_some_and(|o| o.weight.is_some()),
            )
            .finish_non_exhaustive()
    }
}
