//! A reservation held in Redis: the lease, the guard that gives it back, and the calls
//! that resize and release it.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::call::Failure;
use super::headroom::Drawn;
use super::stats::Count;
use super::tracker::Inner;
use crate::reservation::Pending;
use crate::{Error, TokenReservation};

/// The largest token amount Redis keeps exactly (its Lua numbers are doubles); caps and
/// estimates above it count as this.
pub const MAX_REDIS_TOKENS: u64 = (1 << 53) - 1;

pub(super) fn clamp(tokens: u64) -> u64 {
    tokens.min(MAX_REDIS_TOKENS)
}

/// One lease, as this replica knows it. The registry of live leases (renewed in the
/// background) and the reservation that owns it share it.
pub(super) struct Lease {
    /// `replica:sequence`, unique across replicas.
    pub(crate) id: String,
    /// The key in this replica's registry of live leases.
    pub(crate) seq: u64,
    pub(crate) tenant: Arc<str>,
    /// The tenant's hash of leases.
    pub(crate) key: Arc<str>,
    pub(crate) cap: u64,
    /// Tokens held, as this replica last set them.
    pub(crate) tokens: AtomicU64,
    /// The tenant's tokens in flight across replicas when Redis last answered.
    pub(crate) in_flight: AtomicU64,
    /// Redis lost the lease at least once (and this replica registered it again).
    pub(crate) lost: AtomicBool,
    /// Its owner let it go: a background write still queued must not call it lost.
    pub(crate) released: AtomicBool,
    /// Orders this lease's background writes: each writes the value current when it runs.
    pub(crate) write: tokio::sync::Mutex<()>,
}

/// Tokens reserved against a tenant's cap through a
/// [`RedisTokenTracker`](super::RedisTokenTracker); released when dropped.
///
/// Usually a lease in Redis, renewed in the background while it lives, released by a
/// spawned task when dropped (or at once with [`release`](Self::release)); or, with
/// [`local_headroom`](super::RedisTokenTrackerBuilder::local_headroom), a share of the
/// lease this replica holds as headroom, given back to it when dropped. When Redis could
/// not be asked, the tracker's [`FailurePolicy`](super::FailurePolicy) decides what it is
/// instead: a reservation against this replica's share of the cap, or nothing counted at
/// all ([`is_shared`](Self::is_shared) tells).
pub struct RedisReservation {
    kind: Kind,
    tenant: Arc<str>,
}

enum Kind {
    /// Counted in Redis.
    Lease {
        lease: Arc<Lease>,
        inner: Arc<Inner>,
    },
    /// Drawn from this replica's headroom, a lease in Redis it shares with others.
    Drawn(Arc<Drawn>),
    /// Counted against this replica's share of the cap, Redis being unreachable.
    Local(TokenReservation),
    /// Admitted without being counted, Redis being unreachable.
    Uncounted { tokens: u64 },
    /// Released with [`release`](RedisReservation::release).
    Done,
}

impl RedisReservation {
    pub(super) fn lease(lease: Arc<Lease>, inner: Arc<Inner>) -> Self {
        Self {
            tenant: Arc::clone(&lease.tenant),
            kind: Kind::Lease { lease, inner },
        }
    }

    pub(super) fn drawn(drawn: Arc<Drawn>) -> Self {
        Self {
            tenant: Arc::clone(&drawn.headroom.lease.tenant),
            kind: Kind::Drawn(drawn),
        }
    }

    pub(super) fn local(reservation: TokenReservation) -> Self {
        Self {
            tenant: Arc::from(reservation.tenant_id()),
            kind: Kind::Local(reservation),
        }
    }

    pub(super) fn uncounted(tenant: &str, tokens: u64) -> Self {
        Self {
            tenant: Arc::from(tenant),
            kind: Kind::Uncounted { tokens },
        }
    }

    /// The tenant this reservation is charged to.
    pub fn tenant_id(&self) -> &str {
        &self.tenant
    }

    pub(crate) fn tenant(&self) -> Arc<str> {
        Arc::clone(&self.tenant)
    }

    /// The lease's id in Redis, when the reservation is counted there. A reservation drawn
    /// from this replica's [headroom](super::RedisTokenTrackerBuilder::local_headroom)
    /// shares the headroom's lease with the others drawn from it.
    pub fn lease_id(&self) -> Option<&str> {
        match &self.kind {
            Kind::Lease { lease, .. } => Some(&lease.id),
            Kind::Drawn(drawn) => Some(&drawn.headroom.lease.id),
            _ => None,
        }
    }

    /// Whether the reservation is counted in Redis, against the cap all replicas share.
    /// `false` when the failure policy admitted it without Redis.
    pub fn is_shared(&self) -> bool {
        matches!(self.kind, Kind::Lease { .. } | Kind::Drawn(_))
    }

    /// Whether the reservation was admitted from this replica's
    /// [headroom](super::RedisTokenTrackerBuilder::local_headroom), without a round trip.
    pub fn is_drawn_from_headroom(&self) -> bool {
        matches!(self.kind, Kind::Drawn(_))
    }

    /// Whether Redis lost the lease at least once: the server restarted without its data
    /// or was flushed, a failover promoted a replica that lacked it, or this replica could
    /// not renew it for a whole TTL. The work is still running, so this replica registered
    /// it again, whatever the cap, at the next renewal (or resize): at once after a
    /// reconnection, a failover the replica noticed or a failed renewal that goes through
    /// again, and within one renewal period of the loss otherwise.
    pub fn is_lost(&self) -> bool {
        match &self.kind {
            Kind::Lease { lease, .. } => lease.lost.load(Relaxed),
            Kind::Drawn(drawn) => drawn.headroom.lease.lost.load(Relaxed),
            _ => false,
        }
    }

    /// The tokens this reservation holds now.
    pub fn tokens(&self) -> u64 {
        match &self.kind {
            Kind::Lease { lease, .. } => lease.tokens.load(Relaxed),
            Kind::Drawn(drawn) => drawn.tokens.load(Relaxed),
            Kind::Local(reservation) => reservation.tokens(),
            Kind::Uncounted { tokens } => *tokens,
            Kind::Done => 0,
        }
    }

    /// Sets the tokens held, up or down, and returns the amount now held, as
    /// [`TokenReservation::resize`] does: growth is not checked against the cap.
    ///
    /// The new amount counts here at once and is written to Redis by a background task;
    /// when several resizes race, the last one set is the one Redis ends with. Amounts are
    /// capped at 2⁵³ − 1, the largest integer Redis's Lua counts exactly.
    pub fn resize(&mut self, tokens: u64) -> u64 {
        match &mut self.kind {
            Kind::Lease { lease, inner } => {
                let tokens = clamp(tokens);
                lease.tokens.store(tokens, Relaxed);
                inner.write_tokens(lease);
                tokens
            }
            Kind::Drawn(drawn) => {
                let tokens = clamp(tokens);
                drawn.inner.resize_drawn(drawn, tokens);
                tokens
            }
            Kind::Local(reservation) => reservation.resize(tokens),
            Kind::Uncounted { tokens: held } => {
                *held = tokens;
                tokens
            }
            Kind::Done => 0,
        }
    }

    /// Sets the tokens held, growing only if the growth fits under the tenant's cap next
    /// to everything every replica has in flight, checked atomically in Redis.
    ///
    /// # Errors
    ///
    /// [`Error::TenantOverloaded`] when the growth does not fit (nothing changes), and
    /// [`Error::BackendUnavailable`] when Redis could not be asked.
    pub async fn try_resize(&mut self, tokens: u64) -> Result<(), Error> {
        match &mut self.kind {
            Kind::Lease { lease, inner } => inner.try_resize(lease, tokens).await,
            Kind::Drawn(drawn) => drawn.inner.try_resize_drawn(drawn, tokens).await,
            Kind::Local(reservation) => reservation.try_resize(tokens),
            Kind::Uncounted { tokens: held } => {
                *held = tokens;
                Ok(())
            }
            Kind::Done => Ok(()),
        }
    }

    /// Releases the tokens now and waits until Redis has been told. Dropping the
    /// reservation does the same in a background task. A reservation drawn from headroom
    /// goes back to it at once, with nothing to tell Redis.
    pub async fn release(mut self) {
        match std::mem::replace(&mut self.kind, Kind::Done) {
            Kind::Lease { lease, inner } => {
                inner.forget(&lease);
                inner.release(&lease).await;
            }
            Kind::Drawn(drawn) => drawn.inner.give_back(&drawn),
            _ => {}
        }
    }

    /// The tenant's cap and what was left of it when Redis last answered, this
    /// reservation included.
    pub(crate) fn limits(&self) -> Option<(u64, u64)> {
        match &self.kind {
            Kind::Lease { lease, .. } => Some(lease.limits()),
            Kind::Drawn(drawn) => Some(drawn.headroom.lease.limits()),
            Kind::Local(reservation) => Some(reservation.limits()),
            Kind::Uncounted { .. } | Kind::Done => None,
        }
    }

    /// Takes a local reservation's growth check without waiting; a lease's needs Redis.
    pub(crate) fn try_resize_now(&mut self, tokens: u64) -> Option<Result<(), Error>> {
        match &mut self.kind {
            Kind::Lease { lease, .. } if tokens > lease.tokens.load(Relaxed) => None,
            Kind::Lease { .. } => {
                self.resize(tokens);
                Some(Ok(()))
            }
            Kind::Drawn(drawn) => {
                let tokens = clamp(tokens);
                drawn
                    .inner
                    .try_resize_drawn_now(drawn, tokens)
                    .then_some(Ok(()))
            }
            Kind::Local(reservation) => Some(reservation.try_resize(tokens)),
            Kind::Uncounted { tokens: held } => {
                *held = tokens;
                Some(Ok(()))
            }
            Kind::Done => Some(Ok(())),
        }
    }

    /// The growth of a lease, checked in Redis, as a future that borrows nothing: a
    /// handle waits for it without holding its lock.
    pub(crate) fn growth(&self, tokens: u64) -> Pending<()> {
        match &self.kind {
            Kind::Lease { lease, inner } => {
                let (lease, inner) = (Arc::clone(lease), Arc::clone(inner));
                Box::pin(async move { inner.try_resize(&lease, tokens).await })
            }
            Kind::Drawn(drawn) => {
                let drawn = Arc::clone(drawn);
                Box::pin(async move { drawn.inner.try_resize_drawn(&drawn, tokens).await })
            }
            _ => Box::pin(std::future::ready(Ok(()))),
        }
    }
}

impl Drop for RedisReservation {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.kind, Kind::Done) {
            Kind::Lease { lease, inner } => {
                inner.forget(&lease);
                inner.release_later(lease);
            }
            Kind::Drawn(drawn) => drawn.inner.give_back(&drawn),
            _ => {}
        }
    }
}

impl Lease {
    /// The tenant's cap and what was left of it when Redis last answered.
    fn limits(&self) -> (u64, u64) {
        let in_flight = self.in_flight.load(Relaxed);
        (self.cap, self.cap.saturating_sub(in_flight))
    }
}

impl fmt::Debug for RedisReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisReservation")
            .field("tenant_id", &self.tenant_id())
            .field("lease_id", &self.lease_id())
            .field("tokens", &self.tokens())
            .field("inner", &self.is_shared())
            .finish()
    }
}

impl Inner {
    /// Checks growth against the cap in Redis; shrinking always succeeds.
    pub(super) async fn try_resize(
        self: &Arc<Self>,
        lease: &Arc<Lease>,
        tokens: u64,
    ) -> Result<(), Error> {
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
            Ok((_, in_flight)) => Err(Error::TenantOverloaded {
                tenant_id: lease.tenant.to_string(),
                requested: tokens - held,
                in_flight,
                cap: lease.cap,
            }),
            Err(failure) => Err(failure.unavailable()),
        }
    }

    /// Writes a lease's current tokens to Redis in the background (after a resize).
    pub(super) fn write_tokens(self: &Arc<Self>, lease: &Arc<Lease>) {
        let (this, lease) = (Arc::clone(self), Arc::clone(lease));
        self.runtime.spawn(async move {
            let _order = lease.write.lock().await;
            if lease.released.load(Relaxed) {
                return; // the release is on its way, or done
            }
            let tokens = lease.tokens.load(Relaxed);
            match this.resize_call(&lease, tokens, None).await {
                Ok((_, in_flight)) => lease.in_flight.store(in_flight, Relaxed),
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

    /// Sets a lease's tokens in Redis (growth checked against `cap`, if given), first
    /// registering it again if Redis lost it. Returns `{status, in_flight}`.
    pub(super) async fn resize_call(
        self: &Arc<Self>,
        lease: &Arc<Lease>,
        tokens: u64,
        cap: Option<u64>,
    ) -> Result<(i64, u64), Failure> {
        let mut invocation = self.scripts.resize.key(&*lease.key);
        invocation
            .arg(&lease.id)
            .arg(tokens)
            .arg(cap.map(|cap| cap.to_string()).unwrap_or_default())
            .arg(self.ttl_ms())
            .arg(lease.tokens.load(Relaxed));
        let mut conn = self.conn().clone();
        let (status, in_flight, again): (i64, u64, i64) =
            self.timed(invocation.invoke_async(&mut conn)).await?;
        if again == 1 {
            self.registered_again(lease, in_flight);
        }
        Ok((status, in_flight))
    }

    /// Stops renewing a lease that is being released.
    pub(super) fn forget(&self, lease: &Lease) {
        lease.released.store(true, Relaxed);
        self.lock_leases().remove(&lease.seq);
    }

    /// Releases a lease without waiting (in the next batch). Should the batch task be gone
    /// with its runtime, the lease expires.
    pub(super) fn release_later(self: &Arc<Self>, lease: Arc<Lease>) {
        if let Err(lease) = self.batches.release_later(lease, Arc::clone(self)) {
            tracing::debug!(
                tenant = &*lease.tenant,
                lease = lease.id,
                "no runtime to release a lease; it expires after its TTL"
            );
        }
    }

    pub(super) async fn release(&self, lease: &Arc<Lease>) {
        let answer = self.timed(self.batches.release(lease)).await;
        self.released(lease, answer.map_err(|failure| failure.to_string()));
    }

    /// Counts and logs how a release ended.
    pub(super) fn released<T, E: std::fmt::Display>(&self, lease: &Lease, answer: Result<T, E>) {
        match answer {
            Ok(_) => {
                tracing::debug!(tenant = &*lease.tenant, lease = lease.id, "released lease");
                self.wake_after_release(lease);
            }
            Err(failure) => {
                self.counters.add(Count::FailedRelease);
                tracing::warn!(
                    tenant = &*lease.tenant,
                    lease = lease.id,
                    %failure,
                    "could not release a lease in redis; it expires after its TTL"
                );
            }
        }
    }

    /// Counts and logs a lease Redis had lost and this replica registered again. Should
    /// its owner have let it go meanwhile (the release raced the call that registered it
    /// again), it is released once more, so nothing stays behind.
    pub(super) fn registered_again(self: &Arc<Self>, lease: &Arc<Lease>, in_flight: u64) {
        lease.lost.store(true, Relaxed);
        if lease.released.load(Relaxed) {
            return self.release_later(Arc::clone(lease));
        }
        self.counters.add(Count::LostLease);
        let overcommitted = in_flight > lease.cap;
        tracing::warn!(
            tenant = &*lease.tenant,
            lease = lease.id,
            tokens = lease.tokens.load(Relaxed),
            in_flight,
            cap = lease.cap,
            overcommitted,
            "redis had lost a lease still held here (restart, flush, failover, or this \
             replica cut off past the TTL); registered it again"
        );
    }
}
