//! Decisions worth knowing, and the reasons for them.
//!
//! # Counting
//!
//! - **Tokens are `u64`**, everywhere. Any cap up to `u64::MAX` is safe; a tenant's total
//!   saturates rather than wraps. (The Redis ledger keeps amounts exactly up to 2⁵³ − 1;
//!   see [replicas](super::replicas#caps-configure-replicas-alike).)
//! - **In flight, not per minute.** A rate limiter counts requests that *started* in a
//!   window; an LLM call may stream for minutes and cost a hundred times another. What the
//!   upstream feels is the work in progress, so that is what is capped, and a stream's
//!   tokens are free again the moment it ends. Rate limiters answer a different question
//!   and stack beside this layer (see
//!   [layer order](super::integrating#layer-order)).
//! - **A lowered cap revokes nothing**: it gates new work. Reconciliation growth past the
//!   cap is allowed for work already running (refusing to count it would only hide it) and
//!   shows as [`overcommits`](crate::TenantTokenState::overcommits).
//! - **[`Error::TenantOverloaded`](crate::Error::TenantOverloaded) also says how many tokens
//!   were requested** (`requested`), so its message names tenant, tokens and cap.
//! - **A request larger than the cap is its own error**
//!   ([`Error::RequestTooLarge`](crate::Error::RequestTooLarge), 413 with no
//!   `Retry-After`), not a 429 the client would retry forever.
//!
//! # Requests
//!
//! - **Missing and invalid are different.** The `on_missing_*` policies apply to a request
//!   that has no tenant or no estimate. One that carries an invalid tenant or estimate is
//!   always refused with 400: it is a client bug, and counting it under another id would
//!   hide it.
//! - **Header tenants are validated; extension and function tenants are trusted** (your
//!   code produced them), except that an empty id counts as missing.
//! - **The inner service sees [`RequestBody<B>`](crate::body::RequestBody)** (the client's body
//!   streaming through, or the bytes the body estimator read) and must be `Clone` (a ready
//!   clone makes the call once the body has been read, as tower's buffering services do).
//!   axum's routers accept any body.
//! - **`poll_ready` only forwards to the inner service**; every decision happens in `call`,
//!   and a refusal is an `Ok` response, so the inner error type is unchanged.
//!
//! # The OpenAI estimator
//!
//! [`OpenAiEstimator`](crate::OpenAiEstimator) counts the strings under `messages`,
//! `prompt`, `input`, `instructions`, `system`, `tools`, `functions` (bytes / 4, set with
//! [`bytes_per_token`](crate::OpenAiEstimator::bytes_per_token)) plus integers there
//! (token-id prompts), plus the largest of `max_tokens`, `max_completion_tokens`,
//! `max_output_tokens` (or [`default_output_tokens`](crate::OpenAiEstimator::default_output_tokens)
//! when none is given) times `n`. Inline `data:` URLs (images, audio) are not counted as
//! text. A key given twice counts at its largest and a `null` limit as the default, so a
//! body that servers may read differently never reserves less than one of them may
//! produce. By default it reads at most axum's own default body limit
//! ([`body_limit`](crate::OpenAiEstimator::body_limit)), so that whatever the estimator
//! accepts the handler's extractors accept too.
//!
//! It reads the body in one pass written for the job: it accepts and refuses what
//! serde_json would for the fields it reads (the JSON grammar alone for the fields it
//! skips), and counts the bytes of the strings it needs without copying them. The same
//! pass finds the `"model"` that [`SharedBudget::per_model`](crate::SharedBudget::per_model)
//! keys by.
//!
//! # Refusals
//!
//! - **`Retry-After` defaults to one second**: in-flight capacity frees up as soon as any
//!   stream ends, so a short wait is the honest hint.
//!   [`retry_after_from_in_flight(max)`](crate::TenantTokenLayer::retry_after_from_in_flight)
//!   derives it instead from the layer's mean hold time and how much of what the tenant has
//!   in flight must end first; it is an estimate, not a promise.
//! - **The 429 body says `"type":"tokens"`, `"code":"rate_limit_exceeded"`**, as OpenAI's
//!   own token limits do, so OpenAI SDKs raise their usual rate-limit error.
//! - **Refusals log at `info`** (tenant, tokens, in flight, cap), admissions and releases
//!   at `debug`.
//! - **With `route_layer`, axum runs the layer for a wrong method too**, so a `GET` to a
//!   `POST` route is refused by the layer (400) before axum would answer 405.
//!
//! # Windows over time
//!
//! - **A bucket that refills continuously**, as OpenAI's limits do, not a fixed window
//!   that resets on the minute: a tenant that used its bucket up gets tokens back a little
//!   at a time rather than all at once on the boundary (where every refused client would
//!   retry together), and a `Retry-After` computed from the refill rate is exact. The
//!   worst case is the same as a fixed window's: twice the limit in one period, starting
//!   from a full bucket.
//! - **Charged at admission, kept on release.** A window's charge stays when the request
//!   ends: the tokens were used. It goes down only on what the upstream reported (or a
//!   handler said); a request the client dropped, or the upstream failed, stays charged at
//!   the most it held, since nothing says what the upstream did for it.
//! - **An estimate not told apart counts at the dearer kind** (input or output): a window
//!   that counts one kind only, or a price table, never lets a header estimate through
//!   cheaper than it may turn out.
//! - **An unpriced model is refused** by a spend window without a default price (400
//!   `unpriced_model`), rather than let through free.
//! - **`window_exceeded` is its own code**, not `rate_limit_exceeded`: a client can tell
//!   "come back in a moment" (the in-flight cap) from "come back when the window has
//!   refilled". Both are 429 with `"type":"tokens"`, so OpenAI's SDKs raise their usual
//!   rate-limit error for both.
//! - **In Redis, a window is charged in the lease's own script call**, in a bucket under
//!   the tenant's hash tag: no round trip added, all or nothing with the lease, on Redis's
//!   clock. Its later changes (growth, settlement) are batched in the background: they
//!   are never refused, so nobody needs to wait for them.
//! - **In memory, a returning tenant's bucket is kept beside its tracker entry**, for the
//!   first window that counts every token alike: the request has found the entry, so it
//!   finds the bucket without a lookup, and the charge rides in the guard without an
//!   allocation. A first-time tenant's bucket is not kept there, so a spray of one-off ids
//!   still leaves no buckets behind; a kept bucket lasts as long as the entry, which the
//!   idle bound below bounds. Other windows (several, weighing kinds, spend, per model)
//!   look their buckets up and box their charges.
//!
//! # Memory and hashing
//!
//! - **Idle tenants**: at most
//!   [`max_idle_tenants`](crate::TenantTokenTrackerBuilder::max_idle_tenants) (default
//!   [`TenantTokenTracker::DEFAULT_MAX_IDLE_TENANTS`](crate::TenantTokenTracker::DEFAULT_MAX_IDLE_TENANTS))
//!   are cached. When the bound is passed, the cache is trimmed to three quarters of it (so
//!   clean-ups are rare), tenants seen only once going first, so a spray of one-off ids
//!   evicts itself rather than the steady tenants. A tenant with work in flight is always
//!   tracked. A cap from the cap function is remembered while the tenant is tracked
//!   ([`refresh_caps`](crate::TenantTokenTracker::refresh_caps) asks again); a cap from
//!   [`set_cap`](crate::TenantTokenTracker::set_cap) is configuration and keeps its tenant
//!   tracked until [`remove_cap`](crate::TenantTokenTracker::remove_cap).
//! - **Tenant ids are hashed with foldhash**, seeded at random per tracker (hashbrown's
//!   default hasher, much cheaper than std's SipHash on a short id). Callers choose their
//!   ids, but without the seed they cannot choose ids that collide.
//! - **[`ReservationHandle`](crate::ReservationHandle) is opt-in**
//!   ([`reservation_handle(true)`](crate::TenantTokenLayer::reservation_handle)): it costs
//!   more than the rest of the layer together (a shared slot for the reservation and, in a
//!   request that had no extensions, `http::Extensions`' map), and only handlers that
//!   reconcile need it. A handler that extracts `Extension<ReservationHandle>` from a layer
//!   without it gets axum's 500 "Missing request extension", so turn it on wherever a
//!   handler reconciles.
//!
//! # Redis
//!
//! - **Caps come from each replica's own settings**, passed to Redis with every
//!   reservation and checked there against all replicas' leases: configure replicas alike.
//! - **Leases, not counters**: a crashed replica's tokens come back when its leases expire,
//!   with nobody resetting anything; a lease Redis lost while its work still runs (a
//!   restart, a flush, a failover, a partition longer than the TTL) is registered again,
//!   whatever the cap, within one renewal period, and within moments of the reconnection
//!   after a restart or a failover: an overcommit that is visible and ends
//!   with the work beats a ledger that forgets running work and admits twice the cap.
//! - **Growing a Redis lease within its cap needs
//!   [`try_resize_async`](crate::ReservationHandle::try_resize_async)**: the sync
//!   `try_resize` cannot ask Redis without waiting, so it returns `BackendUnavailable` for
//!   growth.
//! - **The 503's `Retry-After` is the layer's
//!   [`retry_after`](crate::TenantTokenLayer::retry_after)**.
//!
//! The whole picture is in [replicas](super::replicas).
