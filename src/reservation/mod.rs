//! A request's reservation: made in the ledger, held by one guard until the response has
//! ended, seen by handlers through the handle.

#[cfg(feature = "openai")]
pub(crate) mod usage;
#[cfg(not(feature = "openai"))]
#[path = "usage_off.rs"]
pub(crate) mod usage;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use self::usage::Tap;
use crate::budget::budget_error;
use crate::fair::Wake;
use crate::ledger::{Reservation, Resize, TenantName};
use crate::metrics::Tag;
use crate::retry_after::HoldClock;
use crate::step::Pending;
use crate::window::{Charge, Charged, Charges, Standing, TokenCharge};
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

/// Owns an admitted request's reservation on the layer's side and releases it when
/// dropped, with what is attached to it.
///
/// Shared with a [`ReservationHandle`] when the layer hands one to the request (one small
/// allocation, whose slot holds the guard `Owned`), owned outright when it does not.
pub(crate) enum Guard {
    Owned {
        reservation: Reservation,
        /// What only some layers attach, boxed so that a plain guard stays small (it is
        /// moved from the response future into the body).
        attached: Option<Box<Attached>>,
        /// The charge of a layer whose one window counts every token alike, for a
        /// request whose kinds of tokens are not known: kept here, without the
        /// allocation `attached` takes, until a reader is attached.
        window: Option<TokenCharge>,
        /// What the metrics recorder was told of it.
        tag: Tag,
    },
    Shared(ReservationHandle),
}

/// What some layers attach to a reservation; dropped after it, in this order.
#[derive(Default)]
pub(crate) struct Attached {
    /// The shared budgets' reservations, resized and released with the tenant's.
    pub(crate) budgets: Vec<Reservation>,
    /// What the windows over time were charged: grown with the reservation, settled on
    /// the reported usage, kept when released.
    pub(crate) windows: Charges,
    /// Times the reservation, for a `Retry-After` derived from hold times.
    pub(crate) clock: Option<HoldClock>,
    /// Reads the usage the response reports, and settles the reservation on it before
    /// the release (`read_usage`).
    pub(crate) reader: Option<Tap>,
    /// Wakes the tenant's first waiting request; last, so it runs once the tokens are back.
    #[allow(dead_code)] // only dropped
    pub(crate) wake: Option<Wake>,
}

/// An owned guard's reservation, borrowed field by field, so that a reader attached to
/// it can change it.
pub(crate) struct Reserved<'a> {
    reservation: &'a mut Reservation,
    budgets: &'a mut [Reservation],
    windows: Option<&'a mut Charges>,
    window: Option<&'a mut TokenCharge>,
    /// What the metrics recorder was told of it.
    pub(crate) tag: &'a mut Tag,
}

impl Guard {
    #[inline]
    pub(crate) fn new(
        reservation: Reservation,
        attached: Option<Box<Attached>>,
        window: Option<TokenCharge>,
        tag: Tag,
        with_handle: bool,
    ) -> Self {
        if !with_handle {
            return Guard::Owned {
                reservation,
                attached,
                window,
                tag,
            };
        }
        let tenant = reservation.tenant();
        let owned = Guard::Owned {
            reservation,
            attached,
            window,
            tag,
        };
        Guard::Shared(ReservationHandle {
            shared: Arc::new(Shared {
                tenant,
                slot: Mutex::new(Some(owned)),
            }),
        })
    }

    /// `f` on the reservation and the reader attached to it, if any; `None` once released
    /// (through a handle).
    pub(crate) fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Reserved<'_>, Option<&mut Tap>) -> T,
    ) -> Option<T> {
        match self {
            Guard::Owned {
                reservation,
                attached,
                window,
                tag,
            } => {
                let (budgets, windows, reader) = match attached.as_deref_mut() {
                    Some(Attached {
                        budgets,
                        windows,
                        reader,
                        ..
                    }) => (&mut budgets[..], Some(windows), reader.as_mut()),
                    None => (&mut [][..], None, None),
                };
                let mut reserved = Reserved {
                    reservation,
                    budgets,
                    windows,
                    window: window.as_mut(),
                    tag,
                };
                Some(f(&mut reserved, reader))
            }
            Guard::Shared(handle) => handle.lock().as_mut()?.with(f),
        }
    }

    /// The tenant's cap and what is left of it now; `None` once released or unknown.
    pub(crate) fn limits(&self) -> Option<(u64, u64)> {
        match self {
            Guard::Owned { reservation, .. } => reservation.limits(),
            Guard::Shared(handle) => handle.lock().as_ref()?.limits(),
        }
    }

    /// The token window with the least left now, if the request was charged to any.
    pub(crate) fn tightest_window(&self) -> Option<Standing> {
        match self {
            Guard::Owned {
                attached, window, ..
            } => {
                let charges = attached.iter().flat_map(|attached| attached.windows.iter());
                let standings = charges.filter_map(Charge::standing);
                let standings = standings.chain(window.as_ref().and_then(Charged::standing));
                standings
                    .filter(|standing| standing.tokens)
                    .min_by_key(|standing| standing.remaining)
            }
            Guard::Shared(handle) => handle.lock().as_ref()?.tightest_window(),
        }
    }

    /// Tokens held now; 0 once released (through a handle).
    pub(crate) fn tokens(&self) -> u64 {
        match self {
            Guard::Owned { reservation, .. } => reservation.tokens(),
            Guard::Shared(handle) => handle.lock().as_ref().map_or(0, Guard::tokens),
        }
    }

    /// Whether a reader is attached (the layer reads usage and the response is one it
    /// reads).
    #[inline]
    pub(crate) fn reads(&self) -> bool {
        match self {
            Guard::Owned { attached, .. } => attached.as_ref().is_some_and(|a| a.reader.is_some()),
            Guard::Shared(handle) => handle.lock().as_ref().is_some_and(Guard::reads),
        }
    }

    /// Attaches a reader of the response's usage.
    pub(crate) fn attach(&mut self, reader: Tap) {
        match self {
            Guard::Owned {
                attached, window, ..
            } => {
                let attached = attached.get_or_insert_with(Box::default);
                if let Some(window) = window.take() {
                    // The reader's usage tells kinds of tokens apart.
                    attached.windows.push(window.into_charge());
                }
                attached.reader = Some(reader);
            }
            Guard::Shared(handle) => {
                if let Some(guard) = handle.lock().as_mut() {
                    guard.attach(reader);
                }
            }
        }
    }

    /// Starts reading a response with `headers`: the reader stays attached if it reads
    /// such a body, and is detached otherwise, the reservation left as it is. Whether it
    /// edits the stream; `None` once detached (or none was attached).
    pub(crate) fn start_reading(&mut self, headers: &http::HeaderMap) -> Option<bool> {
        match self {
            Guard::Owned {
                attached: Some(attached),
                ..
            } => {
                let reader = attached.reader.as_mut()?;
                if reader.start(headers) {
                    return Some(reader.strips());
                }
                attached.reader = None;
                None
            }
            Guard::Owned { .. } => None,
            Guard::Shared(handle) => {
                let mut slot = handle.lock();
                slot.as_mut().and_then(|guard| guard.start_reading(headers))
            }
        }
    }

    /// The reader reads one data frame.
    pub(crate) fn read(&mut self, data: &impl bytes::Buf) {
        self.with(|held, reader| reader.map(|reader| reader.read(data, held)));
    }

    /// The reader reads one data frame and returns what to pass on of it.
    pub(crate) fn pass(&mut self, data: bytes::Bytes) -> bytes::Bytes {
        let mut data = Some(data);
        let passed = self.with(|held, reader| {
            let data = data.take().unwrap_or_default();
            match reader {
                Some(reader) => reader.pass(data, held),
                None => data,
            }
        });
        passed.or(data).unwrap_or_default()
    }

    /// What an edited stream still holds back when it ends.
    pub(crate) fn rest(&mut self) -> bytes::Bytes {
        let rest = self.with(|_, reader| reader.map(Tap::rest));
        rest.flatten().unwrap_or_default()
    }

    /// The body ended: the reader settles the reservation on a complete response.
    pub(crate) fn end(&mut self) {
        self.with(|held, reader| reader.map(|reader| reader.end(held)));
    }

    /// The handle for the request's extensions, if the reservation is shared.
    pub(crate) fn handle(&self) -> Option<ReservationHandle> {
        match self {
            Guard::Owned { .. } => None,
            Guard::Shared(handle) => Some(handle.clone()),
        }
    }
}

impl Reserved<'_> {
    pub(crate) fn tokens(&self) -> u64 {
        self.reservation.tokens()
    }

    /// Sets the tokens held, growth unchecked, as [`ReservationHandle::resize`] does.
    pub(crate) fn resize(&mut self, tokens: u64) -> u64 {
        let before = self.tokens();
        let now = self.reservation.resize(tokens);
        for budget in self.budgets.iter_mut() {
            budget.resize(now);
        }
        self.resized(before);
        now
    }

    /// Settles the reservation on `tokens` in all, as a handler said.
    fn settle_total(&mut self, tokens: u64) -> u64 {
        let now = self.resize(tokens);
        self.charges()
            .for_each(|charge| charge.settle_total(tokens));
        now
    }

    /// What the windows were charged.
    fn charges(&mut self) -> impl Iterator<Item = &mut dyn Charged> + '_ {
        let charges = self.windows.as_deref_mut().into_iter();
        let charges = charges.flat_map(Charges::iter_mut);
        let charges = charges.map(|charge| charge as &mut dyn Charged);
        let inline = self.window.as_deref_mut();
        charges.chain(inline.map(|charge| charge as &mut dyn Charged))
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
        for i in 0..self.budgets.len() {
            let budget = &mut self.budgets[i];
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
            for budget in self.budgets.iter_mut() {
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
        self.charges().for_each(|charge| charge.grow_to(now));
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Guard::Shared(handle) = self {
            // Released here, while the handle may live on in a handler's hands.
            let owned = handle.lock().take();
            drop(owned);
            return;
        }
        // A reader settles the reservation first. It is released right after this, when
        // the fields are dropped.
        if let Guard::Owned {
            attached: Some(_), ..
        } = self
        {
            self.with(|reserved, reader| {
                if let Some(reader) = reader {
                    reader.finish(reserved);
                }
            });
        }
        if let Guard::Owned {
            reservation,
            attached,
            window,
            tag,
        } = self
        {
            if let Some(attached) = attached {
                if let Some(clock) = &attached.clock {
                    clock.stop();
                }
                attached
                    .windows
                    .iter()
                    .for_each(|charge| tag.charged(charge));
            }
            if let Some(window) = window {
                tag.charged(window);
            }
            tag.released(reservation.tokens());
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
    /// The reservation, owned, until the response ends; then `None`.
    slot: Mutex<Option<Guard>>,
}

impl ReservationHandle {
    /// The tenant the reservation is charged to.
    pub fn tenant_id(&self) -> &str {
        &self.shared.tenant
    }

    /// Tokens held now; 0 once released.
    pub fn tokens(&self) -> u64 {
        self.lock().as_ref().map_or(0, Guard::tokens)
    }

    /// Whether the reservation has been released (its response ended).
    pub fn is_released(&self) -> bool {
        self.lock().is_none()
    }

    /// Sets the tokens held, up or down, as [`TokenReservation::resize`](crate::TokenReservation::resize) does (growth past
    /// the cap is allowed and counted). Returns what is held now; 0 once released.
    ///
    /// This is the request's usage as the handler learned it: the layer's
    /// [windows](crate::TokenWindow) are charged exactly `tokens`, what was charged beyond
    /// that going back.
    ///
    /// With a Redis tracker (feature `redis`) the new amount counts here at once and
    /// reaches Redis in the background (see `RedisReservation::resize`).
    pub fn resize(&self, tokens: u64) -> u64 {
        let mut slot = self.lock();
        let resized = slot
            .as_mut()
            .and_then(|guard| guard.with(|held, _| held.settle_total(tokens)));
        resized.unwrap_or(0)
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
        let Some(guard) = slot.as_mut() else {
            return Ok(());
        };
        let tried = guard.with(|held, _| {
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
        });
        tried.unwrap_or(Ok(()))
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
        let tried = {
            let mut slot = self.lock();
            let Some(guard) = slot.as_mut() else {
                return Ok(());
            };
            guard.with(|held, _| (held.tokens(), held.try_resize(tokens)))
        };
        let (before, growth) = match tried {
            None => return Ok(()),
            Some((_, Resize::Done(done))) => return done,
            Some((before, Resize::Later(growth))) => (before, growth),
        };
        let grown = growth.await;
        if let Some(guard) = self.lock().as_mut() {
            guard.with(|held, _| held.settle_growth(before, grown.is_ok()));
        }
        grown
    }

    /// No code holding this lock can leave the reservation half-changed, so poisoning is
    /// ignored rather than allowed to leak tokens.
    fn lock(&self) -> MutexGuard<'_, Option<Guard>> {
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
