//! Headroom: tokens a replica holds in Redis ahead of need, for one busy tenant, and
//! admits that tenant's requests from without a round trip.
//!
//! With [`local_headroom`](super::RedisTokenTrackerBuilder::local_headroom) set, a
//! replica keeps, per tenant it is serving, one more lease in Redis: its headroom. The
//! lease is counted against the tenant's cap like any other, renewed with the others, and
//! expires like them if the replica dies, so the cap still holds across replicas and a
//! crash still heals by expiry. A request that fits in what the headroom holds and does
//! not use is admitted here at once; the rest ask Redis, one lease each, as without
//! headroom.
//!
//! One task per headroom keeps it the right size, one call at a time, in the background:
//!
//! - it grows (checked against the cap) to what is used plus one *step* (the configured
//!   share of the cap) when less than half a step is left unused;
//! - it shrinks to what is used plus a step when more than two steps are unused;
//! - when growing is refused, the tenant is near its cap: for a short while (`TIGHT_FOR`)
//!   it neither grows nor keeps anything unused, so it gives back what it does not use and
//!   requests ask Redis one by one, exactly as without headroom;
//! - it is let go at a renewal when nothing was admitted from it since the previous one
//!   and nothing drawn from it is still held;
//! - when the tenant's cap changes, it admits nothing more, gives back what it does not
//!   use, and is let go once drained; the tenant's next headroom is made under the new cap.
//!
//! A headroom admits only while its lease is known to be in Redis: for half a TTL after
//! the call that last set or renewed it was sent, since the lease lives a whole TTL from
//! then on Redis's clock.
//!
//! Here is what a headroom holds and the rules that size it; admitting from it and the
//! task's calls to Redis are in [`draw`](super::draw).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use super::lease::{Lease, MAX_REDIS_TOKENS};

/// How long a headroom whose growth was refused stays tight.
const TIGHT_FOR: Duration = Duration::from_millis(100);

/// This replica's headrooms, one per tenant it is serving.
pub(super) struct Headrooms {
    /// The share of a tenant's cap each keeps unused, in percent; 0: none.
    share: u8,
    all: RwLock<HashMap<Arc<str>, Arc<Headroom>>>,
}

impl Headrooms {
    pub(super) fn new(share: u8) -> Self {
        Self {
            share,
            all: RwLock::default(),
        }
    }

    /// Whether this replica keeps headroom at all.
    pub(super) fn is_on(&self) -> bool {
        self.share != 0
    }

    /// What a headroom keeps unused under a tenant's cap of `cap`.
    pub(super) fn step(&self, cap: u64) -> u64 {
        let share = u64::from(self.share);
        cap / 100 * share + cap % 100 * share / 100
    }

    /// `tenant`'s headroom (a look-up every request that may draw from one makes, under
    /// the read lock).
    #[inline]
    pub(super) fn get(&self, tenant: &str) -> Option<Arc<Headroom>> {
        self.read().get(tenant).map(Arc::clone)
    }

    /// Keeps `headroom` as its tenant's, unless another request made one meanwhile:
    /// returns the one kept, the first one made.
    pub(super) fn insert(&self, headroom: Arc<Headroom>) -> Arc<Headroom> {
        let mut all = self.write();
        let kept = all
            .entry(Arc::clone(headroom.lease.tenant()))
            .or_insert(headroom);
        Arc::clone(kept)
    }

    /// Forgets `headroom`, if it is still its tenant's.
    pub(super) fn remove(&self, headroom: &Arc<Headroom>) {
        let mut all = self.write();
        let tenant = headroom.lease.tenant();
        if all
            .get(tenant)
            .is_some_and(|known| Arc::ptr_eq(known, headroom))
        {
            all.remove(tenant);
        }
    }

    /// Retires and forgets the headrooms nothing asked for since the last call and nothing
    /// drawn from holds: returns them, for their leases to be released.
    pub(super) fn retire_idle(&self) -> Vec<Arc<Headroom>> {
        let mut idle = Vec::new();
        self.write().retain(|_, headroom| {
            let mut state = headroom.lock();
            let keep = (state.touched && !state.draining) || state.used > 0 || state.adjusting;
            state.touched = false;
            if !keep {
                state.retired = true;
                idle.push(Arc::clone(headroom));
            }
            keep
        });
        idle
    }

    /// The headrooms whose leases are among `renewed` may admit until `valid_until`.
    pub(super) fn renewed(&self, renewed: &[&Arc<Lease>], valid_until: Instant) {
        let all = self.read();
        for lease in renewed {
            if let Some(headroom) = all.get(lease.tenant()) {
                if Arc::ptr_eq(&headroom.lease, lease) {
                    let mut state = headroom.lock();
                    state.valid_until = state.valid_until.max(Some(valid_until));
                }
            }
        }
    }

    /// Takes every headroom's lease that is in Redis, leaving none.
    pub(super) fn take_leases(&mut self) -> Vec<Arc<Lease>> {
        let all = std::mem::take(self.all.get_mut().unwrap_or_else(PoisonError::into_inner));
        all.into_values()
            .filter(|headroom| headroom.lock().created)
            .map(|headroom| Arc::clone(&headroom.lease))
            .collect()
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<Arc<str>, Arc<Headroom>>> {
        self.all.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<Arc<str>, Arc<Headroom>>> {
        self.all.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One tenant's headroom on this replica.
pub(super) struct Headroom {
    lease: Arc<Lease>,
    /// How much it keeps unused: the configured share of the tenant's cap.
    step: u64,
    state: Mutex<Amounts>,
}

/// The call a headroom's task makes next: set the lease to `to` tokens, checked against
/// the cap when `checked`, making the lease first unless it is `created`.
pub(super) struct Call {
    pub(super) to: u64,
    pub(super) checked: bool,
    pub(super) created: bool,
}

/// What a headroom's task does once Redis answered.
pub(super) enum Then {
    /// Another call, if one is due.
    Again,
    /// Nothing more: the headroom is right, or calling again at once would not help.
    Stop,
    /// Release its lease and forget it: making it failed, and it may have landed after all.
    LetGo,
}

impl Headroom {
    pub(super) fn new(lease: Lease, step: u64) -> Self {
        Self {
            lease: Arc::new(lease),
            step,
            state: Mutex::default(),
        }
    }

    pub(super) fn lease(&self) -> &Arc<Lease> {
        &self.lease
    }

    /// Whether a request of `tokens` may be drawn from it: one larger than a step never is
    /// (nor keeps it for nothing).
    pub(super) fn takes(&self, tokens: u64) -> bool {
        tokens <= self.step
    }

    /// Takes `tokens` from what it holds unused, if they fit now. Returns whether they did,
    /// and whether its task must start now (see [`Self::next_call`]).
    #[inline]
    pub(super) fn draw(&self, tokens: u64, now: Instant) -> (bool, bool) {
        let mut state = self.lock();
        state.touched = true;
        let fits = state.is_valid(now) && state.used + tokens <= state.held;
        if fits {
            state.used += tokens;
        }
        (fits, self.wants_adjusting(&mut state, now))
    }

    /// Stops it admitting, to give back what it does not use (the tenant's cap changed).
    /// Returns whether its task must start now.
    pub(super) fn drain(&self) -> bool {
        let mut state = self.lock();
        if state.draining {
            return false;
        }
        state.draining = true;
        self.wants_adjusting(&mut state, Instant::now())
    }

    /// What its task asks Redis next, or `None` when it is right as it is (the task then
    /// ends). A shrink counts here at once: nothing more is admitted from what it gives
    /// back meanwhile.
    pub(super) fn next_call(&self, now: Instant) -> Option<Call> {
        let mut state = self.lock();
        let Some((to, checked)) = state.target(self.step, now) else {
            state.adjusting = false;
            return None;
        };
        if to < state.held {
            state.held = to;
            self.lease.set_tokens(to);
        }
        Some(Call {
            to,
            checked,
            created: state.created,
        })
    }

    /// Takes in what Redis answered `call` (`{status, in_flight}`, or why it failed): a
    /// lease set may admit until `valid_until`, and one just made is handed to `hold`.
    pub(super) fn answered(
        &self,
        call: &Call,
        answer: Result<(i64, u64), String>,
        valid_until: Instant,
        hold: impl FnOnce(),
    ) -> Then {
        let lease = &self.lease;
        let mut state = self.lock();
        match answer {
            Ok((1, in_flight)) => {
                state.set(lease, call.to, in_flight, valid_until);
                if !call.created {
                    state.created = true;
                    hold();
                }
                if !state.is_valid(Instant::now()) {
                    // Half a TTL is shorter than the call took: calling again at once
                    // would not help.
                    state.adjusting = false;
                    return Then::Stop;
                }
                Then::Again
            }
            Ok((_, in_flight)) => {
                lease.set_in_flight(in_flight);
                state.tight_until = Some(Instant::now() + TIGHT_FOR);
                Then::Again
            }
            Err(failure) => {
                tracing::debug!(tenant = &**lease.tenant(), %failure,
                    "could not resize a replica's headroom in redis");
                state.tight_until = Some(Instant::now() + TIGHT_FOR);
                state.adjusting = false;
                if call.created {
                    return Then::Stop;
                }
                // It may have landed after all: let it go by id, and start afresh.
                state.retired = true;
                Then::LetGo
            }
        }
    }

    /// Whether its task needs starting now (and marks it started).
    fn wants_adjusting(&self, state: &mut Amounts, now: Instant) -> bool {
        if state.adjusting || state.target(self.step, now).is_none() {
            return false;
        }
        state.adjusting = true;
        true
    }

    fn lock(&self) -> MutexGuard<'_, Amounts> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A reservation drawn from a headroom.
pub(super) struct HeadroomShare {
    headroom: Arc<Headroom>,
    /// Changed under the headroom's lock only.
    tokens: AtomicU64,
    /// Given back: a growth still on its way must not count.
    released: AtomicBool,
}

impl HeadroomShare {
    /// `tokens` drawn from `headroom` (see [`Headroom::draw`]).
    #[inline]
    pub(super) fn new(headroom: Arc<Headroom>, tokens: u64) -> Self {
        Self {
            headroom,
            tokens: AtomicU64::new(tokens),
            released: AtomicBool::new(false),
        }
    }

    pub(super) fn headroom(&self) -> &Arc<Headroom> {
        &self.headroom
    }

    pub(super) fn tokens(&self) -> u64 {
        self.tokens.load(Relaxed)
    }

    /// Gives what it holds back to its headroom, once. Returns whether the headroom's task
    /// must start now.
    pub(super) fn give_back(&self) -> bool {
        let headroom = &self.headroom;
        let mut state = headroom.lock();
        if self.released.swap(true, Relaxed) {
            return false;
        }
        state.used -= self.tokens.swap(0, Relaxed);
        headroom.wants_adjusting(&mut state, Instant::now())
    }

    /// Sets what it holds to `tokens`, unchecked (as any resize): growth past the headroom
    /// is the task's to write to Redis. Returns whether the task must start now.
    pub(super) fn resize(&self, tokens: u64) -> bool {
        let headroom = &self.headroom;
        let mut state = headroom.lock();
        if self.released.load(Relaxed) {
            return false;
        }
        let before = self.tokens.swap(tokens, Relaxed);
        state.used = state.used - before + tokens;
        headroom.wants_adjusting(&mut state, Instant::now())
    }

    /// Takes a growth to `tokens` (or a shrink) from what its headroom has unused, if it
    /// can without Redis; returns whether it did.
    pub(super) fn try_resize_now(&self, tokens: u64) -> bool {
        let mut state = self.headroom.lock();
        if self.released.load(Relaxed) {
            return true;
        }
        let before = self.tokens.load(Relaxed);
        let fits = tokens <= before
            || (state.is_valid(Instant::now()) && state.used - before + tokens <= state.held);
        if fits {
            self.tokens.store(tokens, Relaxed);
            state.used = state.used - before + tokens;
        }
        fits
    }

    /// For a growth to `tokens` through Redis: what the headroom's lease must hold then
    /// (never less than it holds: the rest may be drawn meanwhile), the growth, and
    /// whether the lease is in Redis at all.
    pub(super) fn growth(&self, tokens: u64) -> (u64, u64, bool) {
        let state = self.headroom.lock();
        let grow = tokens.saturating_sub(self.tokens.load(Relaxed));
        let to = state.held.max(state.used.saturating_add(grow));
        (to, grow, state.created)
    }

    /// Redis set the headroom's lease to `to` tokens, the tenant then holding `in_flight`,
    /// for a growth to `tokens`: it holds them, unless given back meanwhile.
    pub(super) fn grown(&self, to: u64, tokens: u64, in_flight: u64, valid_until: Instant) {
        let mut state = self.headroom.lock();
        state.set(&self.headroom.lease, to, in_flight, valid_until);
        if !self.released.load(Relaxed) {
            let before = self.tokens.swap(tokens, Relaxed);
            state.used = state.used - before + tokens;
        }
    }
}

/// What a headroom holds in Redis and what is drawn from it.
#[derive(Default)]
struct Amounts {
    /// Tokens of the reservations drawn from it that are still held.
    used: u64,
    /// Tokens the lease holds in Redis, as Redis last confirmed (shrinks count here first).
    held: u64,
    /// The lease is in Redis (or was, and is registered again if lost).
    created: bool,
    /// Until when it may admit: half a TTL after the last call that set or renewed the
    /// lease was sent.
    valid_until: Option<Instant>,
    /// Growth was refused; until then it neither grows nor keeps tokens unused.
    tight_until: Option<Instant>,
    /// Its task is running.
    adjusting: bool,
    /// A request asked for it since the last renewal.
    touched: bool,
    /// Let go: it admits nothing more.
    retired: bool,
    /// The tenant's cap changed since it was made: it admits nothing more, gives back what
    /// is unused, and is let go once nothing drawn from it is held.
    draining: bool,
}

impl Amounts {
    fn is_valid(&self, now: Instant) -> bool {
        !self.retired && !self.draining && self.valid_until.is_some_and(|until| now < until)
    }

    /// Redis set `lease` to `held` tokens, the tenant then holding `in_flight`: it may admit
    /// from them until `valid_until`.
    fn set(&mut self, lease: &Lease, held: u64, in_flight: u64, valid_until: Instant) {
        lease.set_in_flight(in_flight);
        lease.set_tokens(held);
        self.held = held;
        self.valid_until = Some(valid_until);
    }

    fn is_tight(&self, now: Instant) -> bool {
        self.tight_until.is_some_and(|until| now < until)
    }

    /// What the lease should hold now, and whether getting there is checked against the
    /// cap; `None` when it is right as it is.
    fn target(&self, step: u64, now: Instant) -> Option<(u64, bool)> {
        if self.retired {
            return None;
        }
        if self.used > self.held {
            // Reservations drawn from it grew past it (unchecked growth): count them.
            return Some((self.used, false));
        }
        let unused = self.held - self.used;
        if self.is_tight(now) || self.draining {
            return (unused > 0).then_some((self.used, false));
        }
        let refresh = self.created && !self.is_valid(now);
        if unused * 2 < step || unused > 2 * step || refresh {
            let to = self.used.saturating_add(step).min(MAX_REDIS_TOKENS);
            return Some((to, to > self.held));
        }
        None
    }
}
