//! Shared budgets: the upstream's capacity.
//!
//! A tenant's cap protects tenants from each other. The upstream has a capacity of its own
//! that all of them draw from: a provider's tokens-in-flight limit, a deployment's GPUs,
//! one per model. A [`SharedBudget`](crate::SharedBudget) adds such a cap next to the
//! tenant's, with [`TenantTokenLayer::shared_budget`](crate::TenantTokenLayer::shared_budget)
//! (call it once per budget).
//!
//! ```rust
//! use std::sync::Arc;
//! use tower_tenant_tokens::{OpenAiEstimator, SharedBudget, TenantTokenLayer, TenantTokenTracker};
//!
//! let tenants = Arc::new(TenantTokenTracker::new(20_000));
//! let upstream = Arc::new(TenantTokenTracker::new(200_000)); // all tenants together
//! let models = Arc::new(TenantTokenTracker::new(100_000));   // each model, by default…
//! models.set_cap("gpt-4o", 40_000);                          // …or its own cap
//! let layer = TenantTokenLayer::new(tenants)
//!     .estimator(OpenAiEstimator::new())
//!     .shared_budget(SharedBudget::new("upstream", upstream))
//!     .shared_budget(SharedBudget::per_model(models));       // "model" from the JSON body
//! # let _ = layer;
//! ```
//!
//! # All or nothing
//!
//! A request reserves against its tenant and every budget it draws from, all or nothing:
//! when one refuses, what the others granted is released at once, and the refusal names the
//! budget (`budget_exceeded`, 429, or `request_too_large_for_budget`, 413; see
//! [refusals](super::refusals)). The reservations are released together at the end of the
//! response. A handler's [`resize`](crate::ReservationHandle::resize) reconciles them all;
//! [`try_resize`](crate::ReservationHandle::try_resize) grows them all within their caps,
//! or none. [Waiting](super::refusals#waiting-instead-of-an-immediate-429) covers budgets
//! too: a request over a budget waits for it like one over its tenant's cap.
//!
//! ```rust
//! use std::sync::Arc;
//! use axum::{routing::post, Router};
//! use http::StatusCode;
//! use tower::ServiceExt;
//! use tower_tenant_tokens::{SharedBudget, TenantTokenLayer, TenantTokenTracker};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let tenants = Arc::new(TenantTokenTracker::new(800));
//! let upstream = Arc::new(TenantTokenTracker::new(1_000));
//! let app = Router::new()
//!     .route("/v1/chat/completions", post(|| async { "answer" }))
//!     .layer(
//!         TenantTokenLayer::new(tenants.clone())
//!             .shared_budget(SharedBudget::new("upstream", upstream.clone())),
//!     );
//! let request = |tenant: &str, tokens: u64| {
//!     http::Request::post("/v1/chat/completions")
//!         .header("x-tenant-id", tenant)
//!         .header("x-token-estimate", tokens)
//!         .body(axum::body::Body::empty())
//!         .unwrap()
//! };
//!
//! let acme = app.clone().oneshot(request("acme", 700)).await.unwrap();
//! assert_eq!(acme.status(), StatusCode::OK);
//! // globex is within its own cap, but the upstream has only 300 tokens left.
//! let globex = app.clone().oneshot(request("globex", 700)).await.unwrap();
//! assert_eq!(globex.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(tenants.in_flight("globex"), 0); // nothing held: all or nothing
//! assert_eq!(upstream.in_flight("upstream"), 700);
//! # drop(acme);
//! # }
//! ```
//!
//! # The budget's ledger
//!
//! A budget's ledger is an ordinary [`TenantTokenTracker`](crate::TenantTokenTracker) whose
//! "tenants" are the budget keys (`"upstream"`, `"gpt-4o"`, …), so
//! [`set_cap`](crate::TenantTokenTracker::set_cap), the cap function and
//! [`snapshot`](crate::TenantTokenTracker::snapshot) work on budgets as on tenants. Its
//! idle bound limits how many keys it keeps.
//!
//! # Keys
//!
//! - [`SharedBudget::new(name, tracker)`](crate::SharedBudget::new): one budget that every
//!   request draws from.
//! - [`SharedBudget::per_model(tracker)`](crate::SharedBudget::per_model): one budget per
//!   model, keyed by the top-level `"model"` string of an OpenAI-style JSON body. An
//!   [`OpenAiEstimator`](crate::OpenAiEstimator) finds the model in its one pass over the
//!   body; after another body estimator
//!   ([`Estimator::from_body_fn`](crate::Estimator::from_body_fn)) the body is scanned once
//!   more for its model alone. Requests whose body the estimator did not read, or without
//!   a model, do not draw from it. The name comes from the client, so it is bounded: a name longer than
//!   [`SharedBudget::MAX_MODEL_KEY_LEN`](crate::SharedBudget::MAX_MODEL_KEY_LEN) bytes
//!   draws from the budget of its first `MAX_MODEL_KEY_LEN` bytes (a client can neither
//!   escape a budget with a long name nor store megabytes of key).
//! - [`SharedBudget::keyed(tracker, f)`](crate::SharedBudget::keyed): one budget per key
//!   that `f` finds on the request (a header, the path, an extension your routing set, the
//!   body when the estimator read it); a request for which `f` finds none does not draw
//!   from this budget.
//!
//! ```rust
//! use std::sync::Arc;
//! use tower_tenant_tokens::{SharedBudget, TenantTokenTracker};
//!
//! let regions = Arc::new(TenantTokenTracker::new(100_000));
//! let per_region = SharedBudget::keyed(regions, |parts, _body| {
//!     let region = parts.headers.get("x-region")?.to_str().ok()?;
//!     Some(region.to_owned())
//! });
//! # let _ = per_region;
//! ```
//!
//! # One budget for every replica
//!
//! A budget counted in a [`TenantTokenTracker`](crate::TenantTokenTracker) is this
//! process's: three replicas would let three times the upstream's capacity through. Give
//! the budget a Redis tracker instead (feature `redis`; any constructor takes one, see
//! [`TokenLedger`](crate::TokenLedger)) and every replica draws from the one budget. Give
//! it its own key prefix, apart from the tenants' tracker, so a budget key never meets a
//! tenant of the same name:
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_tenant_tokens::redis::RedisTokenTracker;
//! use tower_tenant_tokens::{SharedBudget, TenantTokenLayer};
//!
//! let tenants = RedisTokenTracker::builder(20_000).connect("redis://127.0.0.1:6379")?;
//! let upstream = RedisTokenTracker::builder(200_000)
//!     .key_prefix("tenant-tokens-budget:")
//!     .connect("redis://127.0.0.1:6379")?;
//! let layer = TenantTokenLayer::new(tenants)
//!     .shared_budget(SharedBudget::new("upstream", upstream));
//! # let _ = layer;
//! # Ok(()) }
//! ```
//!
//! The budget's lease and the tenant's are two leases, each in its own keys: the budgets
//! are reserved first, then the tenant's (the other way round when the request may wait,
//! see below), and a refusal of either releases what was granted. A replica that dies
//! between the two steps leaves a lease that expires with its TTL, like any other, so the
//! pair stays all or nothing without a transaction across keys (which a Redis Cluster
//! could not run when they sit in different slots). A
//! handler's growth through
//! [`try_resize_async`](crate::ReservationHandle::try_resize_async) is checked in Redis for
//! each budget; the sync [`try_resize`](crate::ReservationHandle::try_resize) cannot wait
//! for Redis and refuses such growth.
//!
//! # One fair order for every replica
//!
//! With [waiting](crate::TenantTokenLayer::wait_for_capacity) on, the requests that wait
//! for a budget in Redis are ordered in Redis, across every replica, the same way one
//! process orders them: by [`Priority`](crate::Priority) class, then by each tenant's
//! virtual token counter (tokens admitted from the budget ÷ its
//! [weight](crate::TenantTokenLayer::tenant_weight)), first come first served within a
//! tenant on each replica. Nothing else changes in the layer's settings:
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use http::HeaderName;
//! use tower_tenant_tokens::redis::RedisTokenTracker;
//! use tower_tenant_tokens::{SharedBudget, TenantTokenLayer};
//!
//! let tenants = RedisTokenTracker::builder(20_000).connect("redis://127.0.0.1:6379")?;
//! let upstream = RedisTokenTracker::builder(200_000)
//!     .key_prefix("tenant-tokens-budget:")
//!     .connect("redis://127.0.0.1:6379")?;
//! let layer = TenantTokenLayer::new(tenants)
//!     .shared_budget(SharedBudget::new("upstream", upstream))
//!     .wait_for_capacity(Duration::from_secs(20))         // fair across every replica
//!     .priority_header(HeaderName::from_static("x-priority"))
//!     .tenant_weight(|tenant| if tenant == "enterprise-acme" { 3 } else { 1 });
//! # let _ = layer;
//! # Ok(()) }
//! ```
//!
//! Per budget key `K`, under the budget tracker's prefix and the hash tag of the budget's
//! own leases, `{t:K}` (so a Redis Cluster keeps a budget and its queue in one slot, and
//! one script sees both):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{t:K}:tokens` | hash | the budget's leases, as for a tenant (see [replicas](super::replicas)) |
//! | `{t:K}:q:tickets` | hash | each waiting ticket's class and tenant; how many tickets each tenant has in each class |
//! | `{t:K}:q:deadlines` | sorted set | each ticket's deadline, on Redis's clock |
//! | `{t:K}:q:turn:0`, `:1`, `:2` | sorted sets | per class (sheddable, standard, critical): the tenants with tickets, by virtual counter |
//! | `{t:K}:q:vtc` | hash | each tenant's virtual counter, and that of the tenant admitted last, where a tenant back from idle starts when none wait |
//!
//! One script does what one process's queue does under its lock, atomically: it sweeps the
//! tickets past their deadline, then decides. A request without a ticket reserves the
//! budget at once only when no ticket of its class or a higher one waits; otherwise, or
//! when the budget is full, it takes a ticket and waits (a `Sheddable` request is refused
//! instead while any ticket waits). A request holding a ticket reserves only in its
//! turn: its tenant comes first in the highest class with tickets. While the budget is too
//! full for it, the turn stays with it, so capacity is kept for a large request. The same
//! script reserves the budget's lease and counts the tokens in the tenant's counter, so a
//! request admitted at once costs one round trip, as without waiting. A tenant that starts
//! waiting with nothing waiting or running on its replica starts at the smallest counter
//! among the tenants waiting (or, when none wait, at the counter of the tenant admitted
//! last): idle time banks no credit. Equal counters go to the tenant that took its place
//! in line first, and a tenant's next request keeps that place: the order is the one the
//! queue of a single process keeps, request for request.
//!
//! A request that may wait reserves its tenant's lease first and the budget second: over
//! its tenant's cap, it never reaches the budget, so it neither takes the budget's turn
//! nor counts tokens it was not served nor wakes the others by handing back a budget it
//! could not use; while it waits for its own cap it holds no ticket, and the others go.
//!
//! Wake-ups travel by pub/sub: once a release of the budget is done, the releasing replica
//! publishes on `{t:K}:q:wake` if tickets wait, and so do an admission that leaves tickets
//! waiting and a cancelled ticket; each replica listens on one dedicated connection (a
//! pattern subscription to its budgets: to the one server, to any node of a cluster, which
//! passes every message to all its nodes, or to the master the Sentinels name) and wakes
//! its waiting requests, which look again in Redis. Their periodic look remains the safety
//! net for a lost message or capacity that came back otherwise (a shrunk reservation, a
//! raised cap).
//!
//! A ticket expires like a lease: the replica that waits pushes its deadline back in the
//! renewal round trip it makes for its leases, and every script sweeps expired tickets
//! first, so a replica that dies leaves no ticket beyond one lease TTL (until then, the
//! requests behind its tickets wait). A request whose deadline passes, or whose client goes
//! away, gives its ticket up at once; should Redis not hear of it, the ticket expires.
//!
//! Configure every replica alike: a replica whose layer does not wait reserves the budget
//! without looking at the order (it passes the waiting requests) and its releases wake
//! nobody.
//!
//! What is ordered per replica, not across: first come first served within a tenant (a
//! tenant's requests on two replicas may pass each other), and a request that draws from
//! several budgets in Redis holds a place in each, giving up those it won if another
//! refuses it.
