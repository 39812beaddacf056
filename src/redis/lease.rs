//! A reservation held in Redis: the lease, and the guard that gives it back.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::{clamp, Shared};
use crate::{Error, TokenReservation};

/// One lease, as this replica knows it. The registry of live leases (renewed in the
/// background) and the reservation that owns it share it.
pub(crate) struct Lease {
    /// `replica:sequence`, unique across replicas.
    pub(crate) id: String,
    /// The key in this replica's registry of live leases.
    pub(crate) seq: u64,
    pub(crate) tenant: Arc<str>,
    /// The tenant's sorted set of deadlines and hash of tokens.
    pub(crate) keys: Arc<[String; 2]>,
    pub(crate) cap: u64,
    /// Tokens held, as this replica last set them.
    pub(crate) tokens: AtomicU64,
    /// The tenant's tokens in flight across replicas when Redis last answered.
    pub(crate) in_flight: AtomicU64,
    /// Redis no longer holds the lease (it expired unrenewed, or the server lost it).
    pub(crate) lost: AtomicBool,
    /// Its owner let it go: a background write still queued must not call it lost.
    pub(crate) released: AtomicBool,
    /// Orders this lease's background writes: each writes the value current when it runs.
    pub(crate) write: tokio::sync::Mutex<()>,
}

/// Tokens reserved against a tenant's cap through a
/// [`RedisTokenTracker`](crate::RedisTokenTracker); released when dropped.
///
/// Usually a lease in Redis, renewed in the background while it lives, released by a
/// spawned task when dropped (or at once with [`release`](Self::release)). When Redis could
/// not be asked, the tracker's [`FailurePolicy`](crate::FailurePolicy) decides what it is
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
        shared: Arc<Shared>,
    },
    /// Counted against this replica's share of the cap, Redis being unreachable.
    Local(TokenReservation),
    /// Admitted without being counted, Redis being unreachable.
    Uncounted { tokens: u64 },
    /// Released with [`release`](RedisReservation::release).
    Done,
}

impl RedisReservation {
    pub(crate) fn lease(lease: Arc<Lease>, shared: Arc<Shared>) -> Self {
        Self {
            tenant: Arc::clone(&lease.tenant),
            kind: Kind::Lease { lease, shared },
        }
    }

    pub(crate) fn local(reservation: TokenReservation) -> Self {
        Self {
            tenant: Arc::from(reservation.tenant_id()),
            kind: Kind::Local(reservation),
        }
    }

    pub(crate) fn uncounted(tenant: &str, tokens: u64) -> Self {
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

    /// The lease's id in Redis, when the reservation is counted there.
    pub fn lease_id(&self) -> Option<&str> {
        match &self.kind {
            Kind::Lease { lease, .. } => Some(&lease.id),
            _ => None,
        }
    }

    /// Whether the reservation is counted in Redis, against the cap all replicas share.
    /// `false` when the failure policy admitted it without Redis.
    pub fn is_shared(&self) -> bool {
        matches!(self.kind, Kind::Lease { .. })
    }

    /// Whether Redis has dropped the lease: it expired without being renewed (this replica
    /// could not reach Redis for a whole TTL) or the server lost its data. The tokens are
    /// then no longer counted anywhere; the reservation is never recreated behind the
    /// other replicas' backs.
    pub fn is_lost(&self) -> bool {
        match &self.kind {
            Kind::Lease { lease, .. } => lease.lost.load(Relaxed),
            _ => false,
        }
    }

    /// The tokens this reservation holds now.
    pub fn tokens(&self) -> u64 {
        match &self.kind {
            Kind::Lease { lease, .. } => lease.tokens.load(Relaxed),
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
            Kind::Lease { lease, shared } => {
                let tokens = clamp(tokens);
                lease.tokens.store(tokens, Relaxed);
                shared.write_tokens(lease);
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
            Kind::Lease { lease, shared } => shared.try_resize(lease, tokens).await,
            Kind::Local(reservation) => reservation.try_resize(tokens),
            Kind::Uncounted { tokens: held } => {
                *held = tokens;
                Ok(())
            }
            Kind::Done => Ok(()),
        }
    }

    /// Releases the tokens now and waits until Redis has been told. Dropping the
    /// reservation does the same in a background task.
    pub async fn release(mut self) {
        if let Kind::Lease { lease, shared } = std::mem::replace(&mut self.kind, Kind::Done) {
            shared.forget(&lease);
            shared.release(&lease).await;
        }
    }

    /// The tenant's cap and what was left of it when Redis last answered, this
    /// reservation included.
    pub(crate) fn limits(&self) -> Option<(u64, u64)> {
        match &self.kind {
            Kind::Lease { lease, .. } => Some((
                lease.cap,
                lease.cap.saturating_sub(lease.in_flight.load(Relaxed)),
            )),
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
            Kind::Local(reservation) => Some(reservation.try_resize(tokens)),
            Kind::Uncounted { tokens: held } => {
                *held = tokens;
                Some(Ok(()))
            }
            Kind::Done => Some(Ok(())),
        }
    }

    /// For a handle that must check growth in Redis without holding its lock across the
    /// wait: the lease and the tracker it belongs to.
    pub(crate) fn lease_parts(&self) -> Option<(Arc<Lease>, Arc<Shared>)> {
        match &self.kind {
            Kind::Lease { lease, shared } => Some((Arc::clone(lease), Arc::clone(shared))),
            _ => None,
        }
    }
}

impl Drop for RedisReservation {
    fn drop(&mut self) {
        if let Kind::Lease { lease, shared } = std::mem::replace(&mut self.kind, Kind::Done) {
            shared.forget(&lease);
            shared.release_later(lease);
        }
    }
}

impl fmt::Debug for RedisReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisReservation")
            .field("tenant_id", &self.tenant_id())
            .field("lease_id", &self.lease_id())
            .field("tokens", &self.tokens())
            .field("shared", &self.is_shared())
            .finish()
    }
}
