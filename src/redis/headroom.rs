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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::lease::{clamp, Lease, MAX_REDIS_TOKENS};
use super::reservation::RedisReservation;
use super::shared::Inner;
use super::stats::Count;
use crate::Error;

/// How long a headroom whose growth was refused stays tight.
const TIGHT_FOR: Duration = Duration::from_millis(100);

/// One tenant's headroom on this replica.
pub(super) struct Headroom {
    pub(super) lease: Arc<Lease>,
    /// How much it keeps unused: the configured share of the tenant's cap.
    step: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
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

impl State {
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

/// A reservation drawn from a headroom.
pub(super) struct Drawn {
    pub(super) headroom: Arc<Headroom>,
    pub(super) inner: Arc<Inner>,
    /// Changed under the headroom's lock only.
    pub(super) tokens: AtomicU64,
    /// Given back: a growth still on its way must not count.
    released: AtomicBool,
}

impl Headroom {
    /// Whether its lease is in Redis.
    pub(super) fn is_created(&self) -> bool {
        self.lock().created
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// Admits `tokens` for `tenant` from this replica's headroom, or `None` when the
    /// request must ask Redis (no headroom, too little of it, or none yet: one is then
    /// made in the background).
    pub(super) fn admit_locally(
        self: &Arc<Self>,
        tenant: &str,
        tokens: u64,
    ) -> Option<RedisReservation> {
        if self.headroom_share() == 0 || self.fair().in_use.load(Relaxed) {
            return None;
        }
        let headroom = self.headroom_of(tenant, tokens)?;
        let now = Instant::now();
        let (fits, adjust) = {
            let mut state = headroom.lock();
            state.touched = true;
            let fits = state.is_valid(now) && state.used + tokens <= state.held;
            if fits {
                state.used += tokens;
            }
            (fits, self.wants_adjusting(&headroom, &mut state, now))
        };
        if adjust {
            self.adjust_later(&headroom);
        }
        if !fits {
            return None;
        }
        self.counters().add(Count::AdmittedLocally);
        let drawn = Drawn {
            headroom,
            inner: Arc::clone(self),
            tokens: AtomicU64::new(tokens),
            released: AtomicBool::new(false),
        };
        Some(RedisReservation::drawn(Arc::new(drawn)))
    }

    /// `tenant`'s headroom, made (empty) if it has none; `None` when a request of `tokens`
    /// is larger than a step, so never admitted from it (nor keeping it for nothing), and
    /// when the tenant's cap changed since its headroom was made (that one drains).
    fn headroom_of(self: &Arc<Self>, tenant: &str, tokens: u64) -> Option<Arc<Headroom>> {
        let cap = self.cap(tenant);
        let known = self.read_headroom().get(tenant).map(Arc::clone);
        if let Some(headroom) = known {
            if headroom.lease.cap() != cap {
                self.drain(&headroom);
                return None;
            }
            return (tokens <= headroom.step).then_some(headroom);
        }
        let share = u64::from(self.headroom_share());
        let step = cap / 100 * share + cap % 100 * share / 100;
        if step == 0 || tokens > step {
            return None;
        }
        let lease = self.new_lease(tenant, cap, 0).headroom();
        let headroom = Arc::new(Headroom {
            lease: Arc::new(lease),
            step,
            state: Mutex::default(),
        });
        // Another request may have made one meanwhile: the first one made stays.
        let mut all = self.write_headroom();
        let kept = all
            .entry(Arc::clone(headroom.lease.tenant()))
            .or_insert(headroom);
        Some(Arc::clone(kept))
    }

    /// Stops `headroom` admitting, and gives back what it does not use.
    fn drain(self: &Arc<Self>, headroom: &Arc<Headroom>) {
        let adjust = {
            let mut state = headroom.lock();
            if state.draining {
                return;
            }
            state.draining = true;
            self.wants_adjusting(headroom, &mut state, Instant::now())
        };
        if adjust {
            self.adjust_later(headroom);
        }
    }

    /// Whether `headroom` needs its task started now (and marks it started).
    fn wants_adjusting(&self, headroom: &Headroom, state: &mut State, now: Instant) -> bool {
        if state.adjusting || state.target(headroom.step, now).is_none() {
            return false;
        }
        state.adjusting = true;
        true
    }

    fn adjust_later(self: &Arc<Self>, headroom: &Arc<Headroom>) {
        let (this, headroom) = (Arc::clone(self), Arc::clone(headroom));
        self.runtime()
            .spawn(async move { this.adjust(&headroom).await });
    }

    /// Brings `headroom` to its target, one call at a time, until it is there.
    async fn adjust(self: &Arc<Self>, headroom: &Arc<Headroom>) {
        let lease = &headroom.lease;
        loop {
            let _order = lease.order().await;
            let now = Instant::now();
            let (to, checked, created) = {
                let mut state = headroom.lock();
                let Some((to, checked)) = state.target(headroom.step, now) else {
                    state.adjusting = false;
                    return;
                };
                if to < state.held {
                    // Given back here first: nothing more is admitted from it meanwhile.
                    state.held = to;
                    lease.set_tokens(to);
                }
                (to, checked, state.created)
            };
            let sent = Instant::now();
            let cap = lease.cap();
            let answer = if created {
                let cap = checked.then_some(cap);
                self.resize_call(lease, to, cap)
                    .await
                    .map_err(|f| f.to_string())
            } else {
                let made = self.timed(self.batches().reserve(lease, to, cap)).await;
                made.map_err(|failure| failure.to_string())
            };
            let mut state = headroom.lock();
            match answer {
                Ok((1, in_flight)) => {
                    state.set(lease, to, in_flight, sent + self.ttl() / 2);
                    if !created {
                        state.created = true;
                        self.hold(lease);
                    }
                    if !state.is_valid(Instant::now()) {
                        // Half a TTL is shorter than the call took: calling again at once
                        // would not help.
                        state.adjusting = false;
                        return;
                    }
                }
                Ok((_, in_flight)) => {
                    lease.set_in_flight(in_flight);
                    state.tight_until = Some(Instant::now() + TIGHT_FOR);
                }
                Err(failure) => {
                    tracing::debug!(tenant = &**lease.tenant(), %failure,
                        "could not resize a replica's headroom in redis");
                    state.tight_until = Some(Instant::now() + TIGHT_FOR);
                    if !created {
                        // It may have landed after all: let it go by id, and start afresh.
                        state.retired = true;
                        state.adjusting = false;
                        drop(state);
                        self.let_go(headroom);
                        return;
                    }
                    state.adjusting = false;
                    return;
                }
            }
        }
    }

    /// Gives back what `drawn` holds to its headroom.
    pub(super) fn give_back(self: &Arc<Self>, drawn: &Drawn) {
        let headroom = &drawn.headroom;
        let adjust = {
            let mut state = headroom.lock();
            if drawn.released.swap(true, Relaxed) {
                return;
            }
            state.used -= drawn.tokens.swap(0, Relaxed);
            self.wants_adjusting(headroom, &mut state, Instant::now())
        };
        if adjust {
            self.adjust_later(headroom);
        }
    }

    /// Sets what `drawn` holds to `tokens`, unchecked (as any resize): growth past the
    /// headroom is written to Redis in the background.
    pub(super) fn resize_drawn(self: &Arc<Self>, drawn: &Drawn, tokens: u64) {
        let headroom = &drawn.headroom;
        let adjust = {
            let mut state = headroom.lock();
            if drawn.released.load(Relaxed) {
                return;
            }
            let before = drawn.tokens.swap(tokens, Relaxed);
            state.used = state.used - before + tokens;
            self.wants_adjusting(headroom, &mut state, Instant::now())
        };
        if adjust {
            self.adjust_later(headroom);
        }
    }

    /// Grows what `drawn` holds to `tokens` if it fits under the cap: from what the
    /// headroom has unused, or else by growing its lease in Redis, checked.
    pub(super) async fn try_resize_drawn(
        self: &Arc<Self>,
        drawn: &Drawn,
        tokens: u64,
    ) -> Result<(), Error> {
        let tokens = clamp(tokens);
        if self.try_resize_drawn_now(drawn, tokens) {
            return Ok(());
        }
        let headroom = &drawn.headroom;
        let lease = &headroom.lease;
        let _order = lease.order().await;
        let (to, grow, created) = {
            let state = headroom.lock();
            let grow = tokens.saturating_sub(drawn.tokens.load(Relaxed));
            // Never below what it holds: the rest may be drawn meanwhile.
            let to = state.held.max(state.used.saturating_add(grow));
            (to, grow, state.created)
        };
        let overloaded = |in_flight| Error::TenantOverloaded {
            tenant_id: lease.tenant().to_string(),
            requested: grow,
            in_flight,
            cap: lease.cap(),
        };
        if !created {
            return Err(overloaded(lease.in_flight()));
        }
        let sent = Instant::now();
        let answer = self.resize_call(lease, to, Some(lease.cap())).await;
        let mut state = headroom.lock();
        match answer {
            Ok((1, in_flight)) => {
                state.set(lease, to, in_flight, sent + self.ttl() / 2);
                if !drawn.released.load(Relaxed) {
                    let before = drawn.tokens.swap(tokens, Relaxed);
                    state.used = state.used - before + tokens;
                }
                Ok(())
            }
            Ok((_, in_flight)) => {
                lease.set_in_flight(in_flight);
                Err(overloaded(in_flight))
            }
            Err(failure) => Err(failure.unavailable()),
        }
    }

    /// Takes a growth of `drawn` (or a shrink) from what its headroom has unused, if it
    /// can without Redis.
    pub(super) fn try_resize_drawn_now(&self, drawn: &Drawn, tokens: u64) -> bool {
        let mut state = drawn.headroom.lock();
        if drawn.released.load(Relaxed) {
            return true;
        }
        let before = drawn.tokens.load(Relaxed);
        let fits = tokens <= before
            || (state.is_valid(Instant::now()) && state.used - before + tokens <= state.held);
        if fits {
            drawn.tokens.store(tokens, Relaxed);
            state.used = state.used - before + tokens;
        }
        fits
    }

    /// Lets go of the headrooms nothing asked for since the last renewal and nothing
    /// drawn from holds, releasing their leases. Run at each renewal.
    pub(super) fn let_go_idle_headroom(self: &Arc<Self>) {
        let mut idle = Vec::new();
        self.write_headroom().retain(|_, headroom| {
            let mut state = headroom.lock();
            let keep = (state.touched && !state.draining) || state.used > 0 || state.adjusting;
            state.touched = false;
            if !keep {
                state.retired = true;
                idle.push(Arc::clone(headroom));
            }
            keep
        });
        for headroom in idle {
            self.let_go(&headroom);
        }
    }

    /// Releases a retired headroom's lease, and forgets the headroom.
    fn let_go(self: &Arc<Self>, headroom: &Arc<Headroom>) {
        let mut all = self.write_headroom();
        if all
            .get(headroom.lease.tenant())
            .is_some_and(|known| Arc::ptr_eq(known, headroom))
        {
            all.remove(headroom.lease.tenant());
        }
        drop(all);
        self.forget(&headroom.lease);
        self.release_later(Arc::clone(&headroom.lease));
    }

    /// The headrooms whose leases a renewal sent at `sent` pushed back may admit for
    /// another half TTL.
    pub(super) fn headroom_renewed(&self, renewed: &[&Arc<Lease>], sent: Instant) {
        let all = self.read_headroom();
        for lease in renewed {
            if let Some(headroom) = all.get(lease.tenant()) {
                if Arc::ptr_eq(&headroom.lease, lease) {
                    let mut state = headroom.lock();
                    let until = sent + self.ttl() / 2;
                    state.valid_until = state.valid_until.max(Some(until));
                }
            }
        }
    }
}
