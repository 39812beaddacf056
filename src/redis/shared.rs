//! What a tracker's clones, its reservations and its background tasks share: the parts
//! of the tracker, and the calls that write a lease to Redis.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;
use tokio::runtime::Handle;

use super::batch::{self, Batches, Owner};
use super::breaker::Breaker;
use super::call::{Calls, Failure};
use super::conn::Conn;
use super::fair::{Fair, Subscribe};
use super::headroom::Headrooms;
use super::keys::Keys;
use super::lease::{clamp, Lease, Leases};
use super::policy::{FailurePolicy, Fallback};
use super::scripts::scripts;
use super::stats::{Count, Counters};
use super::watch::watch_sentinels;
use crate::tracker::Caps;
use crate::Error;

/// What a tracker is built from: its builder's settings.
pub(super) struct Settings {
    pub(super) caps: Caps,
    pub(super) ttl: Duration,
    pub(super) renew_every: Duration,
    pub(super) timeout: Duration,
    pub(super) policy: FailurePolicy,
    pub(super) breaker_threshold: u32,
    pub(super) breaker_cooldown: Duration,
    pub(super) prefix: String,
    pub(super) headroom_share: u8,
}

/// Everything a tracker's clones, reservations and background tasks share.
pub(super) struct Inner {
    calls: Calls,
    breaker: Breaker,
    /// Reservations and releases waiting to be sent together.
    batches: Batches,
    keys: Keys,
    leases: Arc<Leases>,
    caps: Caps,
    fallback: Fallback,
    ttl: Duration,
    renew_every: Duration,
    headrooms: Headrooms,
    /// The fair queues of the budgets this tracker counts, and where it hears wake-ups.
    fair: Fair,
    counters: Counters,
    runtime: Handle,
    /// Wakes the requests waiting in a fair queue once a release went through. The queue
    /// is built on the leases, so the tracker hands its wake-up in.
    wake_waiters: fn(&Inner, &Lease),
}

impl Inner {
    /// The tracker's shared part, its batches sent by a task on `runtime`.
    pub(super) fn new(
        settings: Settings,
        conn: Conn,
        wake: Subscribe,
        wake_waiters: fn(&Inner, &Lease),
        runtime: Handle,
    ) -> Arc<Self> {
        let (batches, queue) = Batches::new();
        let inner = Arc::new(Self {
            calls: Calls::new(conn, settings.timeout),
            breaker: Breaker::new(settings.breaker_threshold, settings.breaker_cooldown),
            batches,
            keys: Keys::new(settings.prefix),
            leases: Arc::new(Leases::new()),
            fallback: Fallback::new(settings.policy, &settings.caps),
            caps: settings.caps,
            ttl: settings.ttl,
            renew_every: settings.renew_every,
            headrooms: Headrooms::new(settings.headroom_share),
            fair: Fair::new(wake),
            counters: Counters::default(),
            runtime,
            wake_waiters,
        });
        let (calls, script) = (inner.calls.clone(), scripts().batch.clone());
        let tracker = Arc::downgrade(&inner);
        let batches = batch::send_forever(queue, tracker, calls, script, inner.ttl_ms());
        inner.runtime.spawn(batches);
        inner
    }

    /// Awaits `call`, giving up after the call timeout.
    pub(super) fn timed<'a, T: 'a>(
        &'a self,
        call: impl Future<Output = Result<T, RedisError>> + 'a,
    ) -> impl Future<Output = Result<T, Failure>> + 'a {
        self.calls.timed(call)
    }

    /// The connection to call through.
    pub(super) fn conn(&self) -> &Conn {
        self.calls.conn()
    }

    /// How long one call may take.
    pub(super) fn timeout(&self) -> Duration {
        self.calls.timeout()
    }

    pub(super) fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    pub(super) fn batches(&self) -> &Batches {
        &self.batches
    }

    pub(super) fn keys(&self) -> &Keys {
        &self.keys
    }

    pub(super) fn leases(&self) -> &Leases {
        &self.leases
    }

    pub(super) fn headrooms(&self) -> &Headrooms {
        &self.headrooms
    }

    pub(super) fn fallback(&self) -> &Fallback {
        &self.fallback
    }

    pub(super) fn fair(&self) -> &Fair {
        &self.fair
    }

    pub(super) fn counters(&self) -> &Counters {
        &self.counters
    }

    pub(super) fn runtime(&self) -> &Handle {
        &self.runtime
    }

    pub(super) fn cap(&self, tenant_id: &str) -> u64 {
        let cap = self.caps.of(tenant_id);
        clamp(cap)
    }

    /// The hash of `tenant_id`'s leases.
    pub(super) fn key(&self, tenant_id: &str) -> String {
        self.keys.tokens(tenant_id)
    }

    /// What every key starts with.
    pub(super) fn prefix(&self) -> &str {
        self.keys.prefix()
    }

    /// This replica's id, the first part of each of its lease and ticket ids.
    pub(super) fn replica(&self) -> &str {
        self.leases.replica()
    }

    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    pub(super) fn ttl_ms(&self) -> u64 {
        (self.ttl.as_millis() as u64).max(1)
    }

    pub(super) fn renew_every(&self) -> Duration {
        self.renew_every
    }

    /// A new lease of `tokens` for `tenant_id`, whose cap is `cap`, with this replica's next
    /// id.
    pub(super) fn new_lease(&self, tenant_id: &str, cap: u64, tokens: u64) -> Lease {
        self.leases
            .new_lease(tenant_id, self.key(tenant_id), cap, tokens)
    }

    /// Keeps `lease` for renewal. The first lease held starts the checks that notice a
    /// failover or a restart while the replica is otherwise idle.
    pub(super) fn hold(&self, lease: &Arc<Lease>) {
        if self.leases.hold(lease) {
            self.conn().events().held();
            watch_sentinels(self.conn(), &self.leases, &self.runtime);
        }
    }

    /// Stops renewing a lease that is being released.
    pub(super) fn forget(&self, lease: &Lease) {
        self.leases.forget(lease);
    }

    pub(super) fn holds_leases(&self) -> bool {
        !self.leases.is_empty()
    }

    /// Checks growth against the cap in Redis; shrinking always succeeds.
    pub(super) async fn try_resize(
        self: &Arc<Self>,
        lease: &Arc<Lease>,
        tokens: u64,
    ) -> Result<(), Error> {
        let tokens = clamp(tokens);
        let _order = lease.order().await;
        let held = lease.tokens();
        let cap = (tokens > held).then_some(lease.cap());
        match self.resize_call(lease, tokens, cap).await {
            Ok((1, in_flight)) => {
                lease.set_tokens(tokens);
                lease.set_in_flight(in_flight);
                Ok(())
            }
            Ok((_, in_flight)) => Err(Error::TenantOverloaded {
                tenant_id: lease.tenant().to_string(),
                requested: tokens - held,
                in_flight,
                cap: lease.cap(),
            }),
            Err(failure) => Err(failure.unavailable()),
        }
    }

    /// Writes a lease's current tokens to Redis in the background (after a resize).
    pub(super) fn write_tokens(self: &Arc<Self>, lease: &Arc<Lease>) {
        let (this, lease) = (Arc::clone(self), Arc::clone(lease));
        self.runtime.spawn(async move {
            let _order = lease.order().await;
            if lease.is_released() {
                return; // the release is on its way, or done
            }
            let tokens = lease.tokens();
            match this.resize_call(&lease, tokens, None).await {
                Ok((_, in_flight)) => lease.set_in_flight(in_flight),
                Err(failure) => tracing::warn!(
                    tenant = &**lease.tenant(),
                    lease = lease.id(),
                    %failure,
                    "could not write a resized lease to redis; the next resize or renewal \
                     may"
                ),
            }
        });
    }

    /// Sets a lease's tokens in Redis (growth checked against `cap`, if given), first
    /// registering it again if Redis lost it. Returns `{status, in_flight}`.
    pub(super) async fn resize_call(
        self: &Arc<Self>,
        lease: &Arc<Lease>,
        tokens: u64,
        cap: Option<u64>,
    ) -> Result<(i64, u64), Failure> {
        let mut invocation = scripts().resize.key(&**lease.key());
        invocation
            .arg(lease.id())
            .arg(tokens)
            .arg(cap.map(|cap| cap.to_string()).unwrap_or_default())
            .arg(self.ttl_ms())
            .arg(lease.tokens());
        let mut conn = self.conn().clone();
        let (status, in_flight, again): (i64, u64, i64) =
            self.timed(invocation.invoke_async(&mut conn)).await?;
        if again == 1 {
            self.registered_again(lease, in_flight);
        }
        Ok((status, in_flight))
    }

    /// Releases a lease without waiting (in the next batch). Should the batch task be gone
    /// with its runtime, the lease expires.
    pub(super) fn release_later(self: &Arc<Self>, lease: Arc<Lease>) {
        if let Err(lease) = self.batches.release_later(lease, Arc::clone(self)) {
            tracing::debug!(
                tenant = &**lease.tenant(),
                lease = lease.id(),
                "no runtime to release a lease; it expires after its TTL"
            );
        }
    }

    pub(super) async fn release(&self, lease: &Arc<Lease>) {
        let answer = self.timed(self.batches.release(lease)).await;
        let answer = answer.as_ref().map(drop);
        self.released(
            lease,
            answer.map_err(|failure| failure as &dyn fmt::Display),
        );
    }

    /// Counts and logs a lease Redis had lost and this replica registered again. Should
    /// its owner have let it go meanwhile (the release raced the call that registered it
    /// again), it is released once more, so nothing stays behind.
    pub(super) fn registered_again(self: &Arc<Self>, lease: &Arc<Lease>, in_flight: u64) {
        lease.set_lost();
        if lease.is_released() {
            return self.release_later(Arc::clone(lease));
        }
        self.counters.add(Count::LostLease);
        let overcommitted = in_flight > lease.cap();
        tracing::warn!(
            tenant = &**lease.tenant(),
            lease = lease.id(),
            tokens = lease.tokens(),
            in_flight,
            cap = lease.cap(),
            overcommitted,
            "redis had lost a lease still held here (restart, flush, failover, or this \
             replica cut off past the TTL); registered it again"
        );
    }
}

impl Owner for Inner {
    fn released(&self, lease: &Lease, answer: Result<(), &dyn fmt::Display>) {
        match answer {
            Ok(_) => {
                tracing::debug!(
                    tenant = &**lease.tenant(),
                    lease = lease.id(),
                    "released lease"
                );
                (self.wake_waiters)(self, lease);
            }
            Err(failure) => {
                self.counters.add(Count::FailedRelease);
                tracing::warn!(
                    tenant = &**lease.tenant(),
                    lease = lease.id(),
                    %failure,
                    "could not release a lease in redis; it expires after its TTL"
                );
            }
        }
    }
}

impl Drop for Inner {
    /// The last handle on the tracker is gone (no reservation is drawn from its headroom
    /// any more, each held one): its headroom leases are released rather than left to
    /// expire.
    fn drop(&mut self) {
        let leases = self.headrooms.take_leases();
        if leases.is_empty() {
            return;
        }
        let (script, mut conn) = (scripts().batch.clone(), self.conn().clone());
        let (ttl, timeout) = (self.ttl_ms(), self.timeout());
        self.runtime.spawn(async move {
            for lease in leases {
                let invocation = batch::release_alone(&script, ttl, &lease);
                let released = invocation.invoke_async::<Vec<i64>>(&mut conn);
                if !matches!(tokio::time::timeout(timeout, released).await, Ok(Ok(_))) {
                    tracing::debug!(
                        tenant = &**lease.tenant(),
                        lease = lease.id(),
                        "could not release a headroom lease; it expires after its TTL"
                    );
                }
            }
        });
    }
}

impl fmt::Debug for Inner {
    /// Shown as the tracker.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTokenTracker")
            .field("replica", &self.replica())
            .field("prefix", &self.prefix())
            .field("caps", &self.caps)
            .field("lease_ttl", &self.ttl)
            .field("renew_every", &self.renew_every)
            .field("call_timeout", &self.timeout())
            .field("policy", &self.fallback.policy())
            .field("live_leases", &self.leases.len())
            .finish_non_exhaustive()
    }
}
