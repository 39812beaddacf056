//! Several replicas: one cap in Redis.
//!
//! With the in-memory tracker each replica admits up to the cap, so N replicas admit
//! N × cap. The `redis` feature adds `redis::RedisTokenTracker`: the same layer, counting in
//! Redis, one cap for every replica. The `redis` module has its full API (docs.rs builds
//! every feature).
//!
//! ```rust,no_run
//! # #[cfg(feature = "redis")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_tenant_tokens::redis::{FailurePolicy, RedisTokenTracker};
//! use tower_tenant_tokens::{OpenAiEstimator, TenantTokenLayer};
//!
//! let tracker = RedisTokenTracker::builder(50_000)          // default cap per tenant
//!     .cap_fn(|tenant| tenant.starts_with("ent-").then_some(500_000))
//!     .on_unavailable(FailurePolicy::LocalShare { replicas: 3 })
//!     .connect("redis://127.0.0.1:6379")?;                  // lazy: Redis may start later
//! let layer = TenantTokenLayer::new(tracker)              // every builder method as before
//!     .estimator(OpenAiEstimator::new());
//! # let _ = layer;
//! # Ok(())
//! # }
//! # fn main() {}
//! ```
//!
//! `connect` returns at once and must be called within a tokio runtime; the tracker spawns
//! its renewal task and background writes there. Each metered request waits for one round
//! trip to Redis before the inner service is called.
//!
//! Try it with two gateways on one Redis (`redis-server --port 6379 &` first):
//!
//! ```text
//! cargo run --example gateway --features redis -- --redis redis://127.0.0.1:6379
//! cargo run --example gateway --features redis -- --redis redis://127.0.0.1:6379 --addr 127.0.0.1:3001
//! curl -s 127.0.0.1:3001/admin/tenants/acme     # in flight across both, and the cap
//! curl -s 127.0.0.1:3001/admin/tenants          # every tenant with work in flight
//! ```
//!
//! `RedisTokenTracker::tenants_in_flight(limit)` lists the tenants with work in flight
//! across every replica, walking the tracker's keys with `SCAN` (so Redis is never blocked
//! for long; every master of a cluster) and asking for each tenant's count: cheap enough for
//! an admin page.
//!
//! # Leases, not counters
//!
//! A reservation is a lease. Per tenant, Redis keeps one hash
//! (`tenant-tokens:{t:<tenant>}:tokens`, the prefix set by `key_prefix`): lease id → its
//! tokens and deadline (taken from Redis's own `TIME`, so replica clocks do not matter),
//! plus the running sum and the earliest deadline that may have passed, so that finding
//! nothing to sweep costs one field. Short Lua scripts (run by `EVALSHA`, loaded again on
//! `NOSCRIPT`) reserve, resize, renew and release atomically, sweeping leases whose
//! deadline has passed before anything is refused; a replica sends the reservations and
//! releases that queue up while its earlier calls are in flight in one call (a batch), so
//! under load Redis runs one script for many requests. A tenant's hash stays after its
//! last lease, holding 0, until it expires (at most two TTLs later), since making and
//! deleting it would cost Redis more than the reservation. Each replica renews the
//! deadlines of all its live leases in one pipelined round trip every
//! `redis::DEFAULT_RENEW_EVERY`, with leases living
//! `redis::DEFAULT_LEASE_TTL` unless renewed (both configurable: `renew_every`,
//! `lease_ttl`), for as long as the request or its stream lives. So:
//!
//! - a replica that crashes, or is partitioned away, gives its capacity back within one
//!   TTL, with nobody resetting anything (a lost `DECR` in a counter design leaks forever);
//! - a stream longer than the TTL stays counted; a lease Redis lost while its work still
//!   runs is registered again (see below);
//! - reserving is idempotent per lease id: one reconnect-retry is safe, and a reserve that
//!   timed out, failed, or whose request was cancelled while Redis decided is released by
//!   id in the background in case it landed late (nothing waits for the TTL); releasing is
//!   idempotent; a dropped reservation is released by a spawned task;
//! - [`ReservationHandle::resize`](crate::ReservationHandle::resize) counts locally at once
//!   and reaches Redis in a background write (several racing resizes end at the last one
//!   set); [`try_resize_async`](crate::ReservationHandle::try_resize_async) checks growth in
//!   Redis against every replica's leases. The sync
//!   [`try_resize`](crate::ReservationHandle::try_resize) cannot ask Redis without waiting,
//!   so growing a Redis lease through it returns `BackendUnavailable`.
//!
//! # When Redis loses leases
//!
//! Redis can lose leases whose work is still running: a restart without persistence, a
//! `FLUSHALL`, a failover to a replica that lagged, or this replica cut off from Redis
//! for longer than the TTL. Each replica then registers again every lease it still holds
//! that Redis no longer has, at its next renewal (or at the lease's next resize, if
//! sooner; after a restart or a failover that renewal comes at once, below), with the
//! tokens it holds, whatever the cap: the work is running, so the ledger
//! must say so. During that window the lost leases are not counted and new requests may
//! be admitted in their place, so a tenant's work in flight can exceed its cap by at most
//! what was lost, until enough of it ends.
//!
//! The window is kept short by not waiting for the next renewal. While a replica holds
//! leases it renews them, registering the lost ones again in the same call, as soon as it
//! has reason to think Redis may have lost them:
//!
//! - **a new connection**: a new master found through the Sentinels, or a cluster slot
//!   found served by another master (a promoted replica, a resharding);
//! - **a broken one**: any call that finds the connection broken, or the server no
//!   master any more (`READONLY`), has the renewal run at once, so it goes through as
//!   soon as the connection is remade;
//! - **a failed renewal** is tried again after 100 ms, the pause doubling up to 1 s,
//!   rather than a whole period later;
//! - **a failover announced**: behind Sentinels, the replica subscribes to every
//!   Sentinel's `+switch-master` and looks the master up again when its master moves;
//! - **nothing at all**: between renewals, a health check every second (a `PING`; on a
//!   cluster, `CLUSTER SLOTS` from any node and a `PING` to each master) finds a restarted
//!   server, a dead master or a moved slot even when no request comes (with `renew_every`
//!   of a second or less, the renewals themselves do this).
//!
//! A replica that holds no lease does none of this: no health check, no subscription, no
//! retry; only the renewal task's periodic wake-up, which sends nothing. A `FLUSHALL` on a
//! server that stays up breaks no connection, so leases it wipes are registered again at
//! the next renewal, within one renewal period (`renew_every`, plus the round trip).
//!
//! So the window is no longer one renewal period but how long Redis itself takes to be
//! back, plus moments. Measured against real servers and Sentinels with the default
//! lease settings (TTL 30 s, renewal every 10 s), a stream of 800 on a cap of 1,000, and
//! the promoted replica or restarted server lacking the stream's lease (the figures per
//! run are in `benches/README.md`):
//!
//! | what happened | the stream counted again | what bounds it |
//! |---|---|---|
//! | Sentinel failover, requests arriving | 6–12 ms after the Sentinel announced the promotion (was ≈ 17 s) | the `+switch-master` message, one lookup, one renewal |
//! | Sentinel failover, no request | 3–10 ms after the announcement | the same |
//! | Cluster master killed (`cluster-node-timeout` 1 s) | 0.1–1.3 s after the promotion was seen, 2.3–3.7 s after the kill | the cluster's own failover, then the renewal being retried (≤ 1 s apart) |
//! | one server restarted empty at once | 0.48–0.50 s after it answers (was up to a renewal period) | the next health check (every second) |
//! | one server back after 2.5 s down | 0.10–0.12 s after it answers | the next retry (≤ 1 s apart) |
//!
//! Five runs of each; after each, a second request of 800 was refused.
//!
//! Where the Sentinels' message does not reach the replica (its subscription is down),
//! the health check still finds the master dead and the retries follow it to the promoted
//! one within about a second of the promotion. A renewal that cannot go through within
//! half a renewal period (a server that stopped answering without closing its
//! connections) is retried the same way. After the window a second request that does not
//! fit is refused again.
//!
//! The excess is visible: Redis's count of the tenant (`RedisTokenTracker::in_flight`) is
//! over the cap and refuses new work until it is below,
//! `RedisReservation::is_lost` is true for each lease registered again,
//! `stats().lost_leases` counts them, and each is logged at `warn` with the tenant's count
//! and cap. A lease released while it was being registered again is released once more,
//! so nothing stays behind.
//!
//! # Headroom: admitting without a round trip
//!
//! Every request asks Redis once by default, so its latency includes a round trip and a
//! busy gateway's throughput is bounded by its Redis. `local_headroom(percent)` trades a
//! little precision for neither: each replica holds, per tenant it is serving, one more
//! lease in Redis of about `percent` % of the tenant's cap above what its requests use,
//! and admits that tenant's requests from it at once, in memory. A background task per
//! tenant keeps the headroom topped up (growth checked against the cap in Redis, like any
//! reservation) and gives back what goes unused.
//!
//! ```rust,no_run
//! # #[cfg(feature = "redis")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_tenant_tokens::redis::RedisTokenTracker;
//! use tower_tenant_tokens::TenantTokenLayer;
//!
//! let tracker = RedisTokenTracker::builder(200_000)
//!     .local_headroom(5)                                    // 5 % of each cap per replica
//!     .connect("redis://127.0.0.1:6379")?;
//! let layer = TenantTokenLayer::new(tracker.clone());
//! let reservation = tracker.reserve("acme", 2_000).await?;  // from headroom, once it is held
//! assert!(reservation.is_shared());
//! # let _ = (layer, reservation.is_drawn_from_headroom());
//! # Ok(())
//! # }
//! # fn main() {}
//! ```
//!
//! What holds, and what changes:
//!
//! - **The cap holds across replicas as before.** A headroom is a lease like any other:
//!   counted against the cap, renewed with the others, registered again if Redis loses
//!   it, and expiring if its replica dies, so a crash still heals within one TTL.
//! - **A tenant can be refused a little early.** Unused headroom counts as in flight, so
//!   a request may be refused while up to `percent` % of the cap per other replica sits
//!   unused there (and `in_flight`, `tenants_in_flight` and the rate-limit headers count
//!   headroom as in flight). Near the cap this shrinks on its own: when a replica's
//!   headroom cannot grow, that replica gives back what it does not use, for a short
//!   while asks Redis per request as without headroom, then tries again.
//! - **Requests larger than a headroom's step ask Redis**, one lease each, as do
//!   unchecked reservations (shadow mode) and requests admitted in a budget's fair order.
//!   A tracker whose budgets have had requests waiting in that order keeps no headroom,
//!   since every release must reach Redis to wake them.
//! - **A quiet tenant's headroom goes** at the second renewal after its last request, once
//!   nothing drawn from it is held; dropping the tracker's last handle releases the rest.
//!   When `cap_fn` changes a tenant's cap, the headroom made under the old cap stops
//!   admitting, gives back what it does not use and goes once drained; the next one is
//!   made under the new cap.
//! - **A headroom admits only while Redis is known to hold it**: for half a TTL after the
//!   call that last set or renewed its lease was sent (the lease lives a whole TTL from
//!   then, on Redis's clock). So it keeps admitting through a short Redis outage, within
//!   what Redis counted before it. If Redis lost the lease meanwhile (below), what was
//!   admitted from it is uncounted until a renewal registers it again, like any lost
//!   lease: the overcommit window grows by what the headroom held, not longer.
//! - `RedisReservation::is_drawn_from_headroom` tells which reservations came from it, and
//!   `stats().admitted_locally` counts them.
//!
//! # Caps: configure replicas alike
//!
//! Caps come from each replica's own settings (the default and `cap_fn`), passed to Redis
//! with every reservation and checked there against all replicas' leases, so every replica
//! must be configured alike. Redis's Lua counts in doubles, so amounts and caps are capped
//! at 2⁵³ − 1 tokens (`redis::MAX_REDIS_TOKENS`). [Shared budgets](super::budgets) are
//! counted in Redis too when their ledger is a Redis tracker (one budget for every
//! replica), in each process otherwise.
//!
//! [Waiting for capacity](super::refusals#waiting-instead-of-an-immediate-429) works with
//! the Redis tracker too. Requests waiting for a budget in Redis keep one fair order across
//! every replica, in Redis, and are woken by pub/sub from any replica's release (see
//! [one fair order for every replica](super::budgets#one-fair-order-for-every-replica));
//! those waiting for their tenant's cap queue per process, woken by that replica's
//! releases, and find capacity freed elsewhere when they look again.
//!
//! # When Redis is unreachable
//!
//! Redis is unreachable when it is down, or slower than the call timeout
//! (`redis::DEFAULT_CALL_TIMEOUT` unless set with `call_timeout`). Then the
//! `redis::FailurePolicy` answers:
//!
//! | `FailurePolicy` | the request gets |
//! |---|---|
//! | `FailClosed` (default) | `503` + `Retry-After`: nothing is admitted that the shared cap did not see |
//! | `FailOpen` | admitted, not counted (caps are off until Redis is back) |
//! | `LocalShare { replicas }` | counted in memory against `cap / replicas`, so the replicas together still stay within the cap; over the share is `429` (it fits again once Redis is back) |
//!
//! After a number of failures in a row a circuit breaker skips Redis for a cool-down, then
//! lets one call probe it, so an outage does not add a timeout to every request (both set
//! with `circuit_breaker`). The breaker opening and closing are logged at `warn`, each
//! request answered by the policy at `debug`, and `RedisTokenTracker::stats()` counts
//! admitted, refused, unavailable, lost leases and failed releases. The 503's
//! `Retry-After` is the layer's [`retry_after`](crate::TenantTokenLayer::retry_after).
//!
//! The connection is remade by redis-rs's `ConnectionManager`; nothing needs a restart when
//! Redis comes back. A Redis Cluster and a Sentinel-watched master reconnect too (below).
//!
//! # Redis Cluster and Sentinel
//!
//! The same tracker runs on one server (`connect`), a Redis Cluster (`connect_cluster`) or
//! the master a set of Sentinels watch (`connect_sentinel`). All three come with the
//! `redis` feature (redis-rs's `cluster-async` and `sentinel`; no feature of their own, as
//! they add little to the build); the default features have no Redis at all.
//!
//! ```rust,no_run
//! # #[cfg(feature = "redis")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_tenant_tokens::redis::RedisTokenTracker;
//!
//! // Any reachable nodes of the cluster; the others are found through them.
//! let on_a_cluster = RedisTokenTracker::builder(50_000)
//!     .connect_cluster(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"])?;
//! // The Sentinels, and the name they watch the master under.
//! let behind_sentinels = RedisTokenTracker::builder(50_000).connect_sentinel(
//!     ["redis://10.0.0.5:26379", "redis://10.0.0.6:26379", "redis://10.0.0.7:26379"],
//!     "mymaster",
//! )?;
//! # let _ = (on_a_cluster, behind_sentinels);
//! # Ok(())
//! # }
//! # fn main() {}
//! ```
//!
//! Both return at once, like `connect`, and return an error (never panic) for an address
//! that is not a Redis URL, an empty list, or an empty master name. The gateway example
//! takes `--redis-cluster URL[,URL…]` and `--redis-sentinel URL[,URL…] --sentinel-master
//! NAME`.
//!
//! **On a cluster**, every script touches one tenant's two keys, which share the hash tag
//! `{t:<tenant>}`, so each runs atomically on the master of that tenant's slot; tenants
//! spread over the masters. A [shared budget](super::budgets) is a tracker of its own whose
//! "tenants" are the budget's keys, so a budget usually lives on another master than the
//! tenant drawing from it. That stays all or nothing because the two are separate leases,
//! reserved one after the other: a refusal of the second releases the first, and a
//! replica that dies between the two leaves a lease that expires with its TTL. Batched
//! reservations and releases go one tenant per script call, renewal sends one pipeline per
//! slot, all at once (a cluster refuses a script or a pipeline that crosses slots), and
//! `tenants_in_flight` walks every master with `SCAN` in turn. The cluster
//! client follows `MOVED` redirections, so a cluster failover or a resharding needs no
//! restart; leases a promoted cluster replica lacked are registered again as soon as the
//! replica's health check sees the slot served by another master, or a retried renewal
//! goes through ([above](#when-redis-loses-leases)).
//!
//! **Behind Sentinels**, the tracker asks the Sentinels for the master on first use (and
//! checks that the server named really is a master), and asks again after a connection
//! error, a `READONLY` answer (the server was demoted) or a call that ran past the call
//! timeout (the master may be cut off), and, while it holds leases, when a Sentinel
//! announces a new master (`+switch-master`). After a failover: calls fail (and the
//! failure policy answers) until the Sentinels have promoted a replica, typically their
//! `down-after-milliseconds` plus the election; the replica then connects to the new master
//! and registers again at once the leases the promoted replica lacked (replication is
//! asynchronous, so the last writes before the crash may be missing), whether or not a
//! request arrives. From the kill to every lease counted again takes the Sentinels'
//! failover plus moments ([measured above](#when-redis-loses-leases));
//! `tests/redis_cluster.rs` measures it. The master is reached without credentials, on
//! database 0.
//!
//! # The tracker on its own
//!
//! `RedisTokenTracker` can be used without the layer:
//!
//! ```rust,no_run
//! # #[cfg(feature = "redis")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_tenant_tokens::redis::{FailurePolicy, RedisTokenTracker};
//!
//! let tracker = RedisTokenTracker::builder(50_000)
//!     .on_unavailable(FailurePolicy::FailClosed)
//!     .connect("redis://127.0.0.1:6379")?;
//! let reservation = tracker.reserve("acme", 1_200).await?;
//! // ... the upstream call ...
//! reservation.release().await;
//! # Ok(())
//! # }
//! # fn main() {}
//! ```
//!
//! How all this is tested against real `redis-server`s is in the repository's
//! `CONTRIBUTING.md`.
