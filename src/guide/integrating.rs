//! Putting the layer in front of a service.
//!
//! For every request, [`TenantTokenLayer`](crate::TenantTokenLayer):
//!
//! 1. finds the **tenant** (who pays): a header, a [`TenantScope`](crate::TenantScope)
//!    your authentication put in the request extensions, or your function;
//! 2. finds a **token estimate** (what the upstream call may cost): a header,
//!    `Content-Length`, the OpenAI-style JSON body, or your function;
//! 3. **reserves** the estimate against the tenant's cap (and any
//!    [shared budgets](super::budgets)) before the inner service runs;
//! 4. **holds** the reservation until the response body has finished streaming, failed, or
//!    been dropped by a disconnecting client, then releases it exactly once;
//! 5. answers 429 with `Retry-After` when the tenant is over its cap now, and 413 when the
//!    request alone could never fit (see [refusals](super::refusals)).
//!
//! A refusal is an ordinary response: the inner service's error type is unchanged, so axum
//! needs no `HandleErrorLayer`.
//!
//! # Where the tenant comes from
//!
//! | setting | the tenant is |
//! |---|---|
//! | default, or [`tenant_header(name)`](crate::TenantTokenLayer::tenant_header) | the value of header `x-tenant-id` (or `name`) |
//! | [`tenant_from_extension()`](crate::TenantTokenLayer::tenant_from_extension) | the [`TenantScope`](crate::TenantScope) an earlier layer inserted into the request extensions |
//! | [`tenant_source(TenantSource::from_fn(f))`](crate::TenantSource::from_fn) | what `f` returns from the request head |
//!
//! A tenant from a header is checked: one header, not empty, at most
//! [`max_tenant_len`](crate::TenantTokenLayer::max_tenant_len) bytes (default
//! [`TenantSource::DEFAULT_MAX_LEN`](crate::TenantSource::DEFAULT_MAX_LEN)), visible ASCII
//! only (`!` to `~`). Anything else is refused with 400 `invalid_tenant` rather than
//! counted under a surprising id. Tenants from an extension or a function are trusted (your
//! code produced them), except that an empty id counts as missing.
//!
//! A request with no tenant gets what
//! [`on_missing_tenant`](crate::TenantTokenLayer::on_missing_tenant) says:
//! [`MissingTenant::Reject`](crate::MissingTenant::Reject) (400, the default),
//! [`Unauthorized`](crate::MissingTenant::Unauthorized) (401),
//! [`DefaultTenant(id)`](crate::MissingTenant::DefaultTenant) (counted under one shared
//! id) or [`Unmetered`](crate::MissingTenant::Unmetered) (let through, nothing reserved).
//! A request with an *invalid* tenant is always refused with 400: it is a client bug, and
//! counting it under another id would hide it.
//!
//! In production the tenant should come from what your authentication established (see
//! [Tenant identity](#tenant-identity-a-security-note)). Here an axum middleware checks
//! the key and inserts the scope; the token layer runs inside it:
//!
//! ```rust
//! use std::sync::Arc;
//! use axum::extract::Request;
//! use axum::middleware::{self, Next};
//! use axum::response::{IntoResponse, Response};
//! use axum::{routing::post, Router};
//! use http::StatusCode;
//! use tower::ServiceExt;
//! use tower_tenant_tokens::{MissingTenant, TenantScope, TenantTokenLayer, TenantTokenTracker};
//!
//! async fn authenticate(mut request: Request, next: Next) -> Response {
//!     let key = request.headers().get("authorization").and_then(|v| v.to_str().ok());
//!     let tenant = match key {
//!         Some("Bearer sk-acme") => "acme", // a real service looks the key up
//!         _ => return StatusCode::UNAUTHORIZED.into_response(),
//!     };
//!     request.extensions_mut().insert(TenantScope::new(tenant));
//!     next.run(request).await
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let tracker = Arc::new(TenantTokenTracker::new(1_000));
//! let tokens = TenantTokenLayer::new(tracker.clone())
//!     .tenant_from_extension()
//!     .on_missing_tenant(MissingTenant::Unauthorized);
//! // With axum's `.layer`, the layer added last runs first: authentication, then tokens.
//! let app = Router::new()
//!     .route("/v1/chat/completions", post(|| async { "answer" }))
//!     .layer(tokens)
//!     .layer(middleware::from_fn(authenticate));
//!
//! // A client-set x-tenant-id changes nothing: the key decides whose cap is charged.
//! let request = http::Request::post("/v1/chat/completions")
//!     .header("authorization", "Bearer sk-acme")
//!     .header("x-tenant-id", "globex")
//!     .header("x-token-estimate", "600")
//!     .body(axum::body::Body::empty())
//!     .unwrap();
//! let response = app.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(tracker.in_flight("acme"), 600); // held until the body is consumed or dropped
//! assert_eq!(tracker.in_flight("globex"), 0);
//! # }
//! ```
//!
//! # Where the estimate comes from
//!
//! | setting | the estimate is |
//! |---|---|
//! | default, or [`estimate_header(name)`](crate::TenantTokenLayer::estimate_header) | the value of header `x-token-estimate` (or `name`): one header, decimal digits, fitting in 64 bits |
//! | [`estimator(OpenAiEstimator::new())`](crate::OpenAiEstimator) | read from an OpenAI-style JSON body: the prompt's text bytes / 4 plus the output allowance (`max_tokens` and its kin) |
//! | [`Estimator::content_length(bytes_per_token)`](crate::Estimator::content_length) | `Content-Length` divided by `bytes_per_token`, rounded up |
//! | [`Estimator::fixed(tokens)`](crate::Estimator::fixed) | the same for every request |
//! | [`Estimator::from_fn(f)`](crate::Estimator::from_fn) | what `f` computes from the request head |
//! | [`Estimator::from_body_fn(limit, f)`](crate::Estimator::from_body_fn) | what `f` computes from the head and the whole body (read up to `limit` bytes) |
//!
//! What the OpenAI estimator counts, and why, is in [decisions](super::decisions). A
//! request with no estimate gets what
//! [`on_missing_estimate`](crate::TenantTokenLayer::on_missing_estimate) says:
//! [`MissingEstimate::Reject`](crate::MissingEstimate::Reject) (400, the default),
//! [`Default(n)`](crate::MissingEstimate::Default) or
//! [`Unmetered`](crate::MissingEstimate::Unmetered). An estimate that is present but
//! unusable is always refused with 400.
//!
//! The inner service sees a [`RequestBody<B>`](crate::body::RequestBody): the client's body
//! streaming through, or the bytes a body estimator has already read. It must be `Clone`
//! (a ready clone makes the call once the body has been read, as tower's buffering services
//! do); axum's routers accept any body and are `Clone`.
//!
//! # Reconciling with real usage
//!
//! The estimate is what is reserved. A handler that learns what the upstream really used
//! can correct it through a [`ReservationHandle`](crate::ReservationHandle), which the
//! layer puts into each admitted request's extensions when built with
//! [`reservation_handle(true)`](crate::TenantTokenLayer::reservation_handle). The release
//! at the end of the body then returns exactly what is held.
//!
//! - [`resize(n)`](crate::ReservationHandle::resize) sets the tokens held, up or down.
//!   Growth beyond the cap is allowed, because the work is already running (refusing to
//!   count it would only hide it); it shows in the snapshot as
//!   [`overcommits`](crate::TenantTokenState::overcommits).
//! - [`try_resize(n)`](crate::ReservationHandle::try_resize) grows only within the cap.
//! - [`try_resize_async(n)`](crate::ReservationHandle::try_resize_async) does the same for
//!   every ledger: with Redis the growth is checked against every replica's leases.
//!
//! With [shared budgets](super::budgets), each of these resizes the budgets' reservations
//! too, all or none. The handle is off by default because it costs more than the rest of
//! the layer together (it allocates per request); a handler that extracts
//! `Extension<ReservationHandle>` from a layer without it gets axum's 500 "Missing request
//! extension", so turn it on wherever a handler reconciles.
//!
//! ```rust
//! use std::sync::Arc;
//! use axum::{routing::post, Extension, Router};
//! use tower_tenant_tokens::{OpenAiEstimator, ReservationHandle, TenantTokenLayer, TenantTokenTracker};
//!
//! async fn chat(Extension(reservation): Extension<ReservationHandle>) -> &'static str {
//!     // ... call the upstream; it reports 420 tokens used ...
//!     reservation.resize(420);
//!     "answer"
//! }
//!
//! let tracker = Arc::new(TenantTokenTracker::new(50_000));
//! let app: Router = Router::new()
//!     .route("/v1/chat/completions", post(chat))
//!     .layer(
//!         TenantTokenLayer::new(tracker)
//!             .estimator(OpenAiEstimator::new())
//!             .reservation_handle(true),
//!     );
//! ```
//!
//! # The tracker on its own
//!
//! [`TenantTokenTracker`](crate::TenantTokenTracker) is the ledger, usable without the
//! layer (a worker queue, a batch job). [`reserve`](crate::TenantTokenTracker::reserve)
//! admits tokens if they fit under the tenant's cap next to what it already has in flight
//! and returns a [`TokenReservation`](crate::TokenReservation) that gives them back when
//! dropped; [`resize`](crate::TokenReservation::resize) and
//! [`try_resize`](crate::TokenReservation::try_resize) reconcile it exactly. It never blocks.
//!
//! A tenant's cap is the one set with [`set_cap`](crate::TenantTokenTracker::set_cap); else
//! the answer of the cap function given to
//! [`builder(..).cap_fn(f)`](crate::TenantTokenTrackerBuilder::cap_fn); else the default
//! cap. Caps may change at any time: a lowered cap revokes nothing, it gates new work.
//!
//! ```rust
//! use std::sync::Arc;
//! use tower_tenant_tokens::{Error, TenantScope, TenantTokenTracker};
//!
//! let tracker = Arc::new(
//!     TenantTokenTracker::builder(1_000) // the default cap
//!         .cap_fn(|tenant| tenant.starts_with("ent-").then_some(100_000))
//!         .build(),
//! );
//! tracker.set_cap("acme", 2_000); // wins over the cap function and the default
//!
//! let acme = TenantScope::new("acme");
//! let mut first = tracker.reserve(&acme, 1_500)?;
//! assert!(matches!(tracker.reserve(&acme, 600), Err(Error::TenantOverloaded { .. })));
//! assert!(matches!(tracker.reserve(&acme, 5_000), Err(Error::RequestTooLarge { .. })));
//!
//! first.resize(1_200); // the work turned out smaller
//! let _second = tracker.reserve(&acme, 600)?;
//! assert_eq!(tracker.in_flight("acme"), 1_800);
//! drop(first);
//! assert_eq!(tracker.in_flight("acme"), 600);
//! assert_eq!(tracker.cap("ent-globex"), 100_000);
//! # Ok::<(), Error>(())
//! ```
//!
//! # Per-route settings
//!
//! Per-route settings are per-route layers: `Router::route_layer` (or `.layer` on a nested
//! router), each with its own estimator. Layers built on one shared tracker draw from one
//! cap per tenant across their routes; layers on separate trackers have separate caps.
//!
//! ```rust
//! use std::sync::Arc;
//! use axum::{routing::post, Router};
//! use tower_tenant_tokens::{Estimator, OpenAiEstimator, TenantTokenLayer, TenantTokenTracker};
//!
//! let interactive = Arc::new(TenantTokenTracker::new(4_096));
//! let batch = Arc::new(TenantTokenTracker::new(100_000));
//! let chat = Router::new()
//!     .route("/v1/chat/completions", post(|| async { "answer" }))
//!     .route_layer(TenantTokenLayer::new(interactive.clone()).estimator(OpenAiEstimator::new()));
//! let embeddings = Router::new()
//!     .route("/v1/embeddings", post(|| async { "vectors" }))
//!     .route_layer(TenantTokenLayer::new(interactive).estimator(Estimator::content_length(4)));
//! let batches = Router::new()
//!     .route("/v1/batch", post(|| async { "queued" }))
//!     .route_layer(TenantTokenLayer::new(batch)); // its own cap: never eats the interactive one
//! let app: Router = chat.merge(embeddings).merge(batches);
//! ```
//!
//! With `route_layer`, axum runs the layer for a wrong method too, so a `GET` to a `POST`
//! route is refused by the layer (400) before axum would answer 405.
//!
//! # Layer order
//!
//! Layers listed first in `ServiceBuilder` (or added last with axum's `.layer`) run first.
//!
//! - **Inside CORS.** Put `CorsLayer` outside this layer, so preflight `OPTIONS` requests
//!   are answered without a tenant and 429s still carry CORS headers (browsers otherwise
//!   hide them).
//! - **Authentication outside**, so the tenant comes from a verified identity
//!   (`tenant_from_extension`), and unauthenticated traffic is refused before it is
//!   counted.
//! - **A rate limiter outside** (runs first): requests over the rate are refused before
//!   they reserve anything, and every request that reserves tokens has also passed the rate
//!   limit. A request refused by this layer still used up a rate-limit slot.
//! - **A rate limiter inside** (runs after the reservation): a request refused for tokens
//!   does not use up the tenant's request quota, but a request refused by the rate limiter
//!   held its reservation for the (short) time it took to refuse it. Pick this when token
//!   caps are the scarcer resource.
//! - **Timeouts** anywhere: when a timeout drops the inner future, the reservation is
//!   released.
//!
//! # Tenant identity: a security note
//!
//! The tenant decides whose cap a request draws from. A header such as `x-tenant-id` is set
//! by the client, so anyone can charge anyone else's tenant, or spray random ids. Use
//! headers for trials and internal traffic only; in production take the tenant from what
//! your authentication established (`tenant_from_extension` with a `TenantScope` inserted
//! after checking an API key, or [`TenantSource::from_fn`](crate::TenantSource::from_fn)).
//! The tracker is built for hostile ids all the same: ids from headers are length-limited
//! and must be visible ASCII, and the tracker keeps a bounded number of idle tenants
//! ([`max_idle_tenants`](crate::TenantTokenTrackerBuilder::max_idle_tenants)), so a spray
//! of ids cannot grow memory without bound.
//!
//! # Runnable examples
//!
//! Each is compiled in CI, listens on 127.0.0.1 and lists curl lines to try in its header.
//!
//! - `cargo run --example gateway`: an OpenAI-compatible endpoint with a mock upstream,
//!   or with `-- --upstream BASE_URL` a proxy in front of your model server (chat
//!   completions, completions, responses, embeddings and `/v1/messages` metered,
//!   `/v1/models` passed through; `examples/gateway/proxy.rs` is the part to copy);
//!   `--features redis -- --redis URL` shares the cap through Redis, `--features metrics`
//!   serves `/metrics`.
//! - `cargo run --example hyper_server`: the layer on a plain hyper server (hyper-util, no
//!   axum).
//! - `cargo run --example per_route`: different estimators on different routes. Chat (the
//!   OpenAI body estimator) and embeddings (`Content-Length / 4`) each get a `route_layer`
//!   on one shared tracker, so a tenant's chat and embeddings traffic draw from one cap;
//!   `/v1/batch` has its own tracker and a larger cap.
//! - `cargo run --example auth_tenant`: the tenant comes from authentication. A `from_fn`
//!   middleware checks the bearer key, answers 401 itself, and inserts a `TenantScope`; the
//!   token layer runs inside it with `tenant_from_extension()` and
//!   `MissingTenant::Unauthorized`, so a client-set `x-tenant-id` cannot charge another
//!   tenant.
//! - `cargo run --example stacked`: tower_governor (requests per tenant) and this layer
//!   (tokens in flight per tenant), stacked both ways on two route groups, showing the
//!   trade-offs of [layer order](#layer-order).
