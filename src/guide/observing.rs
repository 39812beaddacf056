//! Seeing and trialling the caps: the ledger, metrics, rate-limit headers, shadow mode.
//!
//! # The ledger
//!
//! [`TenantTokenTracker::snapshot`](crate::TenantTokenTracker::snapshot) lists every
//! tracked tenant with its [`TenantTokenState`](crate::TenantTokenState): tokens in flight,
//! the high-water mark, the cap, live reservations, and `overcommits` (how many
//! times running work grew the tenant from within its cap to above it: a stream that
//! keeps growing past it counts once). [`in_flight`](crate::TenantTokenTracker::in_flight)
//! and [`tenant_state`](crate::TenantTokenTracker::tenant_state) ask about one tenant. The
//! `gateway` example serves the snapshot at `/admin/tenants`.
//!
//! ```rust
//! use std::sync::Arc;
//! use tower_tenant_tokens::{TenantScope, TenantTokenTracker};
//!
//! let tracker = Arc::new(TenantTokenTracker::new(4_096));
//! let _held = tracker.reserve(&TenantScope::new("acme"), 3_500).unwrap();
//! for (tenant, state) in tracker.snapshot() {
//!     println!("{tenant}: {} of {} in flight (peak {})", state.in_flight, state.cap, state.high_water);
//! }
//! ```
//!
//! # Metrics
//!
//! With the feature `metrics`, the layer records through the
//! [`metrics`](https://docs.rs/metrics) facade into whatever recorder the application
//! installs (nothing is recorded without one). `cargo run --example gateway --features
//! metrics` serves them at `/metrics` in Prometheus text (through
//! `metrics-exporter-prometheus`).
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `tenant_tokens_requests_total` | counter | `outcome` = `admitted` / `refused` / `shadowed`; `reason` = the refusal's code | every metered request's fate |
//! | `tenant_tokens_in_flight` | gauge | | tokens this process holds for requests in flight (sum the replicas for a shared cap) |
//! | `tenant_tokens_reserved` | histogram | | the estimate reserved per admitted request |
//! | `tenant_tokens_usage_ratio` | histogram | `route` (with `metrics_route`) | tokens held at the end ÷ the estimate, for requests whose reservation was resized (a handler reconciled, or the layer read the reported usage): how good the estimator is |
//! | `tenant_tokens_streams_outran_total` | counter | `route` (as above) | event streams whose output outran their reservation (grown as they went, with `read_usage`) |
//! | `tenant_tokens_output_allowance` | gauge | `tenant`, `model` | the output allowance learned for requests without an output limit (`adaptive_output`); only with tenant labels, for tenants with their own label and the first 32 models seen |
//!
//! A `tenant` label on each is opt-in, with
//! `TenantTokenLayer::metrics_tenant_labels`, because every
//! tenant label is a time series in the monitoring system: `TenantLabels::All` for a few
//! known tenants, `TenantLabels::Bounded(n)` for the first `n` tenants seen and
//! `tenant="other"` for the rest, whatever ids clients send. Refusals that name no tenant
//! (none was found) carry no tenant label. The `metrics` module (on docs.rs, built with
//! every feature) has the names as constants.
//!
//! ```rust
//! # #[cfg(feature = "metrics")]
//! # fn main() {
//! use std::sync::Arc;
//! use tower_tenant_tokens::metrics::TenantLabels;
//! use tower_tenant_tokens::{TenantTokenLayer, TenantTokenTracker};
//!
//! let layer = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(50_000)))
//!     .metrics_tenant_labels(TenantLabels::Bounded(100));
//! # let _ = layer;
//! # }
//! # #[cfg(not(feature = "metrics"))]
//! # fn main() {}
//! ```
//!
//! # Rate-limit headers
//!
//! 429s always carry OpenAI's `x-ratelimit-limit-tokens` (the cap) and
//! `x-ratelimit-remaining-tokens` (what is left of it). Two settings add headers to
//! admitted responses too (headers the inner service set itself are left alone):
//!
//! - [`openai_ratelimit_headers(true)`](crate::TenantTokenLayer::openai_ratelimit_headers):
//!   `x-ratelimit-limit-tokens` and `x-ratelimit-remaining-tokens` (what is left as the
//!   response starts, this request's reservation included), as OpenAI's API sends them.
//! - [`ietf_ratelimit_headers(true)`](crate::TenantTokenLayer::ietf_ratelimit_headers): the
//!   IETF draft's `RateLimit-Policy` and `RateLimit` fields
//!   ([draft-ietf-httpapi-ratelimit-headers](https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/)),
//!   with one policy, `in-flight`: a quota `q` of the tenant's cap in units (`qu`) of
//!   tokens and no window, since the quota is what may be in flight at once. A 429 also
//!   says when to retry (`t`, as `Retry-After`); a 413 carries the policy only.
//!
//! ```text
//! RateLimit-Policy: "in-flight";q=4096;qu="tokens"
//! RateLimit: "in-flight";r=1200           (admitted: what is left as the response starts)
//! RateLimit: "in-flight";r=300;t=1        (429: what is left, and when to retry)
//! ```
//!
//! The header names are constants in [`headers`](crate::headers).
//!
//! ```rust
//! use std::sync::Arc;
//! use tower_tenant_tokens::headers::{RATELIMIT, X_RATELIMIT_REMAINING_TOKENS};
//! use tower_tenant_tokens::{TenantTokenLayer, TenantTokenTracker};
//!
//! let layer = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(4_096)))
//!     .openai_ratelimit_headers(true)
//!     .ietf_ratelimit_headers(true);
//! assert_eq!(X_RATELIMIT_REMAINING_TOKENS, "x-ratelimit-remaining-tokens");
//! assert_eq!(RATELIMIT, "ratelimit");
//! # let _ = layer;
//! ```
//!
//! # Shadow mode
//!
//! Shadow mode trials a cap before it is enforced:
//! [`shadow(ShadowMode::All)`](crate::TenantTokenLayer::shadow), or
//! [`ShadowMode::tenants(|id| …)`](crate::ShadowMode::tenants) for some tenants. A request
//! over a cap (429) or larger than one (413), the tenant's or a shared budget's, is logged
//! at `info` with `shadow = true`, counted
//! ([`shadow_refusals`](crate::TenantTokenLayer::shadow_refusals), and
//! `outcome="shadowed"` in the metrics) and admitted. Its tokens are reserved and counted
//! like any others
//! ([`TenantTokenTracker::reserve_unchecked`](crate::TenantTokenTracker::reserve_unchecked),
//! or `redis::RedisTokenTracker::reserve_unchecked`),
//! so in-flight figures stay those of the real traffic and the overshoot shows as
//! `overcommits`. Bad requests (400) are still refused: shadow mode trials the cap, not the
//! request format (use [`MissingTenant::Unmetered`](crate::MissingTenant::Unmetered) to let
//! requests without a tenant through during a trial).
//!
//! ```rust
//! use std::sync::Arc;
//! use tower_tenant_tokens::{ShadowMode, TenantTokenLayer, TenantTokenTracker};
//!
//! // Enforce for everyone but the tenants being moved onto the new cap.
//! let layer = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(50_000)))
//!     .shadow(ShadowMode::tenants(|tenant| tenant.starts_with("trial-")));
//! assert_eq!(layer.shadow_refusals(), 0);
//! ```
//!
//! # Logs
//!
//! The layer logs through `tracing`: refusals at `info` (tenant, tokens, in flight, cap),
//! and a request admitted after waiting at `debug`. Admissions and releases are not logged
//! one by one: even a disabled log line costs every request, and the metrics count them
//! (tower-http's `TraceLayer` logs each request, if you want that). With Redis, the circuit breaker opening and closing
//! is logged at `warn` and each request answered by the failure policy at `debug` (see
//! [replicas](super::replicas#when-redis-is-unreachable)).
