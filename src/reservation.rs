//! A request's reservation: made in the ledger, held by one guard until the response has
//! ended, seen by handlers through the handle. The one place where a reservation in
//! memory and one in Redis part ways.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::admit::budget::budget_error;
use crate::admit::queue::Wake;
use crate::metrics::Tag;
use crate::retry_after::HoldClock;
use crate::tracker::entry::Entry;
use crate::{Error, TenantTokenTracker, TokenReservation};

/// An answer that needs a wait (for Redis, or for capacity).
pub(crate) type Pending<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>;

/// An answer known now, or one to wait for.
pub(crate) enum Step<T> {
    Now(Result<T, Error>),
    Later(Pending<T>),
}

impl<T: Send + 'static> Step<T> {
    /// The answer, waiting for it if need be.
    pub(crate) async fn resolve(self) -> Result<T, Error> {
        match self {
            Step::Now(answer) => answer,
            Step::Later(pending) => pending.await,
        }
    }

    /// Turns the answer, once known, into another.
    #[inline]
    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U + Send + 'static) -> Step<U> {
        match self {
            Step::Now(answer) => Step::Now(answer.map(f)),
            Step::Later(pending) => Step::Later(Box::pin(async move { pending.await.map(f) })),
        }
    }
}

/// Where reservations are counted.
#[derive(Clone)]
pub(crate) enum Ledger {
    /// In this process: answered at once.
    Local(Arc<TenantTokenTracker>),
    /// In Redis, shared by every replica: one round trip.
    #[cfg(feature = "redis")]
    Redis(crate::redis::RedisTokenTracker),
}

impl Ledger {
    /// Reserves `tokens` for `tenant` against its cap.
    #[inline]
    pub(crate) fn reserve(&self, tenant: &str, tokens: u64) -> Step<Reservation> {
        match self {
            Ledger::Local(tracker) => {
                Step::Now(tracker.reserve_id(tenant, tokens).map(Reservation::Local))
            }
            #[cfg(feature = "redis")]
            Ledger::Redis(tracker) => {
                if let Some(drawn) = tracker.reserve_locally(tenant, tokens) {
                    return Step::Now(Ok(Reservation::Redis(drawn)));
                }
                let (tracker, tenant) = (tracker.clone(), tenant.to_owned());
                Step::Later(Box::pin(async move {
                    let reservation = tracker.reserve_in_redis(&tenant, tokens).await;
                    reservation.map(Reservation::Redis)
                }))
            }
        }
    }

    /// Reserves `tokens` for `tenant` whatever its cap (shadow mode).
    pub(crate) fn reserve_unchecked(&self, tenant: &str, tokens: u64) -> Step<Reservation> {
        match self {
            Ledger::Local(tracker) => Step::Now(Ok(Reservation::Local(
                tracker.reserve_unchecked(tenant, tokens),
            ))),
            #[cfg(feature = "redis")]
            Ledger::Redis(tracker) => {
                let (tracker, tenant) = (tracker.clone(), tenant.to_owned());
                Step::Later(Box::pin(async move {
                    let reservation = tracker.reserve_unchecked(&tenant, tokens).await;
                    reservation.map(Reservation::Redis)
                }))
            }
        }
    }

    /// The cap that applies to `tenant` (from this replica's settings, for Redis).
    pub(crate) fn cap(&self, tenant: &str) -> u64 {
        match self {
            Ledger::Local(tracker) => tracker.cap(tenant),
            #[cfg(feature = "redis")]
            Ledger::Redis(tracker) => tracker.cap(tenant),
        }
    }

    /// The cap of `tenant` and what it has in flight here, for a refusal made without
    /// the ledger's own answer (a full queue). Redis is not asked: `0` in flight.
    pub(crate) fn overloaded(&self, tenant: &str, tokens: u64) -> Error {
        let in_flight = match self {
            Ledger::Local(tracker) => tracker.in_flight(tenant),
            #[cfg(feature = "redis")]
            Ledger::Redis(_) => 0,
        };
        let cap = self.cap(tenant);
        Error::TenantOverloaded {
            tenant_id: tenant.to_owned(),
            requested: tokens,
            in_flight,
            cap,
        }
    }
}

/// Waits for every growth in turn; the first refusal stands.
fn all(growths: Vec<Pending<()>>) -> Pending<()> {
    Box::pin(async move {
        for growth in growths {
            growth.await?;
        }
        Ok(())
    })
}

/// What the usage reader tells the metrics recorder about a reservation. (Made only with
/// the `openai` feature, read only with `metrics`.)
#[cfg_attr(not(all(feature = "openai", feature = "metrics")), allow(dead_code))]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Told<'a> {
    /// The response outran its reservation, which grew as it went.
    Outran,
    /// The output allowance learned for the tenant and `model` is now `tokens`.
    Learned { model: &'a str, tokens: u64 },
    /// A stream asked for its usage ended without reporting it.
    UsageMissing,
}

/// A reservation in the ledger it came from.
pub(crate) enum Reservation {
    Local(TokenReservation),
    #[cfg(feature = "redis")]
    Redis(crate::redis::RedisReservation),
}

/// The outcome of a resize that checks growth against the cap.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
enum Resize {
    Done(Result<(), Error>),
    /// The growth is checked in Redis: wait for it without holding any lock.
    Later(Pending<()>),
}

impl Reservation {
    pub(crate) fn tenant_id(&self) -> &str {
        match self {
            Reservation::Local(reservation) => reservation.tenant_id(),
            #[cfg(feature = "redis")]
            Reservation::Redis(reservation) => reservation.tenant_id(),
        }
    }

    /// The tenant, for a handle that outlives the reservation.
    fn tenant(&self) -> Tenant {
        match self {
            Reservation::Local(reservation) => Tenant::Entry(reservation.entry()),
            #[cfg(feature = "redis")]
            Reservation::Redis(reservation) => Tenant::Name(reservation.tenant()),
        }
    }

    pub(crate) fn tokens(&self) -> u64 {
        match self {
            Reservation::Local(reservation) => reservation.tokens(),
            #[cfg(feature = "redis")]
            Reservation::Redis(reservation) => reservation.tokens(),
        }
    }

    fn resize(&mut self, tokens: u64) -> u64 {
        match self {
            Reservation::Local(reservation) => reservation.resize(tokens),
            #[cfg(feature = "redis")]
            Reservation::Redis(reservation) => reservation.resize(tokens),
        }
    }

    fn try_resize(&mut self, tokens: u64) -> Resize {
        match self {
            Reservation::Local(reservation) => Resize::Done(reservation.try_resize(tokens)),
            #[cfg(feature = "redis")]
            Reservation::Redis(reservation) => match reservation.try_resize_now(tokens) {
                Some(done) => Resize::Done(done),
                None => Resize::Later(reservation.growth(tokens)),
            },
        }
    }

    /// The tenant's cap and what is left of it now; `None` when unknown.
    fn limits(&self) -> Option<(u64, u64)> {
        match self {
            Reservation::Local(reservation) => Some(reservation.limits()),
            #[cfg(feature = "redis")]
            Reservation::Redis(reservation) => reservation.limits(),
        }
    }
}

/// An admitted request's reservation, with what rides along with it until it ends.
pub(crate) struct Held {
    reservation: Reservation,
    /// What only some layers use, boxed so that a plain reservation stays small (it is
    /// moved from the response future into the body).
    riders: Option<Box<Riders>>,
    /// What the metrics recorder was told of it.
    tag: Tag,
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

    pub(crate) fn tenant_id(&self) -> &str {
        self.reservation.tenant_id()
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

    fn resize(&mut self, tokens: u64) -> u64 {
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

    #[inline]
    fn log_release(&self) {
        tracing::debug!(
            tenant = self.tenant_id(),
            tokens = self.tokens(),
            "released token reservation"
        );
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

    /// Tokens held now; 0 once released (through a handle).
    #[cfg_attr(not(feature = "openai"), allow(dead_code))]
    pub(crate) fn tokens(&self) -> u64 {
        match self {
            Guard::Owned(held) => held.tokens(),
            Guard::Shared(handle) => handle.tokens(),
        }
    }

    /// Sets the tokens held, growth unchecked, as [`ReservationHandle::resize`] does.
    #[cfg_attr(not(feature = "openai"), allow(dead_code))]
    pub(crate) fn resize(&mut self, tokens: u64) -> u64 {
        match self {
            Guard::Owned(held) => held.resize(tokens),
            Guard::Shared(handle) => handle.resize(tokens),
        }
    }

    /// Tells the metrics recorder what the usage reader found about this reservation.
    #[cfg_attr(not(feature = "openai"), allow(dead_code))]
    pub(crate) fn tell(&self, told: Told<'_>) {
        match self {
            Guard::Owned(held) => held.tag.tell(told),
            Guard::Shared(handle) => {
                if let Some(held) = handle.lock().as_ref() {
                    held.tag.tell(told);
                }
            }
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

/// The tenant's name, kept without a copy where the ledger has one.
#[derive(Clone)]
enum Tenant {
    Entry(crate::sync::Arc<Entry>),
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Name(Arc<str>),
}

impl ReservationHandle {
    /// The tenant the reservation is charged to.
    pub fn tenant_id(&self) -> &str {
        match &self.shared.tenant {
            Tenant::Entry(entry) => &entry.id,
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
    /// With a Redis tracker (feature `redis`) the new amount counts here at once and
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
    fn lock(&self) -> MutexGuard<'_, Option<Held>> {
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
