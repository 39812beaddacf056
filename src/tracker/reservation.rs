//! The RAII guard for tokens reserved against a tenant's cap.

use std::fmt;

use crate::sync::Arc;

use super::entry::{Entry, Refusal};
use crate::Error;

/// Tokens held against a tenant's cap; released when dropped.
///
/// Created by [`TenantTokenTracker::reserve`](crate::TenantTokenTracker::reserve). Dropping
/// it returns exactly what it holds, whether the work succeeded, failed, was cancelled or
/// panicked. [`resize`](Self::resize) reconciles an estimate with actual usage *through the
/// reservation*, so the release that follows is still exact.
///
/// ```
/// use std::sync::Arc;
/// use tower_tenant_tokens::{TenantScope, TenantTokenTracker};
///
/// let tracker = Arc::new(TenantTokenTracker::new(1_000));
/// let mut reservation = tracker.reserve(&TenantScope::new("acme"), 600)?;
/// reservation.resize(250); // the call used less than estimated
/// assert_eq!(tracker.in_flight("acme"), 250);
/// drop(reservation);
/// assert_eq!(tracker.in_flight("acme"), 0);
/// # Ok::<(), tower_tenant_tokens::Error>(())
/// ```
pub struct TokenReservation {
    entry: Arc<Entry>,
    tokens: u64,
}

impl TokenReservation {
    pub(crate) fn new(entry: Arc<Entry>, tokens: u64) -> Self {
        Self { entry, tokens }
    }

    /// The tenant this reservation is charged to.
    pub fn tenant_id(&self) -> &str {
        &self.entry.id
    }

    /// The tenant's bucket of a token window, kept beside its entry, and whether the
    /// tenant was seen before this request (only then is a bucket kept there).
    pub(crate) fn kept_bucket(&self) -> (&crate::window::KeptBucket, bool) {
        (&self.entry.bucket, self.entry.was_reused())
    }

    /// The ledger entry, for a handle that must name the tenant after the release.
    pub(crate) fn entry(&self) -> Arc<Entry> {
        Arc::clone(&self.entry)
    }

    /// The tokens this reservation holds now.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Sets the tokens held to `tokens`, up or down, and returns the amount now held.
    ///
    /// Growth is not checked against the cap: the work was admitted and is running, and
    /// refusing to account for what it really uses would only hide it. When growth takes
    /// the tenant above its cap, the overshoot is visible in the snapshot
    /// ([`TenantTokenState::overcommits`](crate::TenantTokenState::overcommits)) and new
    /// reservations are refused until the tenant is back under it. Use
    /// [`try_resize`](Self::try_resize) to grow only within the cap.
    ///
    /// The tenant's total saturates at `u64::MAX`; the return value tells what is held when
    /// that bound cut the growth short.
    pub fn resize(&mut self, tokens: u64) -> u64 {
        if tokens > self.tokens {
            self.tokens += self.entry.grow(tokens - self.tokens);
        } else if tokens < self.tokens {
            self.entry.shrink(self.tokens - tokens);
            self.tokens = tokens;
        }
        self.tokens
    }

    /// Like [`resize`](Self::resize), but growth must fit under the tenant's cap next to
    /// everything else in flight; otherwise nothing changes and the error says why.
    pub fn try_resize(&mut self, tokens: u64) -> Result<(), Error> {
        if tokens <= self.tokens {
            self.resize(tokens);
            return Ok(());
        }
        let delta = tokens - self.tokens;
        match self.entry.try_grow(delta) {
            Ok(()) => {
                self.tokens = tokens;
                Ok(())
            }
            Err(refusal) => Err(Error::from_refusal(self.tenant_id(), delta, refusal)),
        }
    }

    /// The tenant's cap and what is left of it now, this reservation included.
    pub(crate) fn limits(&self) -> (u64, u64) {
        let cap = self.entry.cap();
        (cap, cap.saturating_sub(self.entry.in_flight()))
    }

    /// Releases the tokens now. The same as dropping the reservation.
    pub fn release(self) {}
}

impl Drop for TokenReservation {
    fn drop(&mut self) {
        self.entry.shrink(self.tokens);
        self.entry.end_reservation();
    }
}

impl fmt::Debug for TokenReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReservation")
            .field("tenant_id", &self.tenant_id())
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl Error {
    pub(crate) fn from_refusal(tenant_id: &str, tokens: u64, refusal: Refusal) -> Self {
        match refusal {
            Refusal::TooLarge { cap } => Error::RequestTooLarge {
                tenant_id: tenant_id.to_owned(),
                tokens,
                cap,
            },
            Refusal::Overloaded { in_flight, cap } => Error::TenantOverloaded {
                tenant_id: tenant_id.to_owned(),
                requested: tokens,
                in_flight,
                cap,
            },
        }
    }
}
