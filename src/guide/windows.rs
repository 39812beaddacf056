//! Limits over time: tokens per minute, per day, per 30 days.
//!
//! The in-flight cap answers "how much may this tenant run at once". A
//! [`TokenWindow`](crate::TokenWindow) answers "how much may it use per minute (or day, or
//! 30 days)", as OpenAI's TPM limits do. Add one with
//! [`TenantTokenLayer::window`](crate::TenantTokenLayer::window), once per window:
//!
//! ```rust
//! use std::sync::Arc;
//! use axum::{routing::post, Router};
//! use http::StatusCode;
//! use tower::ServiceExt;
//! use tower_tenant_tokens::{TenantTokenLayer, TenantTokenTracker, TokenWindow};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let per_minute = TokenWindow::per_minute(1_000);
//! let app = Router::new()
//!     .route("/v1/chat/completions", post(|| async { "answer" }))
//!     .layer(
//!         TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(4_000)))
//!             .window(per_minute.clone())
//!             .window(TokenWindow::per_day(100_000)),
//!     );
//! let request = |tokens: u64| {
//!     http::Request::post("/v1/chat/completions")
//!         .header("x-tenant-id", "acme")
//!         .header("x-token-estimate", tokens)
//!         .body(axum::body::Body::empty())
//!         .unwrap()
//! };
//!
//! let first = app.clone().oneshot(request(700)).await.unwrap();
//! assert_eq!(first.status(), StatusCode::OK);
//! // The first request has ended: nothing is in flight, but 700 of the minute's 1,000
//! // tokens are used.
//! let second = app.clone().oneshot(request(700)).await.unwrap();
//! assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
//! // 400 tokens short at 1,000 a minute: 24 s.
//! assert_eq!(second.headers()["retry-after"], "24");
//! assert_eq!(per_minute.remaining("acme"), 300);
//! # }
//! ```
//!
//! # What a window counts
//!
//! By default every token, input and output alike. A window can count some kinds only,
//! or weigh them, from what the estimate and the usage the upstream reports tell apart:
//!
//! - [`input_only`](crate::TokenWindow::input_only) and
//!   [`output_only`](crate::TokenWindow::output_only) (reasoning tokens are output, as
//!   upstreams bill them);
//! - [`cached_input_weight`](crate::TokenWindow::cached_input_weight): input tokens read
//!   from a cache (OpenAI's `prompt_tokens_details.cached_tokens`, Anthropic's
//!   `cache_read_input_tokens`) count at a weight, 0 to count them not at all;
//! - [`per_model`](crate::TokenWindow::per_model): a bucket per tenant and model, as
//!   OpenAI's limits are per model, each with the tenant's limit;
//! - **spend**: [`TokenWindow::spend_per_day`](crate::TokenWindow::spend_per_day) (and
//!   `spend_per_30_days`, `spend`) limits what a tenant spends in a currency unit, each
//!   request priced by its model from a [`Prices`](crate::Prices) table per million input,
//!   cached input and output tokens. A model missing from the table takes its default
//!   price, or is refused (400 `unpriced_model`) when there is none: a spend limit that let
//!   unpriced models through would not limit spend. Spend windows count in millionths of
//!   the currency unit.
//!
//! ```rust
//! use tower_tenant_tokens::{OpenAiEstimator, Price, Prices, TenantTokenLayer};
//! use tower_tenant_tokens::{TenantTokenTracker, TokenWindow};
//! # use std::sync::Arc;
//!
//! let prices = Prices::new()
//!     .with("gpt-4o-mini", Price::per_million(0.15, 0.075, 0.6).unwrap())
//!     .with("gpt-4o", Price::per_million(2.5, 1.25, 10.0).unwrap());
//! let spend = TokenWindow::spend_per_day(5.00, prices);
//! let layer = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(50_000)))
//!     .estimator(OpenAiEstimator::new()) // finds the model, tells prompt from output
//!     .read_usage(true)                  // settles on the usage reported
//!     .window(TokenWindow::per_minute(100_000).output_only())
//!     .window(spend.clone());
//! assert_eq!(spend.remaining("acme"), 5_000_000); // millionths: 5.00
//! # let _ = layer;
//! ```
//!
//! The estimate is charged as its prompt and output parts when the estimator tells them
//! apart (the [`OpenAiEstimator`](crate::OpenAiEstimator) does; cached input is unknown
//! until reported, so it is charged at full weight first). An estimate that is not told
//! apart (a header's) counts each token as the dearer of an input and an output token,
//! and the usage reported settles it.
//!
//! # The bucket
//!
//! Each tenant has a bucket per window that holds at most its limit and refills
//! continuously at the limit divided by the period (1,000 a minute refills about 16.7
//! tokens a second). A new tenant starts with a full bucket. So in the worst case a tenant
//! uses, in any one period, a full bucket plus one period's refill: twice its limit. Over
//! any `n` periods it uses at most `n + 1` limits, so over a long run its limit per
//! period.
//!
//! # What a request is charged
//!
//! - **At admission, all or nothing.** A request is admitted only if its estimate fits
//!   its tenant's in-flight cap, every [shared budget](super::budgets) and every window.
//!   A request refused by any of them charges nothing anywhere.
//! - **As it grows.** A stream that outruns its estimate
//!   ([`read_usage`](crate::TenantTokenLayer::read_usage)) is charged the growth as it
//!   passes, and is never refused mid-stream: the bucket may go below zero, and the
//!   tenant's next requests wait for it to refill.
//! - **Settled on the usage reported.** The usage the upstream reports (read by
//!   `read_usage`), or what a handler sets with
//!   [`ReservationHandle::resize`](crate::ReservationHandle::resize), is what the request
//!   is charged in the end: what was estimated beyond it goes back to the bucket, what it
//!   used beyond the estimate is charged.
//! - **Unreported, charged at the most it held.** A request whose usage is never
//!   reported stays charged at its estimate, or at what its stream was counted to, the
//!   larger. So is one the client dropped, or one the upstream failed: the window cannot
//!   tell what the upstream did for it, and takes the side of the limit.
//! - **A guessed output fits.** An output allowance the estimator guessed (a request
//!   without `max_tokens`) is cut to the smallest token window's limit, as to the
//!   in-flight cap: a guess never makes a request unadmittable (it may wait for the
//!   bucket to refill).
//!
//! # Refusals
//!
//! - **429 `window_exceeded`** when the estimate does not fit what is left now. The body
//!   names the window (`"tokens per minute"`); `Retry-After` is how long the bucket takes
//!   to refill enough for this request's estimate, rounded up to whole seconds (if
//!   nothing else is charged meanwhile, a retry then fits); `x-ratelimit-limit-tokens`,
//!   `x-ratelimit-remaining-tokens` and `x-ratelimit-reset-tokens` (how long until the
//!   bucket is full, in OpenAI's format such as `6m0s`) describe the window. When several
//!   windows refuse, the one to wait longest for is reported.
//! - **413 `request_too_large_for_window`** for a request larger than the limit itself.
//! - With [`openai_ratelimit_headers`](crate::TenantTokenLayer::openai_ratelimit_headers),
//!   admitted responses describe the window with the least left, as OpenAI's API does.
//! - [Shadow mode](crate::ShadowMode) covers windows as it covers caps: the request is
//!   admitted and charged, and the refusal counted and logged.
//!
//! # Watching them
//!
//! [`TokenWindow::remaining`](crate::TokenWindow::remaining) and
//! [`limit`](crate::TokenWindow::limit) read a tenant's window. With the `metrics`
//! feature, what each window was charged in the end is counted by kind of token
//! (`tenant_tokens_window_tokens_total`) and spend (`tenant_tokens_spend_total`), and
//! with tenant labels, what each tenant has left (`tenant_tokens_window_remaining`); see
//! the `metrics` module.
//!
//! # Limits per tenant
//!
//! A window has a default limit ([`set_default_limit`](crate::TokenWindow::set_default_limit)),
//! a limit function for plans ([`set_limit_fn`](crate::TokenWindow::set_limit_fn), asked
//! once per tenant and again on [`refresh_limits`](crate::TokenWindow::refresh_limits)),
//! and limits set per tenant at run time ([`set_limit`](crate::TokenWindow::set_limit)).
//! When a limit changes, what the tenant used stays used.
//!
//! Buckets of idle tenants whose buckets are full again are dropped once many tenants
//! have been seen, since a full bucket is the same as a new one: a spray of tenant ids
//! cannot grow memory without bound for longer than one period. A tenant seen more than
//! once keeps the bucket of one window that counts every token alike beside its entry in
//! the tracker, so that its requests find it without a lookup; that bucket stays while
//! the tracker keeps the entry, which the tracker's idle bound
//! ([`max_idle_tenants`](crate::TenantTokenTrackerBuilder::max_idle_tenants)) bounds.
//!
//! # Stacking with caps and rate limiters
//!
//! The three limits answer different questions and stack:
//!
//! - the **in-flight cap** keeps a tenant from holding the upstream's capacity at once
//!   (a burst of long streams);
//! - a **window** keeps it within its share of tokens over time (its plan);
//! - a **request-rate limiter** such as tower_governor keeps it from flooding the gateway
//!   with requests, whatever their size.
//!
//! Put the request-rate limiter outside this layer (it runs first): a request it refuses
//! is refused before anything is reserved or charged. The in-flight cap and the windows
//! are one admission here, so their order does not matter. See
//! [layer order](super::integrating#layer-order).
//!
//! # Where windows count
//!
//! A window counts where the layer's ledger counts:
//!
//! - **In this process**, with a [`TenantTokenTracker`](crate::TenantTokenTracker):
//!   clones of the layer and of the window share its buckets.
//! - **In Redis, for every replica**, with a Redis tracker (feature `redis`): each
//!   tenant's bucket is a small hash beside its leases, under the same hash tag (a Redis
//!   Cluster keeps them in one slot), charged in the same script call as the tenant's
//!   lease, all or nothing, on Redis's clock (`TIME`), never a replica's. A window adds
//!   no round trip. The bucket's key expires once the bucket would be full again. A
//!   request's growth and its settlement reach Redis in the background, batched with the
//!   tracker's other calls. A replica that dies leaves what it charged in the buckets
//!   (the tokens were used). Read a bucket with `RedisTokenTracker::window_remaining`.
//!
//! In Redis, a request that draws its tenant's tokens from this replica's
//! [headroom](crate::guide::replicas) still goes to Redis when the layer has windows:
//! the window's charge needs it. While Redis cannot be asked and the failure policy
//! admits requests, their windows are charged in this process instead, each replica
//! allowing the whole limit until Redis is back. Replicas configure windows alike, as
//! they configure caps: a window's buckets are named by its name and what it counts.
//! Admitted responses' headers (and the remaining gauge) say what the shared bucket held
//! once the request was charged: the same call answers it.
