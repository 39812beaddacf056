//! One cap shared by every replica: the ledger in Redis, with expiring leases.

mod breaker;
pub(crate) mod lease;
mod scripts;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::aio::ConnectionManagerConfig;
use redis::{IntoConnectionInfo, RedisError};

use self::breaker::Breaker;
use self::lease::Lease;
use self::scripts::Scripts;
use crate::{Error, TenantTokenTracker};

pub use self::lease::RedisReservation;

/// How long a lease lives without renewal by default.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// How often a replica renews its live leases by default.
pub const DEFAULT_RENEW_EVERY: Duration = Duration::from_secs(10);
/// How long one call to Redis may take by default before the failure policy answers.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(100);

/// The largest token amount Redis keeps exactly (its Lua numbers are doubles); caps and
/// estimates above it count as this.
pub const MAX_REDIS_TOKENS: u64 = (1 << 53) - 1;

pub(crate) fn clamp(tokens: u64) -> u64 {
    tokens.min(MAX_REDIS_TOKENS)
}

type CapFn = dyn Fn(&str) -> Option<u64> + Send + Sync;

/// What a [`RedisTokenTracker`] does with a request when Redis cannot be asked (down,
/// slower than the call timeout, or skipped while the circuit breaker is open).
///
/// Every choice is logged: a `warn` when the breaker opens and when Redis answers again,
/// a `debug` line per request answered by the policy, and the counts in
/// [`RedisTokenTracker::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Refuse: `503 Service Unavailable` with `Retry-After`
    /// ([`Error::BackendUnavailable`]). Nothing is admitted that the shared cap did not
    /// see. The default.
    FailClosed,
    /// Admit without counting: the caps are off until Redis is back.
    FailOpen,
    /// Count against this replica's share of each tenant's cap, `cap / replicas` (at
    /// least 1 token), in memory: with `replicas` replicas running, the tenant can still
    /// not exceed its cap in total.
    LocalShare {
        /// How many replicas share the cap.
        replicas: u32,
    },
}

/// Counts of what a [`RedisTokenTracker`] did, since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisTrackerStats {
    /// Reservations Redis admitted.
    pub admitted: u64,
    /// Reservations Redis refused (over the cap).
    pub refused: u64,
    /// Requests the failure policy answered because Redis could not be asked.
    pub unavailable: u64,
    /// Leases found lost at renewal (expired unrenewed, or gone with the server's data).
    pub lost_leases: u64,
    /// Releases Redis could not be told of; those leases expire after their TTL instead.
    pub failed_releases: u64,
}

#[derive(Default)]
struct Counters {
    admitted: AtomicU64,
    refused: AtomicU64,
    unavailable: AtomicU64,
    lost_leases: AtomicU64,
    failed_releases: AtomicU64,
}

/// Enforces a per-tenant cap on tokens in flight across every replica, in Redis.
///
/// Each replica's tracker counts against the same keys, so N replicas admit one cap
/// between them, not N caps. A reservation is a *lease*: Redis keeps its tokens with a
/// deadline on Redis's own clock, this replica renews the deadlines of all its live leases
/// in one batched round trip every [`renew_every`](RedisTokenTrackerBuilder::renew_every),
/// and a lease whose replica crashed simply expires: its capacity is back within one
/// [`lease_ttl`](RedisTokenTrackerBuilder::lease_ttl), with nobody resetting anything.
///
/// Use it in [`TenantTokenLayer::redis`](crate::TenantTokenLayer::redis) in place of a
/// [`TenantTokenTracker`]; the layer behaves the same, with one round trip to Redis before
/// the inner service is called. Or reserve directly:
///
/// ```no_run
/// use tower_tenant_tokens::{FailurePolicy, RedisTokenTracker};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let tracker = RedisTokenTracker::builder(50_000)
///     .on_unavailable(FailurePolicy::LocalShare { replicas: 3 })
///     .connect("redis://127.0.0.1:6379")?;
/// let reservation = tracker.reserve("acme", 1_200).await?;
/// // ... the upstream call ...
/// reservation.release().await;
/// # Ok(()) }
/// ```
///
/// # In Redis
///
/// Per tenant, two keys under one hash tag (so a cluster keeps them in one slot):
/// `{prefix}{t:<tenant>}:leases`, a sorted set of lease id → deadline, and
/// `{prefix}{t:<tenant>}:tokens`, a hash of lease id → tokens and the running sum. Short Lua
/// scripts reserve, resize, renew and release atomically, each first sweeping the leases
/// whose deadline has passed. Both keys expire when their last lease does.
///
/// Reserving is idempotent per lease id, so a reserve that timed out is released by id;
/// releasing is idempotent; renewal never brings back a lease that expired. Caps come
/// from this replica's settings (the default and the cap function) and are checked in
/// Redis against every replica's leases: configure every replica alike.
///
/// # When Redis is unreachable
///
/// Each call has a timeout ([`call_timeout`](RedisTokenTrackerBuilder::call_timeout)),
/// and after a few failures in a row a circuit breaker skips Redis for a cool-down, so an
/// outage does not add a timeout to every request. Meanwhile the [`FailurePolicy`]
/// answers. Leases admitted before the outage stay counted while Redis lives; their
/// releases, if Redis misses them, expire after the TTL.
///
/// The tracker needs a tokio runtime (it spawns its renewal task and background writes).
#[derive(Clone)]
pub struct RedisTokenTracker {
    shared: Arc<Shared>,
}

/// Everything a tracker's clones, reservations and renewal task share.
pub(crate) struct Shared {
    conn: ConnectionManager,
    scripts: Scripts,
    prefix: String,
    replica: String,
    next_lease: AtomicU64,
    ttl: Duration,
    renew_every: Duration,
    timeout: Duration,
    policy: FailurePolicy,
    default_cap: u64,
    cap_fn: Option<Arc<CapFn>>,
    breaker: Breaker,
    /// This replica's share of the caps, for [`FailurePolicy::LocalShare`].
    local: Option<Arc<TenantTokenTracker>>,
    /// Live leases, for renewal.
    leases: Mutex<HashMap<u64, Arc<Lease>>>,
    runtime: tokio::runtime::Handle,
    counters: Counters,
}

/// Why a call to Redis failed.
enum Failure {
    TimedOut(Duration),
    Redis(RedisError),
}

impl Failure {
    /// A broken connection, which the connection manager is remaking: worth one retry.
    fn is_connection(&self) -> bool {
        matches!(self, Failure::Redis(e) if e.is_io_error() || e.is_unrecoverable_error())
    }

    fn unavailable(&self) -> Error {
        Error::BackendUnavailable {
            reason: format!("redis: {self}"),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::TimedOut(after) => write!(f, "no answer within {after:?}"),
            Failure::Redis(error) => error.fmt(f),
        }
    }
}

impl RedisTokenTracker {
    /// Starts a tracker where every tenant's cap is `default_cap`.
    pub fn builder(default_cap: u64) -> RedisTokenTrackerBuilder {
        RedisTokenTrackerBuilder {
            default_cap,
            cap_fn: None,
            ttl: DEFAULT_LEASE_TTL,
            renew_every: DEFAULT_RENEW_EVERY,
            timeout: DEFAULT_CALL_TIMEOUT,
            policy: FailurePolicy::FailClosed,
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(1),
            prefix: "tenant-tokens:".to_owned(),
        }
    }

    /// Reserves `tokens` for `tenant_id` if they fit under its cap next to what every
    /// replica has in flight.
    ///
    /// # Errors
    ///
    /// [`Error::RequestTooLarge`] and [`Error::TenantOverloaded`] as for
    /// [`TenantTokenTracker::reserve`]; [`Error::BackendUnavailable`] when Redis could not
    /// be asked and the policy is [`FailurePolicy::FailClosed`].
    pub async fn reserve(&self, tenant_id: &str, tokens: u64) -> Result<RedisReservation, Error> {
        Shared::reserve(&self.shared, tenant_id, tokens, true).await
    }

    /// Reserves `tokens` for `tenant_id` in Redis whatever its cap, as
    /// [`TenantTokenTracker::reserve_unchecked`] does in memory: counted like any other
    /// lease, for work that runs regardless (shadow mode). Amounts above
    /// [`MAX_REDIS_TOKENS`] count as that.
    ///
    /// # Errors
    ///
    /// [`Error::BackendUnavailable`] when Redis could not be asked and the policy is
    /// [`FailurePolicy::FailClosed`]; the other policies answer as for
    /// [`reserve`](Self::reserve).
    pub async fn reserve_unchecked(
        &self,
        tenant_id: &str,
        tokens: u64,
    ) -> Result<RedisReservation, Error> {
        Shared::reserve(&self.shared, tenant_id, tokens, false).await
    }

    /// Tokens `tenant_id` has in flight across every replica now, as Redis counts them.
    ///
    /// # Errors
    ///
    /// [`Error::BackendUnavailable`] when Redis could not be asked.
    pub async fn in_flight(&self, tenant_id: &str) -> Result<u64, Error> {
        let shared = &self.shared;
        let keys = shared.keys(tenant_id);
        let mut invocation = shared.scripts.state.key(&keys[0]);
        invocation.key(&keys[1]);
        let mut conn = shared.conn.clone();
        let (tokens, _leases): (u64, u64) = shared
            .timed(invocation.invoke_async(&mut conn))
            .await
            .map_err(|failure| failure.unavailable())?;
        Ok(tokens)
    }

    /// The cap that applies to `tenant_id`, from this replica's settings.
    pub fn cap(&self, tenant_id: &str) -> u64 {
        self.shared.cap(tenant_id)
    }

    /// What the tracker has done so far.
    pub fn stats(&self) -> RedisTrackerStats {
        let c = &self.shared.counters;
        RedisTrackerStats {
            admitted: c.admitted.load(Relaxed),
            refused: c.refused.load(Relaxed),
            unavailable: c.unavailable.load(Relaxed),
            lost_leases: c.lost_leases.load(Relaxed),
            failed_releases: c.failed_releases.load(Relaxed),
        }
    }

    /// Leases this replica holds now (and renews).
    pub fn live_leases(&self) -> usize {
        self.shared.lock_leases().len()
    }

    /// Whether the circuit breaker is skipping Redis now.
    pub fn is_circuit_open(&self) -> bool {
        self.shared.breaker.is_open()
    }

    /// The in-memory tracker counting this replica's share of the caps, with
    /// [`FailurePolicy::LocalShare`].
    pub fn local_share(&self) -> Option<&Arc<TenantTokenTracker>> {
        self.shared.local.as_ref()
    }
}

impl Shared {
    async fn reserve(
        this: &Arc<Self>,
        tenant_id: &str,
        tokens: u64,
        checked: bool,
    ) -> Result<RedisReservation, Error> {
        let cap = this.cap(tenant_id);
        let tokens = if checked { tokens } else { clamp(tokens) };
        // Unchecked, the script is given the largest cap there is; the lease keeps the
        // tenant's own for the headers.
        let limit = if checked { cap } else { MAX_REDIS_TOKENS };
        if tokens > limit {
            return Err(Error::RequestTooLarge {
                tenant_id: tenant_id.to_owned(),
                tokens,
                cap,
            });
        }
        if !this.breaker.allow() {
            return this.unavailable(tenant_id, tokens, checked, "circuit open");
        }
        let seq = this.next_lease.fetch_add(1, Relaxed);
        let lease = Lease {
            id: format!("{}:{seq}", this.replica),
            seq,
            tenant: Arc::from(tenant_id),
            keys: Arc::new(this.keys(tenant_id)),
            cap,
            tokens: AtomicU64::new(tokens),
            in_flight: AtomicU64::new(0),
            lost: Default::default(),
            released: Default::default(),
            write: tokio::sync::Mutex::new(()),
        };
        let pending = Unanswered {
            shared: this,
            lease: Some(Arc::new(lease)),
        };
        let lease = pending.lease.as_deref().expect("just set");
        let mut attempt = 0;
        let answer = loop {
            let mut invocation = this.scripts.reserve.key(&lease.keys[0]);
            invocation
                .key(&lease.keys[1])
                .arg(&lease.id)
                .arg(tokens)
                .arg(limit)
                .arg(this.ttl_ms());
            let mut conn = this.conn.clone();
            match this.timed(invocation.invoke_async(&mut conn)).await {
                // A broken connection is retried once, with the same lease id: if the
                // first attempt did reach Redis, the second admits nothing twice.
                Err(failure) if attempt == 0 && failure.is_connection() => {
                    attempt += 1;
                    tracing::debug!(%failure, "redis reserve failed, retrying once");
                }
                other => break other,
            }
        };
        let (status, in_flight): (i64, u64) = match answer {
            Ok(answer) => answer,
            Err(failure) => {
                let reason = failure.to_string();
                this.breaker.failure(&reason);
                drop(pending); // it may have landed after all: released by id
                return this.unavailable(tenant_id, tokens, checked, &reason);
            }
        };
        this.breaker.success();
        let lease = pending.answered();
        match status {
            1 => {
                this.counters.admitted.fetch_add(1, Relaxed);
                lease.in_flight.store(in_flight, Relaxed);
                this.lock_leases().insert(seq, Arc::clone(&lease));
                Ok(RedisReservation::lease(lease, Arc::clone(this)))
            }
            0 => {
                this.counters.refused.fetch_add(1, Relaxed);
                Err(Error::TenantOverloaded {
                    tenant_id: tenant_id.to_owned(),
                    requested: tokens,
                    in_flight,
                    cap,
                })
            }
            _ => Err(Error::RequestTooLarge {
                tenant_id: tenant_id.to_owned(),
                tokens,
                cap,
            }),
        }
    }

    /// Answers a request Redis could not decide, as the failure policy says.
    fn unavailable(
        &self,
        tenant_id: &str,
        tokens: u64,
        checked: bool,
        reason: &str,
    ) -> Result<RedisReservation, Error> {
        self.counters.unavailable.fetch_add(1, Relaxed);
        tracing::debug!(tenant = tenant_id, tokens, reason, policy = ?self.policy,
            "redis unavailable: the failure policy answers");
        match (self.policy, &self.local) {
            (FailurePolicy::FailOpen, _) => Ok(RedisReservation::uncounted(tenant_id, tokens)),
            (FailurePolicy::LocalShare { .. }, Some(local)) if !checked => Ok(
                RedisReservation::local(local.reserve_unchecked(tenant_id, tokens)),
            ),
            (FailurePolicy::LocalShare { .. }, Some(local)) => {
                match local.reserve_id(tenant_id, tokens) {
                    Ok(reservation) => Ok(RedisReservation::local(reservation)),
                    // Larger than the share, not than the cap: it fits once Redis is back.
                    Err(Error::RequestTooLarge { cap, .. }) => Err(Error::TenantOverloaded {
                        tenant_id: tenant_id.to_owned(),
                        requested: tokens,
                        in_flight: local.in_flight(tenant_id),
                        cap,
                    }),
                    Err(error) => Err(error),
                }
            }
            _ => Err(Error::BackendUnavailable {
                reason: format!("redis: {reason}"),
            }),
        }
    }

    /// Checks growth against the cap in Redis; shrinking always succeeds.
    pub(crate) async fn try_resize(&self, lease: &Lease, tokens: u64) -> Result<(), Error> {
        let tokens = clamp(tokens);
        let _order = lease.write.lock().await;
        let held = lease.tokens.load(Relaxed);
        let cap = (tokens > held).then_some(lease.cap);
        match self.resize_call(lease, tokens, cap).await {
            Ok((1, in_flight)) => {
                lease.tokens.store(tokens, Relaxed);
                lease.in_flight.store(in_flight, Relaxed);
                Ok(())
            }
            Ok((0, in_flight)) => Err(Error::TenantOverloaded {
                tenant_id: lease.tenant.to_string(),
                requested: tokens - held,
                in_flight,
                cap: lease.cap,
            }),
            Ok(_) => {
                self.lost(lease);
                lease.tokens.store(tokens, Relaxed);
                Ok(())
            }
            Err(failure) => Err(failure.unavailable()),
        }
    }

    /// Writes a lease's current tokens to Redis in the background (after a resize).
    pub(crate) fn write_tokens(self: &Arc<Self>, lease: &Arc<Lease>) {
        let (this, lease) = (Arc::clone(self), Arc::clone(lease));
        self.runtime.spawn(async move {
            let _order = lease.write.lock().await;
            if lease.released.load(Relaxed) {
                return; // the release is on its way, or done
            }
            let tokens = lease.tokens.load(Relaxed);
            match this.resize_call(&lease, tokens, None).await {
                Ok((1, in_flight)) => lease.in_flight.store(in_flight, Relaxed),
                Ok(_) if lease.released.load(Relaxed) => {}
                Ok(_) => this.lost(&lease),
                Err(failure) => tracing::warn!(
                    tenant = &*lease.tenant,
                    lease = lease.id,
                    %failure,
                    "could not write a resized lease to redis; the next resize or renewal \
                     may"
                ),
            }
        });
    }

    async fn resize_call(
        &self,
        lease: &Lease,
        tokens: u64,
        cap: Option<u64>,
    ) -> Result<(i64, u64), Failure> {
        let mut invocation = self.scripts.resize.key(&lease.keys[0]);
        invocation
            .key(&lease.keys[1])
            .arg(&lease.id)
            .arg(tokens)
            .arg(cap.map(|cap| cap.to_string()).unwrap_or_default())
            .arg(self.ttl_ms());
        let mut conn = self.conn.clone();
        self.timed(invocation.invoke_async(&mut conn)).await
    }

    /// Stops renewing a lease that is being released.
    pub(crate) fn forget(&self, lease: &Lease) {
        lease.released.store(true, Relaxed);
        self.lock_leases().remove(&lease.seq);
    }

    /// Releases a lease in a spawned task. Should the runtime be gone, the lease expires.
    pub(crate) fn release_later(self: &Arc<Self>, lease: Arc<Lease>) {
        let this = Arc::clone(self);
        self.runtime
            .spawn(async move { this.release(&lease).await });
    }

    pub(crate) async fn release(&self, lease: &Lease) {
        let mut invocation = self.scripts.release.key(&lease.keys[0]);
        invocation.key(&lease.keys[1]).arg(&lease.id);
        let mut conn = self.conn.clone();
        let answer: Result<(i64, u64), Failure> =
            self.timed(invocation.invoke_async(&mut conn)).await;
        match answer {
            Ok(_) => tracing::debug!(tenant = &*lease.tenant, lease = lease.id, "released lease"),
            Err(failure) => {
                self.counters.failed_releases.fetch_add(1, Relaxed);
                tracing::warn!(
                    tenant = &*lease.tenant,
                    lease = lease.id,
                    %failure,
                    "could not release a lease in redis; it expires after its TTL"
                );
            }
        }
    }

    fn lost(&self, lease: &Lease) {
        if !lease.lost.swap(true, Relaxed) {
            self.counters.lost_leases.fetch_add(1, Relaxed);
            tracing::warn!(
                tenant = &*lease.tenant,
                lease = lease.id,
                "lease no longer in redis (expired unrenewed, or the server lost it); \
                 its tokens are not counted any more"
            );
        }
    }

    /// Renews every live lease: one script call per tenant, all in one pipeline.
    async fn renew_all(&self) {
        let mut by_tenant: HashMap<Arc<[String; 2]>, Vec<Arc<Lease>>> = HashMap::new();
        for lease in self.lock_leases().values() {
            if !lease.lost.load(Relaxed) {
                by_tenant
                    .entry(Arc::clone(&lease.keys))
                    .or_default()
                    .push(Arc::clone(lease));
            }
        }
        if by_tenant.is_empty() {
            return;
        }
        let batches: Vec<_> = by_tenant.into_iter().collect();
        let mut pipe = redis::pipe();
        for (keys, leases) in &batches {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.scripts.renew.get_hash())
                .arg(2)
                .arg(&keys[0])
                .arg(&keys[1])
                .arg(self.ttl_ms());
            for lease in leases {
                cmd.arg(&lease.id);
            }
            pipe.add_command(cmd);
        }
        let budget = (self.renew_every / 2).max(self.timeout);
        let mut conn = self.conn.clone();
        let mut answer: Result<Vec<Vec<String>>, RedisError> =
            match tokio::time::timeout(budget, pipe.query_async(&mut conn)).await {
                Ok(answer) => answer,
                Err(_) => return tracing::warn!("renewing leases in redis timed out"),
            };
        if matches!(&answer, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            let reloaded = self
                .scripts
                .renew
                .prepare_invoke()
                .load_async(&mut conn)
                .await;
            answer = match reloaded {
                Ok(_) => pipe.query_async(&mut conn).await,
                Err(error) => Err(error),
            };
        }
        match answer {
            Ok(lost) => {
                let lost: std::collections::HashSet<&String> = lost.iter().flatten().collect();
                let leases = batches.iter().flat_map(|(_, leases)| leases);
                // A lease released while the renewal was on its way is gone, not lost.
                for lease in leases.filter(|lease| lost.contains(&lease.id)) {
                    if !lease.released.load(Relaxed) {
                        self.lost(lease);
                    }
                }
                tracing::trace!(tenants = batches.len(), "renewed leases");
            }
            Err(error) => tracing::warn!(%error, "could not renew leases in redis"),
        }
    }

    async fn timed<T>(
        &self,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(Failure::Redis),
            Err(_) => Err(Failure::TimedOut(self.timeout)),
        }
    }

    fn cap(&self, tenant_id: &str) -> u64 {
        let cap = self
            .cap_fn
            .as_ref()
            .and_then(|cap_fn| cap_fn(tenant_id))
            .unwrap_or(self.default_cap);
        clamp(cap)
    }

    fn keys(&self, tenant_id: &str) -> [String; 2] {
        let prefix = &self.prefix;
        [
            format!("{prefix}{{t:{tenant_id}}}:leases"),
            format!("{prefix}{{t:{tenant_id}}}:tokens"),
        ]
    }

    fn ttl_ms(&self) -> u64 {
        (self.ttl.as_millis() as u64).max(1)
    }

    fn lock_leases(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Lease>>> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A reservation sent to Redis and not answered yet. Dropped unanswered (the call failed or
/// timed out, or the request waiting for it was cancelled), it is released by id in the
/// background, in case Redis applied it: a cancelled request leaves nothing behind for the
/// TTL to clean up.
struct Unanswered<'a> {
    shared: &'a Arc<Shared>,
    lease: Option<Arc<Lease>>,
}

impl Unanswered<'_> {
    fn answered(mut self) -> Arc<Lease> {
        self.lease.take().expect("answered once")
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.shared.release_later(lease);
        }
    }
}

/// Renews a tracker's leases until the tracker, and every reservation it made, is gone.
async fn renew_forever(shared: Weak<Shared>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.renew_all().await;
    }
}

impl fmt::Debug for RedisTokenTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.shared;
        f.debug_struct("RedisTokenTracker")
            .field("replica", &shared.replica)
            .field("prefix", &shared.prefix)
            .field("default_cap", &shared.default_cap)
            .field("lease_ttl", &shared.ttl)
            .field("renew_every", &shared.renew_every)
            .field("call_timeout", &shared.timeout)
            .field("policy", &shared.policy)
            .field("live_leases", &self.live_leases())
            .finish_non_exhaustive()
    }
}

/// Settings for a [`RedisTokenTracker`]; start one with [`RedisTokenTracker::builder`].
#[must_use]
pub struct RedisTokenTrackerBuilder {
    default_cap: u64,
    cap_fn: Option<Arc<CapFn>>,
    ttl: Duration,
    renew_every: Duration,
    timeout: Duration,
    policy: FailurePolicy,
    breaker_threshold: u32,
    breaker_cooldown: Duration,
    prefix: String,
}

impl RedisTokenTrackerBuilder {
    /// Looks up a tenant's cap (`None`: the default cap). Called on every reservation, so
    /// keep it fast; every replica should answer alike.
    pub fn cap_fn<F>(mut self, cap_fn: F) -> Self
    where
        F: Fn(&str) -> Option<u64> + Send + Sync + 'static,
    {
        self.cap_fn = Some(Arc::new(cap_fn));
        self
    }

    /// How long a lease lives unless renewed (default [`DEFAULT_LEASE_TTL`]): how soon a
    /// crashed replica's capacity comes back. At least 1 ms.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// How often live leases are renewed (default [`DEFAULT_RENEW_EVERY`]). Keep it well
    /// under the TTL (a third of it by default), so one missed renewal loses nothing.
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = every.max(Duration::from_millis(1));
        self
    }

    /// How long one call to Redis may take before the failure policy answers instead
    /// (default [`DEFAULT_CALL_TIMEOUT`]).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What to do when Redis cannot be asked (default [`FailurePolicy::FailClosed`]).
    pub fn on_unavailable(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// After `failures` failed calls in a row, skip Redis for `cooldown`, then let one call
    /// probe it (default: 3 failures, 1 s).
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_threshold = failures;
        self.breaker_cooldown = cooldown;
        self
    }

    /// The prefix of every key the tracker writes (default `tenant-tokens:`). Trackers
    /// sharing a prefix share caps; give other applications on the same Redis another one.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Builds the tracker for the Redis at `url` (`redis://host:port/db`, see the `redis`
    /// crate), and starts its renewal task.
    ///
    /// Returns at once: the connection is made on first use and remade whenever it
    /// breaks, so a replica may start while Redis is down (its requests meet the failure
    /// policy until Redis is up). Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// When `url` is not a Redis address, or no tokio runtime is running.
    pub fn connect(self, url: impl IntoConnectionInfo) -> Result<RedisTokenTracker, RedisError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            RedisError::from((
                redis::ErrorKind::Client,
                "RedisTokenTracker::connect must be called within a tokio runtime",
            ))
        })?;
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let local = match self.policy {
            FailurePolicy::LocalShare { replicas } => {
                let replicas = u64::from(replicas.max(1));
                let (default_cap, cap_fn) = (self.default_cap, self.cap_fn.clone());
                let share = move |tenant: &str| {
                    let cap = cap_fn
                        .as_ref()
                        .and_then(|f| f(tenant))
                        .unwrap_or(default_cap);
                    Some((clamp(cap) / replicas).max(1))
                };
                Some(Arc::new(
                    TenantTokenTracker::builder(0).cap_fn(share).build(),
                ))
            }
            _ => None,
        };
        let shared = Arc::new(Shared {
            conn,
            scripts: Scripts::new(),
            prefix: self.prefix,
            replica: replica_id(),
            next_lease: AtomicU64::new(0),
            ttl: self.ttl,
            renew_every: self.renew_every,
            timeout: self.timeout,
            policy: self.policy,
            default_cap: self.default_cap,
            cap_fn: self.cap_fn,
            breaker: Breaker::new(self.breaker_threshold, self.breaker_cooldown),
            local,
            leases: Mutex::new(HashMap::new()),
            runtime: runtime.clone(),
            counters: Counters::default(),
        });
        runtime.spawn(renew_forever(Arc::downgrade(&shared), self.renew_every));
        Ok(RedisTokenTracker { shared })
    }
}

impl fmt::Debug for RedisTokenTrackerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTokenTrackerBuilder")
            .field("default_cap", &self.default_cap)
            .field("cap_fn", &self.cap_fn.is_some())
            .field("lease_ttl", &self.ttl)
            .field("renew_every", &self.renew_every)
            .field("call_timeout", &self.timeout)
            .field("policy", &self.policy)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A replica id unlikely to repeat: std's random hasher keys, the process id and the time.
fn replica_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    format!("{:016x}", hasher.finish())
}
