//! Refusals: what a client gets, and why.
//!
//! Every refusal is an ordinary response (the inner service's error type is unchanged and
//! axum needs no `HandleErrorLayer`) with `content-type: application/json` and an
//! OpenAI-shaped body:
//!
//! ```text
//! {"error":{"message":"…","type":"…","param":null,"code":"…"}}
//! ```
//!
//! Nothing is reserved for a refused request, and the inner service is never called. Each
//! refusal is an [`Error`](crate::Error) variant, with its [`status`](crate::Error::status)
//! and its stable [`code`](crate::Error::code).
//!
//! | status | `code` | when |
//! |---|---|---|
//! | 400 (401 with [`MissingTenant::Unauthorized`](crate::MissingTenant::Unauthorized)) | `missing_tenant` | no tenant on the request |
//! | 400 | `invalid_tenant` | empty, longer than the layer's [`max_tenant_len`](crate::TenantTokenLayer::max_tenant_len), not visible ASCII, or sent twice (header source) |
//! | 400 | `missing_token_estimate` | no estimate on the request |
//! | 400 | `invalid_token_estimate` | not decimal digits, negative, beyond 64 bits, or sent twice (header estimator); a `max_tokens` or `n` that is negative, fractional, or a string |
//! | 400 | `invalid_json` | the body estimator could not parse the body |
//! | 400 | `body_read_error` | the request body broke off while being read |
//! | 413 | `body_too_large` | the body is longer than the estimator reads ([`OpenAiEstimator::body_limit`](crate::OpenAiEstimator::body_limit), or the `limit` of [`Estimator::from_body_fn`](crate::Estimator::from_body_fn)) |
//! | 413 | `request_too_large` | the estimate alone exceeds the tenant's cap: retrying cannot help, so no `Retry-After` |
//! | 413 | `request_too_large_for_budget` | the estimate alone exceeds a [shared budget](super::budgets)'s cap (the message names the budget) |
//! | 429 | `budget_exceeded` | within the tenant's cap, but over a shared budget now (the message names the budget; `x-ratelimit-*` give the budget's figures); `Retry-After` |
//! | 413 | `request_too_large_for_window` | the estimate alone exceeds the tenant's limit in a [window](super::windows) (the message names the window) |
//! | 429 | `rate_limit_exceeded` | over the tenant's cap now; `Retry-After`, `x-ratelimit-limit-tokens`, `x-ratelimit-remaining-tokens` |
//! | 429 | `window_exceeded` | over what is left of a [window](super::windows) now (the message names it); `Retry-After` from the refill rate, `x-ratelimit-limit-tokens`, `x-ratelimit-remaining-tokens`, `x-ratelimit-reset-tokens` |
//! | 503 | `backend_unavailable` | Redis ledger only: Redis could not be asked and the policy is `redis::FailurePolicy::FailClosed`; `Retry-After`, `"type":"server_error"`, and no Redis detail in the message (it is logged) |
//!
//! The 429 for the tenant's cap says `"type":"tokens"`, `"code":"rate_limit_exceeded"`, as
//! OpenAI's own token limits do, so an OpenAI SDK pointed at the gateway raises its usual
//! rate-limit error. The header names are in [`headers`](crate::headers).
//!
//! # Bad input, one row per case
//!
//! Each row is asserted through real HTTP on 127.0.0.1 by the test named in the last
//! column: the answer is the JSON error shown, nothing is reserved, the inner service is
//! never called, and the server goes on serving.
//!
//! | input | answer | test |
//! |---|---|---|
//! | no tenant header | 400 `missing_tenant` (401 with `MissingTenant::Unauthorized`) | `rejections::missing_tenant_is_400_json_and_never_reaches_the_handler` |
//! | tenant empty, 257 bytes, 10 KiB, with a tab, a space, `é`, a raw `0xff`, sent twice | 400 `invalid_tenant` | `rejections::invalid_tenant_ids_are_400_and_reserve_nothing` |
//! | a raw control byte (`\x01`) in the tenant header | 400 | `rejections::a_raw_control_byte_in_the_tenant_header_never_reaches_the_handler` |
//! | no estimate header | 400 `missing_token_estimate` | `rejections::missing_and_malformed_estimates_are_400_and_reserve_nothing` |
//! | estimate `abc`, `-1`, `1e9`, `18446744073709551616`, `+5`, `1.5`, `0x10`, empty, sent twice | 400 `invalid_token_estimate` | same |
//! | body over the estimator's limit, with or without `Content-Length` | 413 `body_too_large` | `estimators::openai_body_over_the_limit_is_413_with_or_without_content_length` |
//! | malformed JSON, JSON that is not an object | 400 `invalid_json` | `estimators::openai_malformed_json_is_400_invalid_json_and_never_reaches_the_handler` |
//! | 10,000 nested arrays in `messages` | 400 `invalid_json` | `estimators::openai_deeply_nested_json_is_400_and_does_not_crash_the_server` |
//! | `max_tokens` `-1`, `1.5`, `"100"`, `1e30`, `18446744073709551616`, `true`, `[100]`; `n` `-1` | 400 `invalid_token_estimate` | `estimators::openai_unusable_max_tokens_is_400_invalid_token_estimate` |
//! | a request larger than the tenant's cap (header or body estimate) | 413 `request_too_large`, no `Retry-After` | `rejections::request_larger_than_the_cap_is_413_without_retry_after`, `estimators::openai_estimate_over_the_cap_is_413_request_too_large` |
//! | over the cap now | 429 `rate_limit_exceeded` + `Retry-After` | `rejections::over_the_cap_now_is_429_with_retry_after_and_rate_limit_headers` |
//! | a client that aborts its upload mid-body | 400 `body_read_error` or a closed connection; nothing reserved | `estimators::a_client_aborting_its_upload_mid_body_reserves_nothing` |
//!
//! Beyond these fixed cases, property tests send arbitrary header bytes and bodies (see
//! [guarantees](super::guarantees#how-they-are-checked)).
//!
//! # Your own refusal responses
//!
//! [`on_rejection(f)`](crate::TenantTokenLayer::on_rejection) builds every refusal with
//! `f` instead. `f` gets the [`Rejection`](crate::Rejection): the
//! [`Error`](crate::Error), the status and the `Retry-After` the layer would send, and the
//! default response ([`to_response`](crate::Rejection::to_response)) to start from.
//!
//! ```rust
//! use std::sync::Arc;
//! use http::HeaderValue;
//! use tower_tenant_tokens::{Rejection, TenantTokenLayer, TenantTokenTracker};
//!
//! let layer = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(10_000)))
//!     .on_rejection(|rejection: &Rejection| {
//!         let mut response = rejection.to_response(); // the default JSON
//!         let code = HeaderValue::from_static(rejection.error().code());
//!         response.headers_mut().insert("x-refusal-code", code);
//!         response
//!     });
//! # let _ = layer;
//! ```
//!
//! # `Retry-After`
//!
//! 429s and 503s carry `Retry-After` in whole seconds, at least 1; 413s never do, since
//! retrying cannot help. It is [`retry_after`](crate::TenantTokenLayer::retry_after), one
//! second unless set: in-flight capacity frees up as soon as any stream ends, so a short
//! wait is the honest hint.
//!
//! [`retry_after_from_in_flight(max)`](crate::TenantTokenLayer::retry_after_from_in_flight)
//! derives the 429's value from what is in flight instead: the layer's mean hold time (one
//! figure across tenants, exponentially weighted) times the share of the tenant's
//! in-flight tokens that must be released before the request fits, never under one second,
//! at most `max`. A request that needs a sliver of what is in flight is told to come back
//! sooner than one that needs all of it. It is an estimate, not a promise, and the fixed
//! value is sent until a reservation has ended, and for refusals other than 429.
//!
//! Why the fixed second stays the default, though streams hold capacity for seconds: it
//! costs nothing per request, and it is never wrong by much in the direction that hurts.
//! A client that comes back too early gets another 429 and its retry budget runs out
//! sooner (the OpenAI SDKs retry twice by default); one told to wait too long idles while
//! capacity is free. For LLM streams that run for seconds, turn
//! `retry_after_from_in_flight` on, as the `gateway` example does.
//!
//! # Waiting instead of an immediate 429
//!
//! [`wait_for_capacity(max_wait)`](crate::TenantTokenLayer::wait_for_capacity) lets a
//! request over its tenant's cap (or a shared budget) wait for capacity. Within a tenant,
//! requests wait first come first served: only the first in line may reserve, and a new
//! request queues behind those already waiting even if it would fit, so a large request is
//! not starved by a stream of small ones. Every release through the layer wakes the
//! waiting requests; they also look again periodically, for capacity that returns
//! otherwise (a raised cap, another replica's release). At the deadline the request gets
//! the 429 it would have got.
//!
//! # Fair shares of a saturated upstream
//!
//! Tenants waiting for a [shared budget](super::budgets) meet where one tenant's load can
//! starve another's. When the budget frees, the request admitted next is chosen across
//! every tenant waiting for it:
//!
//! 1. by [`Priority`](crate::Priority) class, read with
//!    [`priority_header`](crate::TenantTokenLayer::priority_header) or
//!    [`priority_source`](crate::TenantTokenLayer::priority_source): `Critical` strictly
//!    before `Standard` (the default) before `Sheddable`;
//! 2. within a class, fairly: each tenant counts the tokens admitted for it from shared
//!    budgets, divided by its [weight](crate::TenantTokenLayer::tenant_weight), and the
//!    tenant with the smallest count goes next (the virtual token counter of Sheng et al.,
//!    "Fairness in Serving Large Language Models", OSDI 2024). Equal counts go to the
//!    tenant that started waiting first. A tenant that asks again after an idle spell
//!    (nothing of its waiting or running) starts at the smallest count among the tenants
//!    waiting, or, when none wait, at the count of the tenant served last: idle time
//!    banks no credit. Between two tenants that keep requests waiting, the tokens admitted
//!    differ by at most a few of the largest requests, weighted;
//! 3. within a tenant, first come first served.
//!
//! Once it is a request's turn, the budget's capacity is kept for it: new requests queue
//! behind it and other waiters wait their turn, so a large request is not passed by
//! smaller ones. A `Sheddable` request that arrives while others wait for a budget it draws
//! from is refused at once ([`Error::Shed`](crate::Error::Shed), 429 `shed`). The metrics
//! (feature `metrics`) show the requests waiting and their waits by class, and each
//! tenant's tokens from the budgets.
//!
//! - A request larger than the cap never waits (413).
//! - At most [`TenantTokenLayer::MAX_WAITING_PER_TENANT`](crate::TenantTokenLayer::MAX_WAITING_PER_TENANT)
//!   requests wait per tenant; the next is refused at once.
//! - A client that goes away while waiting (the response future is dropped) leaves the
//!   queue and holds nothing.
//! - With a Redis tracker, requests waiting for a budget in Redis are ordered
//!   in Redis, one fair order across every replica, and woken by releases on any replica
//!   (see [one fair order for every replica](super::budgets#one-fair-order-for-every-replica)).
//!   Requests waiting for their tenant's own cap, or for a budget counted in this process,
//!   queue per process: woken by this replica's releases, they find capacity freed
//!   elsewhere when they look again.
//! - Waiting needs tokio's timer (any `#[tokio::main]` runtime has it).
//!
//! ```rust
//! use std::{sync::Arc, time::Duration};
//! use axum::{routing::post, Router};
//! use http::StatusCode;
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//! use tower_tenant_tokens::{TenantTokenLayer, TenantTokenTracker};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let tracker = Arc::new(TenantTokenTracker::new(1_000));
//! let app = Router::new()
//!     .route("/v1/chat/completions", post(|| async { "answer" }))
//!     .layer(TenantTokenLayer::new(tracker.clone()).wait_for_capacity(Duration::from_secs(5)));
//! let request = |tokens: u64| {
//!     http::Request::post("/v1/chat/completions")
//!         .header("x-tenant-id", "acme")
//!         .header("x-token-estimate", tokens)
//!         .body(axum::body::Body::empty())
//!         .unwrap()
//! };
//!
//! let first = app.clone().oneshot(request(800)).await.unwrap(); // holds 800 of 1,000
//! let second = tokio::spawn(app.clone().oneshot(request(800))); // does not fit: waits
//! tokio::time::sleep(Duration::from_millis(20)).await;
//! assert_eq!(tracker.in_flight("acme"), 800);
//!
//! first.into_body().collect().await.unwrap(); // the release wakes the waiting request
//! let second = second.await.unwrap().unwrap();
//! assert_eq!(second.status(), StatusCode::OK);
//! assert_eq!(tracker.in_flight("acme"), 800);
//! # }
//! ```
