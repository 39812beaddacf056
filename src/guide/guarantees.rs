//! Guarantees, and how they are checked.
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
//! # How they are checked
//!
//! Beyond the integration tests through real HTTP (see [testing](super::testing)), the
//! four guarantees are checked five ways, all in CI:
//!
//! - **Interleavings** (`tests/shuttle.rs`, run with
//!   `RUSTFLAGS="--cfg tower_tenant_tokens_shuttle" cargo test --release --test shuttle`):
//!   the tracker built on [shuttle](https://docs.rs/shuttle)'s primitives, explored under
//!   many random and PCT schedules per scenario: concurrent reservations never exceed the
//!   cap and end at zero, an eviction racing an admission never creates a second entry for
//!   a tenant, a sweep never evicts a tenant with work in flight, resizes racing
//!   reservations release exactly. It found one real bug (a release racing a sweep could
//!   leave the idle cache one over its bound), now fixed.
//! - **Properties** (`tests/properties.rs`, proptest): random sequences of reserve /
//!   resize / try_resize / release / set_cap / remove_cap steps against a model, with
//!   evictions: after every step each tenant's in-flight equals the sum of its live
//!   reservations, refusals are exactly the documented ones, and everything ends at zero
//!   within the idle bound. It found two bugs, now fixed (a resize to the same size counted
//!   as an overcommit; a repeated `n` counted at its last value).
//! - **Arbitrary input** (`tests/fuzz_inputs.rs`, proptest): tenant and estimate headers of
//!   arbitrary bytes (controls, `0x80`–`0xFF`, very long values, signs, exponents, huge
//!   numbers) and bodies (arbitrary bytes, mutated chat bodies, deeply nested generated
//!   JSON, bodies around the limit, chunked or not), each answered with the documented
//!   status and JSON error code, nothing reserved, the inner service never reached on a
//!   refusal; plus generated bodies checked against the estimator's written rules. No
//!   panic, no leak. The OpenAI estimator is also checked against the serde-based walk it
//!   replaced on generated, mutated and truncated bodies
//!   (`tests/estimator_differential.rs`), and on a fixed corpus
//!   (`tests/estimator_corpus.rs`).
//! - **Soak** (`tests/soak.rs`, `SOAK_SECS` sets its length): many concurrent clients over
//!   real HTTP on steady tenants plus a spray of one-off ids, with streaming and immediate
//!   answers and injected faults (client disconnects mid-stream, cancels before the
//!   response, handler panics before answering and mid-stream, timeouts outside and inside
//!   the layer, body errors mid-stream). In-flight is sampled against every cap while it
//!   runs; at the end nothing is leaked. The counts of one long run are in the repository's
//!   `benches/README.md`.
//! - **Memory** (`tests/allocations.rs`, a counting allocator): a reserve and release for a
//!   known tenant allocate nothing, and a million requests through the layer, each with a
//!   random tenant id, leave nothing held afterwards but the idle cache, within its bound;
//!   the concurrency tests do the same through HTTP with large bursts of ids.
