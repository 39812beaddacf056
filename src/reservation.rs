//! A request's reservation: made in the ledger, held by one guard until the response has
//! ended, seen by handlers through the handle.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::budget::budget_error;
use crate::fair::Wake;
use crate::ledger::{Reservation, Resize, TenantName};
use crate::metrics::Tag;
use crate::retry_after::HoldClock;
use crate::step::Pending;
use crate::Error;

/// Waits for every growth in turn; the first refusal stands.
fn all(growths: Vec<Pending<()>>) -> Pending<()> {
    Box::pin(async move {
        for growth in growths {
            growth.await?;
        }
        Ok(())
    })
}

/// An admitted request's reservation, with what rides along with it until it ends.
pub(crate) struct Held {
    reservation: Reservation,
    /// What only some layers use, boxed so that a plain reservation stays small (it is
    /// moved from the response future into the body).
    riders: Option<Box<Riders>>,
    /// What the metrics recorder was told of it.
    pub(crate) tag: Tag,
}

/// Dropped after the tenant's reservation, in this order.
#[derive(Default)]
pub(crate) struct Riders {
    /// The shared budgets' reservations, resized and released with the tenant's.
    pub(crate) budgets: Vec<Reservation>,
    /// Times the reservation, for a `Retry-After` derived from hold times.
    pub(crate) clock: Option<HoldClock>,
    /// Wakes the tenant's first waiting request; last, so it runs once the tokens are back.
    #[allow(dead_code)] // only dropped
    pub(crate) wake: Option<Wake>,
}

impl Held {
    #[inline]
    pub(crate) fn new(reservation: Reservation, riders: Option<Box<Riders>>, tag: Tag) -> Self {
        Self {
            reservation,
            riders,
            tag,
        }
    }

    pub(crate) fn tokens(&self) -> u64 {
        self.reservation.tokens()
    }

    /// The shared budgets' reservations (none for most layers).
    fn budgets(&mut self) -> &mut [Reservation] {
        match &mut self.riders {
            Some(riders) => &mut riders.budgets,
            None => &mut [],
        }
    }

    pub(crate) fn resize(&mut self, tokens: u64) -> u64 {
        let before = self.tokens();
        let now = self.reservation.resize(tokens);
        for budget in self.budgets() {
            budget.resize(now);
        }
        self.resized(before);
        now
    }

    /// Resizes, growing only within the caps: the budgets first, then the tenant's; a
    /// refusal anywhere puts back what had grown. Growth Redis must check is returned to
    /// wait for ([`Resize::Later`]); what grew stays grown until it is
    /// [settled](Self::settle_growth).
    fn try_resize(&mut self, tokens: u64) -> Resize {
        let before = self.tokens();
        if tokens <= before {
            self.resize(tokens); // shrinking always fits
            return Resize::Done(Ok(()));
        }
        let mut later = Vec::new();
        for i in 0..self.budgets().len() {
            let budget = &mut self.budgets()[i];
            match budget.try_resize(tokens) {
                Resize::Done(Ok(())) => {}
                Resize::Done(Err(error)) => {
                    let key = budget.tenant_id().to_owned();
                    self.settle_growth(before, false);
                    return Resize::Done(Err(budget_error(&key, error)));
                }
                Resize::Later(growth) => {
                    let key = budget.tenant_id().to_owned();
                    later.push(Box::pin(async move {
                        growth.await.map_err(|error| budget_error(&key, error))
                    }) as Pending<()>);
                }
            }
        }
        match self.reservation.try_resize(tokens) {
            Resize::Done(Ok(())) if later.is_empty() => {
                self.settle_growth(before, true);
                Resize::Done(Ok(()))
            }
            Resize::Done(Ok(())) => Resize::Later(all(later)),
            Resize::Done(Err(error)) => {
                self.settle_growth(before, false);
                Resize::Done(Err(error))
            }
            Resize::Later(growth) => {
                later.push(growth);
                Resize::Later(all(later))
            }
        }
    }

    /// Completes a growth from `before`, or puts everything back to `before` if it was
    /// refused.
    fn settle_growth(&mut self, before: u64, done: bool) {
        if done {
            self.resized(before);
        } else {
            if self.reservation.tokens() > before {
                self.reservation.resize(before);
            }
            for budget in self.budgets() {
                if budget.tokens() > before {
                    budget.resize(before);
                }
            }
        }
    }

    /// Tells the recorder the reservation changed from `before` to what it holds now.
    fn resized(&mut self, before: u64) {
        let now = self.tokens();
        self.tag.resized(before, now);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(clock) = self.riders.as_ref().and_then(|r| r.clock.as_ref()) {
            clock.stop();
        }
        self.tag.released(self.tokens());
    }
}

/// Owns a request's reservation on the layer's side and releases it when dropped.
///
/// Shared with a [`ReservationHandle`] when the layer hands one to the request (one small
/// allocation), owned outright when it does not.
pub(crate) enum Guard {
    Owned(Held),
    Shared(ReservationHandle),
}

impl Guard {
    #[inline]
    pub(crate) fn new(held: Held, with_handle: bool) -> Self {
        if !with_handle {
            return Guard::Owned(held);
        }
        Guard::Shared(ReservationHandle {
            shared: Arc::new(Shared {
                tenant: held.reservation.tenant(),
                slot: Mutex::new(Some(held)),
            }),
        })
    }

    /// The tenant's cap and what is left of it now; `None` once released or unknown.
    pub(crate) fn limits(&self) -> Option<(u64, u64)> {
        match self {
            Guard::Owned(held) => held.reservation.limits(),
            Guard::Shared(handle) => handle.lock().as_ref()?.reservation.limits(),
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
        // Owned, it is released right after this, when the field is dropped; shared, it
        // is released here, while the handle may live on in a handler's hands.
        if let Guard::Shared(handle) = self {
            let held = handle.lock().take();
            drop(held);
        }
    }
}

/// A handle to the reservation of the request being served, found in its extensions.
///
/// A layer built with
/// [`reservation_handle(true)`](crate::TenantTokenLayer::reservation_handle) inserts one
/// into every request it admits, so a handler can reconcile the estimate with what the
/// upstream really used, as often as it learns more (an agent endpoint making several
/// upstream calls, a stream reporting usage at its end). The reservation itself stays with
/// the response: it is released when the response body ends or is dropped, whoever still
/// holds a handle. After that, the handle's methods do nothing.
///
/// ```
/// use std::sync::Arc;
/// use axum::{routing::post, Extension, Json, Router};
/// use tower_tenant_tokens::{ReservationHandle, TenantTokenLayer, TenantTokenTracker};
///
/// async fn chat(Extension(reservation): Extension<ReservationHandle>) -> Json<u64> {
///     let used = 420; // what the upstream reported
///     reservation.resize(used);
///     Json(reservation.tokens())
/// }
///
/// let tracker = Arc::new(TenantTokenTracker::new(10_000));
/// let app: Router = Router::new()
///     .route("/v1/chat/completions", post(chat))
///     .layer(TenantTokenLayer::new(tracker).reservation_handle(true));
/// ```
#[derive(Clone)]
pub struct ReservationHandle {
    shared: Arc<Shared>,
}

/// What the handles of one request and its guard share: one allocation per request.
struct Shared {
    /// Names the tenant even after the release; holds no tokens.
    tenant: TenantName,
    /// The reservation until the response ends, then `None`.
    slot: Mutex<Option<Held>>,
}

impl ReservationHandle {
    /// The tenant the reservation is charged to.
    pub fn tenant_id(&self) -> &str {
        &self.shared.tenant
    }

    /// Tokens held now; 0 once released.
    pub fn tokens(&self) -> u64 {
        self.lock().as_ref().map_or(0, Held::tokens)
    }

    /// Whether the reservation has been released (its response ended).
    pub fn is_released(&self) -> bool {
        self.lock().is_none()
    }

    /// Sets the tokens held, up or down, as [`TokenReservation::resize`](crate::TokenReservation::resize) does (growth past
    /// the cap is allowed and counted). Returns what is held now; 0 once released.
    ///
    /// With a Redis tracker (feature `redis`) the new amount counts here at once and
    /// reaches Redis in the background (see `RedisReservation::resize`).
    pub fn resize(&self, tokens: u64) -> u64 {
        self.lock().as_mut().map_or(0, |held| held.resize(tokens))
    }

    /// Sets the tokens held, growing only within the cap, as
    /// [`TokenReservation::try_resize`](crate::TokenReservation::try_resize) does. Does nothing once released.
    ///
    /// # Errors
    ///
    /// [`Error::TenantOverloaded`] when the growth does not fit under the cap now. A lease
    /// in Redis cannot be grown here without waiting for Redis: growing one returns
    /// [`Error::BackendUnavailable`]; use [`try_resize_async`](Self::try_resize_async).
    pub fn try_resize(&self, tokens: u64) -> Result<(), Error> {
        let mut slot = self.lock();
        let Some(held) = slot.as_mut() else {
            return Ok(());
        };
        let before = held.tokens();
        match held.try_resize(tokens) {
            Resize::Done(done) => done,
            Resize::Later(_) => {
                held.settle_growth(before, false);
                Err(Error::BackendUnavailable {
                    reason: "growing a redis lease within its cap needs \
                             ReservationHandle::try_resize_async"
                        .to_owned(),
                })
            }
        }
    }

    /// [`try_resize`](Self::try_resize) for every tracker: with a Redis tracker (feature
    /// `redis`), growth is checked atomically in Redis against what every replica has in
    /// flight.
    ///
    /// # Errors
    ///
    /// [`Error::TenantOverloaded`] when the growth does not fit under the cap now, and
    /// [`Error::BackendUnavailable`] when Redis could not be asked.
    pub async fn try_resize_async(&self, tokens: u64) -> Result<(), Error> {
        // The lock is not held across the wait: the lease orders its own writes.
        let (growth, before) = {
            let mut slot = self.lock();
            let Some(held) = slot.as_mut() else {
                return Ok(());
            };
            let before = held.tokens();
            match held.try_resize(tokens) {
                Resize::Done(done) => return done,
                Resize::Later(growth) => (growth, before),
            }
        };
        let grown = growth.await;
        if let Some(held) = self.lock().as_mut() {
            held.settle_growth(before, grown.is_ok());
        }
        grown
    }

    /// No code holding this lock can leave the reservation half-changed, so poisoning is
    /// ignored rather than allowed to leak tokens.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Option<Held>> {
        self.shared
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
