//! Guarantees: what holds whatever happens to a request.
//!
//! # Guarantees
//!
//! These hold whatever happens to a request (completed, failed, cancelled, panicked, or
//! disconnected mid-stream), and each has tests:
//!
//! 1. A tenant's tokens in flight never exceed its cap (except reconciliation growth and
//!    shadow mode, which are counted and visible as
//!    [`overcommits`](crate::TenantTokenState::overcommits)); the same holds for
//!    [shared budgets](super::budgets).
//! 2. When every request has ended, every tenant and budget is at 0, no request is left
//!    waiting, and the tracker holds at most its bound of idle tenants.
//! 3. A refused or malformed request reserves nothing and never reaches the inner service;
//!    with budgets, a request holds all its reservations or none.
//! 4. Each reservation is released exactly once.
//!
//! With Redis, 1 and 2 hold for the tenant's total across replicas while Redis answers; a
//! replica that dies gives its share back within one lease TTL (see
//! [replicas](super::replicas)), and leaves no waiting ticket beyond one TTL either (see
//! [budgets](super::budgets#one-fair-order-for-every-replica)).
//!
//! The reservation is held until the response **body** has ended, not the response head:
//! a stream counts until its last chunk, and a consumer that stops polling once a body
//! reports its end (an exact `Content-Length`) still releases it. Timeouts, cancelled
//! futures and dropped bodies release through `Drop`.
//!
//! The tracker's hot path takes no global lock: tenants are spread over sharded maps, a
//! known tenant is found under a shard's read lock, and its counters are atomics, so
//! admission and release allocate nothing for a tenant already present (and neither does
//! the layer, unless it is asked to put a
//! [`ReservationHandle`](crate::ReservationHandle) in the request extensions). Lock
//! poisoning cannot leak tokens: no code under those locks can panic half-way.
//!
//! How each is checked (interleavings under shuttle, properties, arbitrary input, soaks,
//! allocation counts) is in the repository's `CONTRIBUTING.md`.
