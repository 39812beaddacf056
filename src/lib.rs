//! Cap the tokens each tenant has **in flight** in an LLM gateway.
//!
//! [`TenantTokenLayer`] is a tower layer for axum or hyper services. For each request it
//! finds the tenant (who pays) and a token estimate (what the upstream call may cost),
//! reserves the estimate against the tenant's cap in a [`TenantTokenTracker`], and holds
//! the reservation until the response body has finished streaming or is dropped. A tenant
//! over its cap gets `429 Too Many Requests` with `Retry-After`; a request that could never
//! fit gets `413`.
//!
//! In-flight is not per-minute: a rate limiter counts requests that *started* in a window,
//! while an LLM call may stream for a minute and cost a hundred times another. Capping what
//! is reserved *right now* bounds each tenant's share of the upstream's capacity, however
//! long its calls run. Stack a rate limiter beside it if you want both.
//!
//! # Quick start
//!
//! ```
//! use std::sync::Arc;
//! use axum::{routing::post, Router};
//! use http::{Request, StatusCode};
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//! use tower_tenant_tokens::{TenantTokenLayer, TenantTokenTracker};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Every tenant may have 1,000 tokens in flight.
//! let tracker = Arc::new(TenantTokenTracker::new(1_000));
//! let app = Router::new()
//!     .route("/v1/chat/completions", post(|| async { "streamed answer" }))
//!     .layer(TenantTokenLayer::new(tracker.clone())); // x-tenant-id, x-token-estimate
//!
//! let request = |tokens: u64| {
//!     Request::post("/v1/chat/completions")
//!         .header("x-tenant-id", "acme")
//!         .header("x-token-estimate", tokens)
//!         .body(axum::body::Body::empty())
//!         .unwrap()
//! };
//!
//! let response = app.clone().oneshot(request(800)).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! // The reservation is held until the body has been sent...
//! assert_eq!(tracker.in_flight("acme"), 800);
//! // ...so a second large request must wait.
//! let refused = app.clone().oneshot(request(800)).await.unwrap();
//! assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
//!
//! response.into_body().collect().await.unwrap();
//! assert_eq!(tracker.in_flight("acme"), 0);
//! # }
//! ```
//!
//! # Pieces
//!
//! - [`TenantTokenTracker`]: the ledger, usable on its own ([`TokenReservation`] is its
//!   RAII guard); a layer or a budget takes it, or a Redis tracker, as a [`TokenLedger`].
//! - [`TenantSource`] and [`Estimator`] (with [`OpenAiEstimator`] for OpenAI-style JSON
//!   bodies): where the tenant and the estimate come from.
//! - [`ReservationHandle`]: in the request extensions when the layer is built with
//!   `.reservation_handle(true)`, for handlers that reconcile the estimate with real usage.
//! - [`Error`] and [`Rejection`]: why a request was refused and the response it gets.
//! - [`SharedBudget`]: a cap all tenants draw from too (the upstream's capacity, one per
//!   model), reserved all or nothing with the tenant's.
//! - [`ShadowMode`]: trial the caps, counting and logging what they would refuse.
//! - On the layer: [`wait_for_capacity`](TenantTokenLayer::wait_for_capacity) (queue for
//!   capacity instead of an immediate 429),
//!   [`retry_after_from_in_flight`](TenantTokenLayer::retry_after_from_in_flight),
//!   [`openai_ratelimit_headers`](TenantTokenLayer::openai_ratelimit_headers) and
//!   [`ietf_ratelimit_headers`](TenantTokenLayer::ietf_ratelimit_headers) (OpenAI's and
//!   the IETF draft's headers).
//! - Modules: `redis` (feature `redis`: one cap across replicas), `metrics` (feature
//!   `metrics`), [`headers`] (the names of the headers the layer sends), [`body`] and
//!   [`future`] (the types the layer's service hands on).
//!
//! # Feature flags
//!
//! - `openai` (default): [`OpenAiEstimator`], which adds `serde` and `serde_json`.
//! - `metrics`: the layer records counters, a gauge and histograms through the `metrics`
//!   facade (see the `metrics` module); adds `metrics`.
//! - `redis`: `redis::RedisTokenTracker`, one cap shared by every replica through Redis with
//!   expiring leases (give it to `TenantTokenLayer::new`), on one server, a Redis Cluster
//!   or a Sentinel-watched master; adds `redis` (and tokio's runtime).
//!
//! # Minimum supported Rust version
//!
//! Rust 1.73 with the default features and `metrics`; the `redis` feature needs what
//! redis-rs needs (1.88).

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod admit;
pub mod body;
mod budget;
mod config;
mod error;
mod extract;
mod fair;
pub mod future;
pub mod guide;
pub mod headers;
mod layer;
mod ledger;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(not(feature = "metrics"))]
#[path = "metrics_off.rs"]
mod metrics;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(not(feature = "redis"))]
#[path = "redis_off.rs"]
mod redis;
mod reject;
mod reservation;
mod retry_after;
mod service;
mod shadow;
mod step;
mod sync;
mod table;
mod tracker;
mod window;

pub use self::budget::SharedBudget;
pub use self::error::{Error, WindowRefusal};
#[cfg(feature = "openai")]
pub use self::extract::openai::{
    AdaptiveOutput, CalibratedModel, LearnedOutput, OpenAiEstimate, OpenAiEstimator,
    PromptCalibration,
};
pub use self::extract::{
    EstimateError, Estimator, MissingEstimate, MissingTenant, PrioritySource, TenantSource,
};
pub use self::fair::Priority;
pub use self::layer::TenantTokenLayer;
pub use self::ledger::TokenLedger;
pub use self::reject::Rejection;
pub use self::reservation::ReservationHandle;
pub use self::service::TenantTokenService;
pub use self::shadow::ShadowMode;
pub use self::tracker::{
    TenantScope, TenantTokenState, TenantTokenTracker, TenantTokenTrackerBuilder, TokenReservation,
};
pub use self::window::{Price, Prices, TokenWindow};

/// The error type bodies are converted into, as across tower and hyper.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
