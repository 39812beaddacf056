//! The handler's view of its request's reservation.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::tracker::entry::Entry;
use crate::{Error, TokenReservation};

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
    tenant: Tenant,
    /// The reservation until the response ends, then `None`.
    slot: Mutex<Option<Held>>,
}

/// What a handle's slot holds until the response ends: the reservation, and what the
/// metrics recorder was told of it.
pub(crate) struct Held {
    reservation: Ledgered,
    /// What only some layers use, boxed so that a plain reservation stays small (it is
    /// moved from the response future into the body).
    extras: Option<Box<Extras>>,
    #[cfg(feature = "metrics")]
    tag: Option<crate::metrics::Tag>,
}

/// Dropped after the tenant's reservation, in this order.
#[derive(Default)]
struct Extras {
    /// The shared budgets' reservations, resized and released with the tenant's.
    budgets: Vec<TokenReservation>,
    /// Times the reservation, for a `Retry-After` derived from hold times.
    clock: Option<crate::hold_time::HoldClock>,
    /// Wakes the tenant's first waiting request; last, so it runs once the tokens are back.
    wake: Option<crate::waiting::WakeOnRelease>,
}

/// A reservation in the ledger it came from.
pub(crate) enum Ledgered {
    Local(TokenReservation),
    #[cfg(feature = "redis")]
    Redis(crate::RedisReservation),
}

#[derive(Clone)]
enum Tenant {
    Entry(crate::sync::Arc<Entry>),
    #[cfg(feature = "redis")]
    Name(Arc<str>),
}

impl ReservationHandle {
    /// The tenant the reservation is charged to.
    pub fn tenant_id(&self) -> &str {
        match &self.shared.tenant {
            Tenant::Entry(entry) => &entry.id,
            #[cfg(feature = "redis")]
            Tenant::Name(name) => name,
        }
    }

    /// Tokens held now; 0 once released.
    pub fn tokens(&self) -> u64 {
        self.lock().as_ref().map_or(0, Held::tokens)
    }

    /// Whether the reservation has been released (its response ended).
    pub fn is_released(&self) -> bool {
        self.lock().is_none()
    }

    /// Sets the tokens held, up or down, as [`TokenReservation::resize`] does (growth past
    /// the cap is allowed and counted). Returns what is held now; 0 once released.
    ///
    /// With a `RedisTokenTracker` (feature `redis`) the new amount counts here at once and
    /// reaches Redis in the background (see `RedisReservation::resize`).
    pub fn resize(&self, tokens: u64) -> u64 {
        self.lock().as_mut().map_or(0, |held| held.resize(tokens))
    }

    /// Sets the tokens held, growing only within the cap, as
    /// [`TokenReservation::try_resize`] does. Does nothing once released.
    ///
    /// # Errors
    ///
    /// [`Error::TenantOverloaded`] when the growth does not fit under the cap now. A lease
    /// in Redis cannot be grown here without waiting for Redis: growing one returns
    /// [`Error::BackendUnavailable`]; use [`try_resize_async`](Self::try_resize_async).
    pub fn try_resize(&self, tokens: u64) -> Result<(), Error> {
        match self.lock().as_mut() {
            Some(held) => held.try_resize_now(tokens).unwrap_or_else(|| {
                Err(Error::BackendUnavailable {
                    reason: "growing a redis lease within its cap needs \
                             ReservationHandle::try_resize_async"
                        .to_owned(),
                })
            }),
            None => Ok(()),
        }
    }

    /// [`try_resize`](Self::try_resize) for every tracker: with a `RedisTokenTracker`
    /// (feature `redis`), growth is checked atomically in Redis against what every replica
    /// has in flight.
    ///
    /// # Errors
    ///
    /// [`Error::TenantOverloaded`] when the growth does not fit under the cap now, and
    /// [`Error::BackendUnavailable`] when Redis could not be asked.
    pub async fn try_resize_async(&self, tokens: u64) -> Result<(), Error> {
        #[cfg(feature = "redis")]
        {
            // The lock is not held across the wait: the lease orders its own writes.
            let (lease, before) = match self.lock().as_mut() {
                Some(held) => match held.try_resize_now(tokens) {
                    Some(done) => return done,
                    None => (held.lease_parts(), held.tokens()),
                },
                None => return Ok(()),
            };
            let Some((lease, shared)) = lease else {
                return Ok(());
            };
            if let Some(held) = self.lock().as_mut() {
                held.try_grow_budgets(tokens)?;
            }
            let grown = shared.try_resize(&lease, tokens).await;
            if let Some(held) = self.lock().as_mut() {
                match grown {
                    Ok(()) => held.resized(before),
                    Err(_) => held.shrink_budgets(before),
                }
            }
            grown
        }
        #[cfg(not(feature = "redis"))]
        self.try_resize(tokens)
    }

    /// No code holding this lock can leave the reservation half-changed, so poisoning is
    /// ignored rather than allowed to leak tokens.
    fn lock(&self) -> MutexGuard<'_, Option<Held>> {
        self.shared
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Held {
    #[inline]
    pub(crate) fn new(reservation: Ledgered) -> Self {
        Self {
            reservation,
            extras: None,
            #[cfg(feature = "metrics")]
            tag: None,
        }
    }

    /// Holds the shared budgets' reservations with the tenant's.
    pub(crate) fn with_budgets(mut self, budgets: Vec<TokenReservation>) -> Self {
        if !budgets.is_empty() {
            self.extras().budgets = budgets;
        }
        self
    }

    /// Wakes the tenant's first waiting request when released.
    pub(crate) fn waking(mut self, wake: crate::waiting::WakeOnRelease) -> Self {
        self.extras().wake = Some(wake);
        self
    }

    /// Times the reservation until it ends.
    pub(crate) fn timed(mut self, clock: crate::hold_time::HoldClock) -> Self {
        self.extras().clock = Some(clock);
        self
    }

    fn extras(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// The shared budgets' reservations (none for most layers).
    fn budgets(&mut self) -> &mut [TokenReservation] {
        match &mut self.extras {
            Some(extras) => &mut extras.budgets,
            None => &mut [],
        }
    }

    /// Reports the reservation's changes and end to the metrics recorder.
    #[cfg(feature = "metrics")]
    pub(crate) fn tagged(mut self, tag: crate::metrics::Tag) -> Self {
        self.tag = Some(tag);
        self
    }

    pub(crate) fn tokens(&self) -> u64 {
        match &self.reservation {
            Ledgered::Local(reservation) => reservation.tokens(),
            #[cfg(feature = "redis")]
            Ledgered::Redis(reservation) => reservation.tokens(),
        }
    }

    fn resize(&mut self, tokens: u64) -> u64 {
        let before = self.tokens();
        let now = match &mut self.reservation {
            Ledgered::Local(reservation) => reservation.resize(tokens),
            #[cfg(feature = "redis")]
            Ledgered::Redis(reservation) => reservation.resize(tokens),
        };
        for budget in self.budgets() {
            budget.resize(now);
        }
        self.resized(before);
        now
    }

    /// The growth check, if it can be made without waiting: the budgets first, then the
    /// tenant's; a refusal anywhere puts back what had grown.
    fn try_resize_now(&mut self, tokens: u64) -> Option<Result<(), Error>> {
        let before = self.tokens();
        if tokens > before {
            if let Err(error) = self.try_grow_budgets(tokens) {
                return Some(Err(error));
            }
        }
        let done = match &mut self.reservation {
            Ledgered::Local(reservation) => Some(reservation.try_resize(tokens)),
            #[cfg(feature = "redis")]
            Ledgered::Redis(reservation) => reservation.try_resize_now(tokens),
        };
        match done {
            Some(Ok(())) => {
                for budget in self.budgets() {
                    budget.resize(tokens); // the shrinks; growth is already in place
                }
                self.resized(before);
            }
            // Refused, or left for Redis to decide: the budgets go back until it has.
            _ => self.shrink_budgets(before),
        }
        done
    }

    /// Grows every budget to `tokens` within its cap, or none.
    fn try_grow_budgets(&mut self, tokens: u64) -> Result<(), Error> {
        for i in 0..self.budgets().len() {
            let budget = &mut self.budgets()[i];
            let before = budget.tokens();
            if let Err(error) = budget.try_resize(tokens) {
                let key = budget.tenant_id().to_owned();
                self.shrink_budgets(before);
                return Err(crate::budget::budget_error(&key, error));
            }
        }
        Ok(())
    }

    fn shrink_budgets(&mut self, tokens: u64) {
        for budget in self.budgets() {
            if budget.tokens() > tokens {
                budget.resize(tokens);
            }
        }
    }

    /// Tells the recorder the reservation changed from `before` to what it holds now.
    fn resized(&mut self, before: u64) {
        #[cfg(feature = "metrics")]
        {
            let now = self.tokens();
            if let Some(tag) = &mut self.tag {
                tag.resized(before, now);
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = before;
    }

    #[cfg(feature = "redis")]
    fn lease_parts(&self) -> Option<(Arc<crate::redis::lease::Lease>, Arc<crate::redis::Shared>)> {
        match &self.reservation {
            Ledgered::Local(_) => None,
            Ledgered::Redis(reservation) => reservation.lease_parts(),
        }
    }

    fn limits(&self) -> Option<(u64, u64)> {
        match &self.reservation {
            Ledgered::Local(reservation) => Some(reservation.limits()),
            #[cfg(feature = "redis")]
            Ledgered::Redis(reservation) => reservation.limits(),
        }
    }

    fn log_release(&self) {
        tracing::debug!(
            tenant = self.tenant_id(),
            tokens = self.tokens(),
            "released token reservation"
        );
    }

    pub(crate) fn tenant_id(&self) -> &str {
        match &self.reservation {
            Ledgered::Local(reservation) => reservation.tenant_id(),
            #[cfg(feature = "redis")]
            Ledgered::Redis(reservation) => reservation.tenant_id(),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(clock) = self
            .extras
            .as_ref()
            .and_then(|extras| extras.clock.as_ref())
        {
            clock.stop();
        }
        #[cfg(feature = "metrics")]
        if let Some(tag) = &self.tag {
            tag.released(self.tokens());
        }
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
    Owned(Held),
    Shared(ReservationHandle),
}

impl Guard {
    pub(crate) fn new(held: Held, with_handle: bool) -> Self {
        if !with_handle {
            return Guard::Owned(held);
        }
        let tenant = match &held.reservation {
            Ledgered::Local(reservation) => Tenant::Entry(reservation.entry()),
            #[cfg(feature = "redis")]
            Ledgered::Redis(reservation) => Tenant::Name(reservation.tenant()),
        };
        Guard::Shared(ReservationHandle {
            shared: Arc::new(Shared {
                tenant,
                slot: Mutex::new(Some(held)),
            }),
        })
    }

    /// The tenant's cap and what is left of it now; `None` once released or unknown.
    pub(crate) fn limits(&self) -> Option<(u64, u64)> {
        match self {
            Guard::Owned(held) => held.limits(),
            Guard::Shared(handle) => handle.lock().as_ref().and_then(Held::limits),
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
            Guard::Owned(held) => held.log_release(),
            // Released here, while the handle may live on in a handler's hands.
            Guard::Shared(handle) => {
                if let Some(held) = handle.lock().take() {
                    held.log_release();
                }
            }
        }
    }
}
