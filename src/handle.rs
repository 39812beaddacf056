//! The handler's view of its request's reservation.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::tracker::entry::Entry;
use crate::{Error, TokenReservation};

type Slot = Mutex<Option<TokenReservation>>;

/// A handle to the reservation of the request being served, found in its extensions.
///
/// The layer inserts one into every request it admits, so a handler can reconcile the
/// estimate with what the upstream really used, as often as it learns more (an agent
/// endpoint making several upstream calls, a stream reporting usage at its end). The
/// reservation itself stays with the response: it is released when the response body ends
/// or is dropped, whoever still holds a handle. After that, the handle's methods do nothing.
///
/// ```
/// use axum::{Extension, Json};
/// use tower_tenant_tokens::ReservationHandle;
///
/// async fn chat(Extension(reservation): Extension<ReservationHandle>) -> Json<u64> {
///     let used = 420; // what the upstream reported
///     reservation.resize(used);
///     Json(reservation.tokens())
/// }
/// ```
#[derive(Clone)]
pub struct ReservationHandle {
    slot: Arc<Slot>,
    /// Names the tenant even after the release; holds no tokens.
    entry: crate::sync::Arc<Entry>,
}

impl ReservationHandle {
    /// The tenant the reservation is charged to.
    pub fn tenant_id(&self) -> &str {
        &self.entry.id
    }

    /// Tokens held now; 0 once released.
    pub fn tokens(&self) -> u64 {
        self.lock().as_ref().map_or(0, TokenReservation::tokens)
    }

    /// Whether the reservation has been released (its response ended).
    pub fn is_released(&self) -> bool {
        self.lock().is_none()
    }

    /// Sets the tokens held, up or down, as [`TokenReservation::resize`] does (growth past
    /// the cap is allowed and counted). Returns what is held now; 0 once released.
    pub fn resize(&self, tokens: u64) -> u64 {
        self.lock().as_mut().map_or(0, |r| r.resize(tokens))
    }

    /// Sets the tokens held, growing only within the cap, as
    /// [`TokenReservation::try_resize`] does. Does nothing once released.
    ///
    /// # Errors
    ///
    /// [`Error::TenantOverloaded`] when the growth does not fit under the cap now.
    pub fn try_resize(&self, tokens: u64) -> Result<(), Error> {
        match self.lock().as_mut() {
            Some(reservation) => reservation.try_resize(tokens),
            None => Ok(()),
        }
    }

    /// No code holding this lock can leave the reservation half-changed, so poisoning is
    /// ignored rather than allowed to leak tokens.
    fn lock(&self) -> MutexGuard<'_, Option<TokenReservation>> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for ReservationHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReservationHandle")
            .field("tenant_id", &self.tenant_id())
            .field("tokens", &self.tokens())
            .finish()
    }
}

/// Owns a request's reservation on the layer's side and releases it when dropped.
///
/// Shared with a [`ReservationHandle`] when the layer hands one to the request (one small
/// allocation), owned outright when it does not.
pub(crate) enum Guard {
    Owned(TokenReservation),
    Shared(ReservationHandle),
}

impl Guard {
    pub(crate) fn new(reservation: TokenReservation, with_handle: bool) -> Self {
        if !with_handle {
            return Guard::Owned(reservation);
        }
        let entry = reservation.entry();
        Guard::Shared(ReservationHandle {
            slot: Arc::new(Mutex::new(Some(reservation))),
            entry,
        })
    }

    /// The tenant's cap and what is left of it now; `None` once released.
    pub(crate) fn limits(&self) -> Option<(u64, u64)> {
        match self {
            Guard::Owned(reservation) => Some(reservation.limits()),
            Guard::Shared(handle) => handle.lock().as_ref().map(TokenReservation::limits),
        }
    }

    /// The handle for the request's extensions, if the reservation is shared.
    pub(crate) fn handle(&self) -> Option<ReservationHandle> {
        match self {
            Guard::Owned(_) => None,
            Guard::Shared(handle) => Some(handle.clone()),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        match self {
            // Released right after this, when the field is dropped.
            Guard::Owned(reservation) => log_release(reservation),
            // Released here, while the handle may live on in a handler's hands.
            Guard::Shared(handle) => {
                if let Some(reservation) = handle.lock().take() {
                    log_release(&reservation);
                }
            }
        }
    }
}

fn log_release(reservation: &TokenReservation) {
    tracing::debug!(
        tenant = reservation.tenant_id(),
        tokens = reservation.tokens(),
        "released token reservation"
    );
}
