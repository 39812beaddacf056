//! The reservation a [`RedisTokenTracker`](super::RedisTokenTracker) hands out, and what
//! resizing and releasing it does.

use std::fmt;
use std::sync::Arc;

use super::headroom::HeadroomShare;
use super::lease::{clamp, Lease};
use super::shared::Inner;
use crate::step::Pending;
use crate::{Error, TokenReservation};

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
    counted: CountedIn,
    tenant: Arc<str>,
}

/// Where a Redis reservation is counted.
enum CountedIn {
    /// Counted in Redis.
    Lease {
        lease: Arc<Lease>,
        inner: Arc<Inner>,
    },
    /// HeadroomShare from this replica's headroom, a lease in Redis it shares with others.
    HeadroomShare {
        drawn: Arc<HeadroomShare>,
        inner: Arc<Inner>,
    },
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
            tenant: Arc::clone(lease.tenant()),
            counted: CountedIn::Lease { lease, inner },
        }
    }

    #[inline]
    pub(super) fn drawn(drawn: HeadroomShare, inner: Arc<Inner>) -> Self {
        Self {
            tenant: Arc::clone(drawn.headroom().lease().tenant()),
            counted: CountedIn::HeadroomShare {
                drawn: Arc::new(drawn),
                inner,
            },
        }
    }

    pub(super) fn local(reservation: TokenReservation) -> Self {
        Self {
            tenant: Arc::from(reservation.tenant_id()),
            counted: CountedIn::Local(reservation),
        }
    }

    pub(super) fn uncounted(tenant: &str, tokens: u64) -> Self {
        Self {
            tenant: Arc::from(tenant),
            counted: CountedIn::Uncounted { tokens },
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
        match &self.counted {
            CountedIn::Lease { lease, .. } => Some(lease.id()),
            CountedIn::HeadroomShare { drawn, .. } => Some(drawn.headroom().lease().id()),
            _ => None,
        }
    }

    /// Whether the reservation is counted in Redis, against the cap all replicas share.
    /// `false` when the failure policy admitted it without Redis.
    pub fn is_shared(&self) -> bool {
        matches!(
            self.counted,
            CountedIn::Lease { .. } | CountedIn::HeadroomShare { .. }
        )
    }

    /// Whether the reservation was admitted from this replica's
    /// [headroom](super::RedisTokenTrackerBuilder::local_headroom), without a round trip.
    pub fn is_drawn_from_headroom(&self) -> bool {
        matches!(self.counted, CountedIn::HeadroomShare { .. })
    }

    /// Whether Redis lost the lease at least once: the server restarted without its data
    /// or was flushed, a failover promoted a replica that lacked it, or this replica could
    /// not renew it for a whole TTL. The work is still running, so this replica registered
    /// it again, whatever the cap, at the next renewal (or resize): at once after a
    /// reconnection, a failover the replica noticed or a failed renewal that goes through
    /// again, and within one renewal period of the loss otherwise.
    pub fn is_lost(&self) -> bool {
        match &self.counted {
            CountedIn::Lease { lease, .. } => lease.is_lost(),
            CountedIn::HeadroomShare { drawn, .. } => drawn.headroom().lease().is_lost(),
            _ => false,
        }
    }

    /// The tokens this reservation holds now.
    pub fn tokens(&self) -> u64 {
        match &self.counted {
            CountedIn::Lease { lease, .. } => lease.tokens(),
            CountedIn::HeadroomShare { drawn, .. } => drawn.tokens(),
            CountedIn::Local(reservation) => reservation.tokens(),
            CountedIn::Uncounted { tokens } => *tokens,
            CountedIn::Done => 0,
        }
    }

    /// Sets the tokens held, up or down, and returns the amount now held, as
    /// [`TokenReservation::resize`] does: growth is not checked against the cap.
    ///
    /// The new amount counts here at once and is written to Redis by a background task;
    /// when several resizes race, the last one set is the one Redis ends with. Amounts are
    /// capped at 2⁵³ − 1, the largest integer Redis's Lua counts exactly.
    pub fn resize(&mut self, tokens: u64) -> u64 {
        match &mut self.counted {
            CountedIn::Lease { lease, inner } => {
                let tokens = clamp(tokens);
                lease.set_tokens(tokens);
                inner.write_tokens(lease);
                tokens
            }
            CountedIn::HeadroomShare { drawn, inner } => {
                let tokens = clamp(tokens);
                inner.resize_drawn(drawn, tokens);
                tokens
            }
            CountedIn::Local(reservation) => reservation.resize(tokens),
            CountedIn::Uncounted { tokens: held } => {
                *held = tokens;
                tokens
            }
            CountedIn::Done => 0,
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
        match &mut self.counted {
            CountedIn::Lease { lease, inner } => inner.try_resize(lease, tokens).await,
            CountedIn::HeadroomShare { drawn, inner } => {
                inner.try_resize_drawn(drawn, tokens).await
            }
            CountedIn::Local(reservation) => reservation.try_resize(tokens),
            CountedIn::Uncounted { tokens: held } => {
                *held = tokens;
                Ok(())
            }
            CountedIn::Done => Ok(()),
        }
    }

    /// Releases the tokens now and waits until Redis has been told. Dropping the
    /// reservation does the same in a background task. A reservation drawn from headroom
    /// goes back to it at once, with nothing to tell Redis.
    pub async fn release(mut self) {
        match std::mem::replace(&mut self.counted, CountedIn::Done) {
            CountedIn::Lease { lease, inner } => {
                inner.forget(&lease);
                inner.release(&lease).await;
            }
            CountedIn::HeadroomShare { drawn, inner } => inner.give_back(&drawn),
            _ => {}
        }
    }

    /// The tenant's cap and what was left of it when Redis last answered, this
    /// reservation included.
    pub(crate) fn limits(&self) -> Option<(u64, u64)> {
        match &self.counted {
            CountedIn::Lease { lease, .. } => Some(lease.limits()),
            CountedIn::HeadroomShare { drawn, .. } => Some(drawn.headroom().lease().limits()),
            CountedIn::Local(reservation) => Some(reservation.limits()),
            CountedIn::Uncounted { .. } | CountedIn::Done => None,
        }
    }

    /// Takes a local reservation's growth check without waiting; a lease's needs Redis.
    pub(crate) fn try_resize_now(&mut self, tokens: u64) -> Option<Result<(), Error>> {
        match &mut self.counted {
            CountedIn::Lease { lease, .. } if tokens > lease.tokens() => None,
            CountedIn::Lease { .. } => {
                self.resize(tokens);
                Some(Ok(()))
            }
            CountedIn::HeadroomShare { drawn, .. } => {
                let tokens = clamp(tokens);
                drawn.try_resize_now(tokens).then_some(Ok(()))
            }
            CountedIn::Local(reservation) => Some(reservation.try_resize(tokens)),
            CountedIn::Uncounted { tokens: held } => {
                *held = tokens;
                Some(Ok(()))
            }
            CountedIn::Done => Some(Ok(())),
        }
    }

    /// The growth of a lease, checked in Redis, as a future that borrows nothing: a
    /// handle waits for it without holding its lock.
    pub(crate) fn growth(&self, tokens: u64) -> Pending<()> {
        match &self.counted {
            CountedIn::Lease { lease, inner } => {
                let (lease, inner) = (Arc::clone(lease), Arc::clone(inner));
                Box::pin(async move { inner.try_resize(&lease, tokens).await })
            }
            CountedIn::HeadroomShare { drawn, inner } => {
                let (drawn, inner) = (Arc::clone(drawn), Arc::clone(inner));
                Box::pin(async move { inner.try_resize_drawn(&drawn, tokens).await })
            }
            _ => Box::pin(std::future::ready(Ok(()))),
        }
    }
}

impl Drop for RedisReservation {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.counted, CountedIn::Done) {
            CountedIn::Lease { lease, inner } => {
                inner.forget(&lease);
                inner.release_later(lease);
            }
            CountedIn::HeadroomShare { drawn, inner } => inner.give_back(&drawn),
            _ => {}
        }
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
