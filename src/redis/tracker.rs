//! The tracker, and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::{IntoConnectionInfo, RedisError};

use super::conn::Conn;
use super::fair::Subscribe;
use super::policy::FailurePolicy;
use super::queue::Turn;
use super::renew;
use super::reservation::RedisReservation;
use super::scripts::scripts;
use super::shared::{Inner, Settings};
use super::stats::RedisTrackerStats;
use crate::tracker::Caps;
use crate::{Error, TenantTokenTracker};

/// How long a lease lives without renewal by default.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// How often a replica renews its live leases by default.
pub const DEFAULT_RENEW_EVERY: Duration = Duration::from_secs(10);
/// How long one call to Redis may take by default before the failure policy answers.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(100);

/// Enforces a per-tenant cap on tokens in flight across every replica, in Redis.
///
/// Each replica's tracker counts against the same keys, so N replicas admit one cap
/// between them, not N caps. A reservation is a *lease*: Redis keeps its tokens with a
/// deadline on Redis's own clock, this replica renews the deadlines of all its live leases
/// in one batched round trip every [`renew_every`](RedisTokenTrackerBuilder::renew_every),
/// and a lease whose replica crashed simply expires: its capacity is back within one
/// [`lease_ttl`](RedisTokenTrackerBuilder::lease_ttl), with nobody resetting anything.
///
/// Use it in [`TenantTokenLayer::new`](crate::TenantTokenLayer::new) in place of a
/// [`TenantTokenTracker`]; the layer behaves the same, with one round trip to Redis before
/// the inner service is called. Or reserve directly:
///
/// ```no_run
/// use tower_tenant_tokens::redis::{FailurePolicy, RedisTokenTracker};
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
/// Per tenant, one hash, `{prefix}{t:<tenant>}:tokens`: lease id → its tokens and deadline,
/// plus the running sum and a bound on the earliest deadline. Short Lua scripts reserve,
/// resize, renew and release atomically, sweeping the leases whose deadline has passed
/// before anything is refused. Reservations and releases queued together go in one script
/// call (a batch), so a busy replica pays Redis's cost of a script call once for many
/// requests. The key expires at most two TTLs after its last lease (it is kept until then,
/// so that a tenant's next request finds it: making and deleting it would cost Redis more
/// than the reservation).
///
/// Reserving is idempotent per lease id, so a reserve that timed out is released by id;
/// releasing is idempotent; a lease Redis lost while this replica still holds it
/// (restart, flush, failover, a partition longer than the TTL) is registered again at the
/// next renewal, whatever the cap (see `RedisReservation::is_lost`).
///
/// While it holds leases, the tracker does not wait a renewal period to find out that Redis
/// may have lost some: a failed renewal is retried after a short backoff, a new connection
/// (a new master, a cluster slot served by another master, a server restarted) is renewed
/// on at once, the connection is checked between renewals, and behind Sentinels it hears
/// their `+switch-master`. Holding no lease, it sends nothing between periods. The
/// [guide](crate::guide::replicas#when-redis-loses-leases) has the window as measured.
///
/// Caps come from this replica's settings (the default and the cap function) and are
/// checked in Redis against every replica's leases: configure every replica alike.
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
    pub(super) inner: Arc<Inner>,
}

impl RedisTokenTracker {
    /// Starts a tracker where every tenant's cap is `default_cap`.
    pub fn builder(default_cap: u64) -> RedisTokenTrackerBuilder {
        RedisTokenTrackerBuilder {
            settings: Settings {
                caps: Caps::new(default_cap),
                ttl: DEFAULT_LEASE_TTL,
                renew_every: DEFAULT_RENEW_EVERY,
                timeout: DEFAULT_CALL_TIMEOUT,
                policy: FailurePolicy::FailClosed,
                breaker_threshold: 3,
                breaker_cooldown: Duration::from_secs(1),
                prefix: "tenant-tokens:".to_owned(),
                headroom_share: 0,
            },
        }
    }

    /// Reserves `tokens` for `tenant_id` if they fit under its cap next to what every
    /// replica has in flight: from this replica's headroom at once, when it has one with
    /// room (see [`local_headroom`](RedisTokenTrackerBuilder::local_headroom)), otherwise
    /// with a lease of its own, in one round trip.
    ///
    /// # Errors
    ///
    /// [`Error::RequestTooLarge`] and [`Error::TenantOverloaded`] as for
    /// [`TenantTokenTracker::reserve`]; [`Error::BackendUnavailable`] when Redis could not
    /// be asked and the policy is [`FailurePolicy::FailClosed`].
    pub async fn reserve(&self, tenant_id: &str, tokens: u64) -> Result<RedisReservation, Error> {
        match self.reserve_locally(tenant_id, tokens) {
            Some(reservation) => Ok(reservation),
            None => self.reserve_in_redis(tenant_id, tokens).await,
        }
    }

    /// Admits from this replica's headroom, when it has room: `None` means ask Redis.
    pub(crate) fn reserve_locally(&self, tenant_id: &str, tokens: u64) -> Option<RedisReservation> {
        let drawn = self.inner.admit_locally(tenant_id, tokens)?;
        Some(RedisReservation::drawn(drawn, Arc::clone(&self.inner)))
    }

    /// Reserves with a lease of its own in Redis.
    pub(crate) async fn reserve_in_redis(
        &self,
        tenant_id: &str,
        tokens: u64,
    ) -> Result<RedisReservation, Error> {
        Inner::reserve(&self.inner, tenant_id, tokens, true).await
    }

    /// Reserves `tokens` for `tenant_id` in Redis whatever its cap, as
    /// [`TenantTokenTracker::reserve_unchecked`] does in memory: counted like any other
    /// lease, for work that runs regardless (shadow mode). Amounts above
    /// [`MAX_REDIS_TOKENS`](super::MAX_REDIS_TOKENS) count as that.
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
        Inner::reserve(&self.inner, tenant_id, tokens, false).await
    }

    /// Reserves `tokens` of the budget `key` in its turn: at once if nobody waits ahead,
    /// otherwise refused with a ticket that keeps the request's place (see
    /// [`queue`](super::queue)).
    pub(crate) async fn reserve_in_turn(
        &self,
        key: &str,
        tokens: u64,
        turn: &Arc<Turn>,
    ) -> Result<RedisReservation, Error> {
        Inner::reserve_in_turn(&self.inner, key, tokens, turn).await
    }

    /// Tokens `tenant_id` has in flight across every replica now, as Redis counts them
    /// (replicas' [headroom](RedisTokenTrackerBuilder::local_headroom) included, used or
    /// not).
    ///
    /// # Errors
    ///
    /// [`Error::BackendUnavailable`] when Redis could not be asked.
    pub async fn in_flight(&self, tenant_id: &str) -> Result<u64, Error> {
        let inner = &self.inner;
        let invocation = scripts().state.key(inner.key(tenant_id));
        let mut conn = inner.conn().clone();
        let tokens: u64 = inner
            .timed(invocation.invoke_async(&mut conn))
            .await
            .map_err(|failure| failure.unavailable())?;
        Ok(tokens)
    }

    /// The cap that applies to `tenant_id`, from this replica's settings.
    pub fn cap(&self, tenant_id: &str) -> u64 {
        self.inner.cap(tenant_id)
    }

    /// What the tracker has done so far.
    pub fn stats(&self) -> RedisTrackerStats {
        self.inner.counters().stats()
    }

    /// Leases this replica holds now (and renews), its headroom's included.
    pub fn live_leases(&self) -> usize {
        self.inner.leases().len()
    }

    /// Whether the circuit breaker is skipping Redis now.
    pub fn is_circuit_open(&self) -> bool {
        self.inner.breaker().is_open()
    }

    /// The in-memory tracker counting this replica's share of the caps, with
    /// [`FailurePolicy::LocalShare`].
    pub fn local_share(&self) -> Option<&Arc<TenantTokenTracker>> {
        self.inner.fallback().local()
    }
}

impl fmt::Debug for RedisTokenTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

/// Settings for a [`RedisTokenTracker`]; start one with [`RedisTokenTracker::builder`].
#[must_use]
pub struct RedisTokenTrackerBuilder {
    settings: Settings,
}

impl RedisTokenTrackerBuilder {
    /// Looks up a tenant's cap (`None`: the default cap). Called on every reservation, so
    /// keep it fast; every replica should answer alike.
    pub fn cap_fn<F>(mut self, cap_fn: F) -> Self
    where
        F: Fn(&str) -> Option<u64> + Send + Sync + 'static,
    {
        self.settings.caps.set_lookup(cap_fn);
        self
    }

    /// How long a lease lives unless renewed (default [`DEFAULT_LEASE_TTL`]): how soon a
    /// crashed replica's capacity comes back. At least 1 ms.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// How often live leases are renewed (default [`DEFAULT_RENEW_EVERY`]). Keep it well
    /// under the TTL (a third of it by default), so one missed renewal loses nothing.
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.settings.renew_every = every.max(Duration::from_millis(1));
        self
    }

    /// How long one call to Redis may take before the failure policy answers instead
    /// (default [`DEFAULT_CALL_TIMEOUT`]).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = timeout;
        self
    }

    /// What to do when Redis cannot be asked (default [`FailurePolicy::FailClosed`]).
    pub fn on_unavailable(mut self, policy: FailurePolicy) -> Self {
        self.settings.policy = policy;
        self
    }

    /// After `failures` failed calls in a row, skip Redis for `cooldown`, then let one call
    /// probe it (default: 3 failures, 1 s).
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.settings.breaker_threshold = failures;
        self.settings.breaker_cooldown = cooldown;
        self
    }

    /// Lets each replica admit a busy tenant's requests without a round trip to Redis,
    /// from headroom it holds there: a lease of its own per tenant it is serving, kept at
    /// about `percent` % of the tenant's cap above what its requests use (default 0: off;
    /// at most 50).
    ///
    /// The cap holds across replicas as before, since every headroom is a lease counted
    /// against it, renewed, and expiring when its replica dies. What changes is how early
    /// a tenant can be refused: unused headroom counts as in flight, so a request can be
    /// refused while up to `percent` % of the cap per other replica sits unused in their
    /// headroom. When a headroom cannot grow, the tenant is near its cap: that replica
    /// gives back what it does not use for a short while and asks Redis per request, and a
    /// replica whose tenant goes quiet lets its headroom go within two renewal periods.
    /// See the [guide](crate::guide::replicas) for the trade in full.
    ///
    /// Requests too large for a headroom, unchecked reservations (shadow mode), and
    /// requests waiting in a budget's order across replicas always ask Redis; a tracker
    /// whose budgets have requests waiting in that order keeps no headroom, since every
    /// release must reach Redis to wake them.
    pub fn local_headroom(mut self, percent: u8) -> Self {
        self.settings.headroom_share = percent.min(50);
        self
    }

    /// The prefix of every key the tracker writes (default `tenant-tokens:`). Trackers
    /// sharing a prefix share caps; give other applications on the same Redis another one.
    /// On a Redis Cluster keep braces out of it: each key's hash tag must be the tenant's.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.prefix = prefix.into();
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
        let runtime = current_runtime("connect")?;
        let url = url.into_connection_info()?;
        let wake = Subscribe::Nodes(vec![url.clone()]);
        Ok(self.build(Conn::single(url)?, runtime, wake))
    }

    /// Builds the tracker for the Redis Cluster that `nodes` belong to (`redis://host:port`
    /// each; one reachable node is enough, the others are found through it), and starts its
    /// renewal task.
    ///
    /// Each script touches one tenant's keys, which share a hash tag, so each runs on the
    /// master of that tenant's slot; a tenant's lease and a
    /// [shared budget](crate::SharedBudget)'s are separate leases, so they may live on
    /// different masters. Renewals are sent as one pipeline per slot, all at once, and
    /// [`tenants_in_flight`](RedisTokenTracker::tenants_in_flight) walks every master.
    ///
    /// Returns at once: the cluster is connected in the background, and the slot map is
    /// refreshed when the cluster answers `MOVED` (a failover or a resharding). While it
    /// holds leases, the tracker also checks between renewals which master serves each
    /// slot, and renews at once when one moved, registering again the leases a promoted
    /// replica lacked. Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// When `nodes` is empty or one of them is not a Redis address, or no tokio runtime
    /// is running.
    pub fn connect_cluster<T: IntoConnectionInfo>(
        self,
        nodes: impl IntoIterator<Item = T>,
    ) -> Result<RedisTokenTracker, RedisError> {
        let runtime = current_runtime("connect_cluster")?;
        let nodes = nodes
            .into_iter()
            .map(IntoConnectionInfo::into_connection_info)
            .collect::<Result<Vec<_>, _>>()?;
        let wake = Subscribe::Nodes(nodes.clone());
        Ok(self.build(Conn::cluster(nodes)?, runtime, wake))
    }

    /// Builds the tracker for the master that the Sentinels at `sentinels`
    /// (`redis://host:port` each) monitor as `master_name`, and starts its renewal task.
    ///
    /// The master is looked up on first use, by asking the Sentinels in turn (and checking
    /// that the server named is a master), and looked up again after a connection error, a
    /// `READONLY` answer (the server was demoted), a call that ran out of
    /// [`call_timeout`](Self::call_timeout), or, while leases are held, a Sentinel's
    /// `+switch-master` announcing a new master (the tracker subscribes to every Sentinel
    /// then): after a failover the tracker follows the promoted replica, and registers
    /// again at once the leases the promoted replica lacked (see
    /// [`RedisReservation::is_lost`]). Until the Sentinels have promoted a replica, calls
    /// fail and the failure policy answers.
    ///
    /// The master is reached without credentials, on database 0. Must be called within a
    /// tokio runtime.
    ///
    /// # Errors
    ///
    /// When `sentinels` is empty or one of them is not a Redis address, `master_name` is
    /// empty, or no tokio runtime is running.
    pub fn connect_sentinel<T: IntoConnectionInfo>(
        self,
        sentinels: impl IntoIterator<Item = T>,
        master_name: &str,
    ) -> Result<RedisTokenTracker, RedisError> {
        let runtime = current_runtime("connect_sentinel")?;
        let sentinels = sentinels
            .into_iter()
            .map(IntoConnectionInfo::into_connection_info)
            .collect::<Result<Vec<_>, _>>()?;
        let wake = Subscribe::Sentinel(sentinels.clone(), master_name.to_owned());
        Ok(self.build(Conn::sentinel(sentinels, master_name)?, runtime, wake))
    }

    fn build(
        self,
        conn: Conn,
        runtime: tokio::runtime::Handle,
        wake: Subscribe,
    ) -> RedisTokenTracker {
        let inner = Inner::new(
            self.settings,
            conn,
            wake,
            Inner::wake_after_release,
            runtime.clone(),
        );
        runtime.spawn(renew::renew_forever(
            Arc::downgrade(&inner),
            inner.renew_every(),
            Arc::clone(inner.conn().events()),
        ));
        RedisTokenTracker { inner }
    }
}

impl fmt::Debug for RedisTokenTrackerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTokenTrackerBuilder")
            .field("caps", &self.settings.caps)
            .field("lease_ttl", &self.settings.ttl)
            .field("renew_every", &self.settings.renew_every)
            .field("call_timeout", &self.settings.timeout)
            .field("policy", &self.settings.policy)
            .field("prefix", &self.settings.prefix)
            .field("local_headroom", &self.settings.headroom_share)
            .finish_non_exhaustive()
    }
}

/// The runtime `method` was called in, or the error saying there is none.
fn current_runtime(method: &str) -> Result<tokio::runtime::Handle, RedisError> {
    tokio::runtime::Handle::try_current().map_err(|_| {
        RedisError::from((
            redis::ErrorKind::Client,
            "RedisTokenTracker must be built within a tokio runtime",
            format!("RedisTokenTrackerBuilder::{method} was called outside one"),
        ))
    })
}
