//! Waiting for capacity: bounded in time and length, first come first served within a
//! tenant, and across tenants by priority, then fairly, for the shared budgets they wait
//! for.
//!
//! # The fair order
//!
//! This is the one statement of the rule. The queue Redis keeps for a budget shared by
//! replicas (`redis::queue`) follows it step for step, and `tests/fair_conformance.rs`
//! runs the same scripts against both and expects the same admissions in the same order.
//! The counters are the virtual token counters of "Fairness in Serving Large Language
//! Models" (Sheng et al., OSDI 2024).
//!
//! 1. **Class first.** A waiting request of a higher [`Priority`] class goes before every
//!    waiting request of a lower one.
//! 2. **Then the least counter.** Each tenant has a counter: the tokens admitted for it
//!    from shared budgets, divided by its weight (at least 1), counted when admitted.
//!    Among the tenants waiting in the same class, the one with the smallest counter goes
//!    next.
//! 3. **Equal counters: the earlier place.** A tenant takes a place in line when its first
//!    waiting request starts waiting for the budget. When that request goes (admitted,
//!    cancelled or timed out), its tenant's next request of the same class keeps the
//!    place; one of another class takes a new one. A request waiting for its tenant's own
//!    cap holds no place, and takes a new one when it waits for the budget again.
//! 4. **First come, first served within a tenant.** Only a tenant's first waiting request
//!    may try; the others queue behind it.
//! 5. **The turn is kept.** Once it is a request's turn for a budget, no other request
//!    takes that budget's capacity: arrivals of its class or a lower one queue behind it
//!    (a sheddable one is refused while anyone waits), and the other waiters wait their
//!    turn, even when what is free would fit them and not it, so a large request is not
//!    starved.
//! 6. **No credit for idle time.** A tenant is idle while none of its requests waits or
//!    runs (admitted from shared budgets and not yet released). When a request of an idle
//!    tenant arrives, its counter is raised, never lowered, to the least counter among
//!    the tenants in line (rule 3); when none is, to the counter of the tenant admitted
//!    last, as that admission left it.
//!
//! Why this lift (6):
//!
//! - A tenant coming back must not start far below the tenants that kept using the
//!   budget, or it would take the budget for as long as it takes to catch up. Raised to
//!   the least counter among those waiting, it competes from where they stand, behind
//!   the ones already there with the same counter (3).
//! - A tenant with a request running is not idle and keeps its counter: a tenant that
//!   keeps a request or two going and asks again as each ends gets its share against one
//!   that keeps many waiting, instead of being pulled up to it at every request.
//! - When nobody waits, the budget is not contended, and the counter of the tenant served
//!   last tracks the counters of those using it, down as well as up (the paper's "last
//!   client to leave the queue"). The largest counter ever seen would put a returning
//!   tenant behind every tenant whose counter grows slowly (a heavy weight); its own old
//!   counter would let a tenant that left while others used the budget come back ahead
//!   of all of them.
//! - Not the least counter among the tenants running: across replicas, none knows what
//!   runs on the others. Who waits and who was admitted last, this process and Redis
//!   both know exactly, so the rule is the same in both.
//!
//! Here one counter per tenant spans the layer's shared budgets; Redis keeps one per
//! budget (next to the budget, in its cluster slot). With one budget they are the same.
//! An idle tenant's counter may be forgotten (here past 4,096 tenants, in Redis when the
//! budget's queue has gone unused for 20 lease TTLs, ten minutes at least): it then
//! counts from 0, lifted as any other.
//!
//! In Redis a replica judges idleness by its own requests and by the tickets in Redis:
//! a tenant with requests running only on another replica counts as idle there, and
//! the lift only ever raises it to a level others wait at.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use super::priority::Priority;
use crate::Error;

#[cfg(feature = "redis")]
mod redis;

/// How often a waiting request looks again even without being woken: capacity can also
/// come back without a release through this layer (a raised cap, a reservation made
/// outside the layer, another replica's release).
pub(crate) const RECHECK: Duration = Duration::from_millis(50);

/// How many tenants' counters are kept at most while none of their requests wait.
const KEEP_IDLE_COUNTERS: usize = 4_096;

/// The shared budgets a request draws from, as the queue asks about them.
pub(crate) trait Draws {
    /// Whether the request draws from the budget keyed `key`.
    fn draws_from(&self, key: &str) -> bool;

    /// Whether this queue orders the request: it draws from a budget, and none in Redis
    /// (whose queue orders it across replicas).
    fn ordered_here(&self) -> bool;
}

/// A place held in an order kept elsewhere (a budget's queue in Redis), handed to the
/// tenant's next request of the same class (rule 3). Dropped untaken, it is given up
/// there.
pub(crate) type Place = Box<dyn Any + Send + Sync>;

/// The requests waiting for capacity, and every tenant's virtual token counter.
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) max_wait: Duration,
    max_queued: usize,
    /// Requests waiting across tenants: 0 lets admissions skip the lock.
    queued: AtomicUsize,
    state: Mutex<Line>,
}

/// The requests in line, and every tenant's counter.
#[derive(Debug, Default)]
struct Line {
    tenants: HashMap<Box<str>, Tenant>,
    next_seq: u64,
    /// The counter of the tenant admitted last, as that admission left it.
    last: f64,
}

impl Line {
    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Where an idle tenant's counter is raised to when a request of it arrives (rule 6):
    /// the least counter among the tenants waiting, or the last admitted's.
    fn floor(&self) -> f64 {
        self.tenants
            .values()
            .filter(|t| t.place.is_some())
            .map(|t| t.served)
            .reduce(f64::min)
            .unwrap_or(self.last)
    }
}

#[derive(Debug, Default)]
struct Tenant {
    /// First come, first served: only the first may try.
    waiting: VecDeque<Waiter>,
    /// Tokens admitted from shared budgets, divided by the tenant's weight.
    served: f64,
    /// Its requests admitted from shared budgets and not yet released.
    running: usize,
    /// Its place in line among equal counters (rule 3), while its first waiting request
    /// waits for a budget this queue orders: `None` while that one waits for its
    /// tenant's own cap or for budgets ordered elsewhere, and while nothing waits.
    place: Option<u64>,
    /// Places in orders kept elsewhere, for its next request.
    passed: Vec<Passed>,
}

impl Tenant {
    /// Waiting or running: not idle (rule 6).
    fn is_active(&self) -> bool {
        !self.waiting.is_empty() || self.running != 0
    }
}

/// A place passed on, and the waiting request it is for: it is given up if that request
/// goes without taking it.
struct Passed {
    class: Priority,
    to: u64,
    place: Place,
}

impl fmt::Debug for Passed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Passed")
            .field("class", &self.class)
            .field("to", &self.to)
            .field("place", &self.place)
            .finish()
    }
}

#[derive(Debug)]
struct Waiter {
    seq: u64,
    class: Priority,
    /// The budget it waits for, once one refused it or it let another waiting for one go
    /// first. `None` while it waits for its tenant's own cap, for budgets ordered
    /// elsewhere, or, as its tenant's first, before it tried: then it is taken to wait
    /// for every budget this queue orders, so that it holds back those after it from the
    /// moment it is first.
    budget: Option<Box<str>>,
    notify: Arc<Notify>,
}

/// What an arriving request must do.
pub(crate) enum Arrival {
    /// Try to reserve now.
    Go,
    /// Queue behind the requests waiting before it.
    Queue,
    /// Refused: it is sheddable and others wait for this budget.
    Shed(Box<str>),
}

impl Queue {
    pub(crate) fn new(max_wait: Duration, max_queued: usize) -> Self {
        Self {
            max_wait,
            max_queued,
            queued: AtomicUsize::new(0),
            state: Mutex::default(),
        }
    }

    /// Whether a request of `tenant` in `class`, drawing from the budgets under `keys`,
    /// may try to reserve at once: not while others of its tenant wait (rule 4), nor while
    /// a tenant of its class or a higher one is in line for a budget it draws from (rule
    /// 5). A sheddable request is refused instead while anyone is in line for one.
    #[inline]
    pub(crate) fn arrival(&self, tenant: &str, class: Priority, keys: &impl Draws) -> Arrival {
        if self.queued.load(Relaxed) == 0 {
            return Arrival::Go;
        }
        let state = self.lock();
        let mut arrival = match state.tenants.get(tenant) {
            Some(own) if !own.waiting.is_empty() => Arrival::Queue,
            _ => Arrival::Go,
        };
        let here = keys.ordered_here();
        for other in state.tenants.values().filter(|t| t.place.is_some()) {
            let Some(head) = other.waiting.front() else {
                continue;
            };
            let budget = head.budget.as_deref();
            if !budget.map_or(here, |budget| keys.draws_from(budget)) {
                continue;
            }
            if class == Priority::Sheddable {
                match budget {
                    Some(budget) => return Arrival::Shed(Box::from(budget)),
                    None => continue,
                }
            }
            if head.class >= class {
                arrival = Arrival::Queue;
            }
        }
        arrival
    }

    /// Joins `tenant`'s queue, unless it is full; `refused` is why it could not reserve
    /// at once, if it tried.
    pub(crate) fn enqueue(
        self: &Arc<Self>,
        tenant: &str,
        class: Priority,
        refused: Option<&Error>,
    ) -> Option<Ticket> {
        let notify = Arc::new(Notify::new());
        let seq = {
            let mut state = self.lock();
            let floor = state.floor();
            let seq = state.next_seq();
            let own = state.tenants.entry(Box::from(tenant)).or_default();
            if own.waiting.len() >= self.max_queued {
                return None;
            }
            if !own.is_active() {
                own.served = own.served.max(floor);
            }
            if own.waiting.is_empty() {
                let own_cap = matches!(refused, Some(Error::TenantOverloaded { .. }));
                own.place = (!own_cap).then_some(seq);
            }
            own.waiting.push_back(Waiter {
                seq,
                class,
                budget: refused.and_then(blocking_budget),
                notify: Arc::clone(&notify),
            });
            self.queued.fetch_add(1, Relaxed);
            seq
        };
        Some(Ticket {
            queue: Arc::clone(self),
            tenant: Box::from(tenant),
            seq,
            notify,
        })
    }

    /// Counts `tokens` admitted for `tenant` from shared budgets, at `weight`, until
    /// [`released`](Self::released).
    pub(crate) fn served(&self, tenant: &str, tokens: u64, weight: u32) {
        let mut state = self.lock();
        let share = tokens as f64 / f64::from(weight.max(1));
        let idle = state
            .tenants
            .get(tenant)
            .map_or(true, |own| !own.is_active());
        let floor = idle.then(|| state.floor());
        if !state.tenants.contains_key(tenant) {
            if state.tenants.len() >= KEEP_IDLE_COUNTERS {
                state.tenants.retain(|_, t| t.is_active());
            }
            state.tenants.insert(Box::from(tenant), Tenant::default());
        }
        let own = state.tenants.get_mut(tenant).expect("inserted above");
        if let Some(floor) = floor {
            own.served = own.served.max(floor);
        }
        own.served += share;
        own.running += 1;
        state.last = own.served;
    }

    /// A reservation ended: `tenant`'s, if [`served`](Self::served) counted it. Every
    /// tenant's first waiting request looks again.
    pub(crate) fn released(&self, tenant: Option<&str>) {
        if tenant.is_none() && self.queued.load(Relaxed) == 0 {
            return;
        }
        let mut state = self.lock();
        if let Some(own) = tenant.and_then(|tenant| state.tenants.get_mut(tenant)) {
            own.running = own.running.saturating_sub(1);
        }
        wake_heads(&state);
    }

    /// Nothing under this lock can panic half-way, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Line> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn wake_heads(state: &Line) {
    for head in state.tenants.values().filter_map(|t| t.waiting.front()) {
        head.notify.notify_one();
    }
}

/// The budget a refusal waits for, if a budget refused.
fn blocking_budget(error: &Error) -> Option<Box<str>> {
    match error {
        Error::BudgetOverloaded { budget, .. } => Some(Box::from(budget.as_str())),
        _ => None,
    }
}

/// A place in the queue. Dropped — admitted, timed out, or cancelled with its request —
/// it leaves the queue and wakes the others, who may go next.
#[derive(Debug)]
pub(crate) struct Ticket {
    queue: Arc<Queue>,
    tenant: Box<str>,
    seq: u64,
    notify: Arc<Notify>,
}

impl Ticket {
    /// Whether it is this request's turn to try: it is first of its tenant's, and no
    /// tenant in line for a budget it draws from goes before it (rules 1 to 3). A first
    /// request that has not tried yet and lets one waiting for a budget go first waits for
    /// that budget from then on.
    pub(crate) fn may_try(&self, keys: &impl Draws) -> bool {
        let mut state = self.queue.lock();
        let Some(own) = state.tenants.get(&*self.tenant) else {
            return false;
        };
        let Some(me) = own.waiting.front().filter(|head| head.seq == self.seq) else {
            return false;
        };
        let mine = (me.class, own.served, own.place.unwrap_or(u64::MAX));
        let here = keys.ordered_here();
        let mut ahead = None;
        for (tenant, other) in &state.tenants {
            let (Some(head), Some(place)) = (other.waiting.front(), other.place) else {
                continue;
            };
            if **tenant == *self.tenant {
                continue;
            }
            let blocks = head
                .budget
                .as_deref()
                .map_or(here, |budget| keys.draws_from(budget));
            if blocks && goes_before((head.class, other.served, place), mine) {
                ahead = Some(head.budget.clone());
                break;
            }
        }
        let Some(budget) = ahead else {
            return true;
        };
        if budget.is_some() {
            let own = state.tenants.get_mut(&*self.tenant).expect("found above");
            let me = own.waiting.front_mut().expect("found above");
            if me.budget.is_none() && own.place.is_some() {
                me.budget = budget;
                wake_heads(&state); // it no longer holds back those waiting for others
            }
        }
        false
    }

    /// Records why the last try was refused: the budget it now waits for, or its own cap.
    /// `elsewhere`: the budget orders its waiting requests itself (in Redis, across
    /// replicas), so this queue does not order them for it.
    pub(crate) fn refused(&self, error: &Error, elsewhere: bool) {
        let mut given_up = Vec::new();
        {
            let mut state = self.queue.lock();
            let Line {
                tenants, next_seq, ..
            } = &mut *state;
            let Some(own) = tenants.get_mut(&*self.tenant) else {
                return;
            };
            let first = own.waiting.front().is_some_and(|w| w.seq == self.seq);
            let Some(me) = own.waiting.iter_mut().find(|w| w.seq == self.seq) else {
                return;
            };
            let budget = blocking_budget(error).filter(|_| !elsewhere);
            let mut changed = me.budget != budget;
            if first {
                // In line while it waits for a budget ordered here (at the back of its
                // equals if it was not); at its own cap, out of line everywhere.
                let place = match budget {
                    Some(_) => Some(own.place.unwrap_or(*next_seq)),
                    None => None,
                };
                if place == Some(*next_seq) {
                    *next_seq += 1;
                }
                if matches!(error, Error::TenantOverloaded { .. }) {
                    given_up = std::mem::take(&mut own.passed);
                }
                changed |= place != own.place;
                own.place = place;
            }
            me.budget = budget;
            if changed {
                wake_heads(&state); // the turn may have passed to another
            }
        }
        drop(given_up);
    }

    /// Waits until woken or `limit` has passed, whichever is first.
    pub(crate) async fn wait(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.notify.notified()).await;
    }
}

/// Whether `a` goes before `b`, each a class, counter and place: a higher class, then a
/// smaller counter, then an earlier place.
fn goes_before(a: (Priority, f64, u64), b: (Priority, f64, u64)) -> bool {
    use std::cmp::Ordering::{Equal, Greater, Less};
    match a.0.cmp(&b.0) {
        Equal => match a.1.partial_cmp(&b.1) {
            Some(Less) => true,
            Some(Greater) => false,
            Some(Equal) | None => a.2 < b.2,
        },
        order => order == Greater,
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut given_up = Vec::new();
        {
            let mut state = self.queue.lock();
            let Line {
                tenants, next_seq, ..
            } = &mut *state;
            if let Some(own) = tenants.get_mut(&*self.tenant) {
                if let Some(at) = own.waiting.iter().position(|w| w.seq == self.seq) {
                    let gone = own.waiting.remove(at).expect("found above");
                    self.queue.queued.fetch_sub(1, Relaxed);
                    // A place passed on to it and not taken goes with it.
                    let (kept, lost) = std::mem::take(&mut own.passed)
                        .into_iter()
                        .partition(|passed| passed.to != gone.seq);
                    own.passed = kept;
                    given_up = lost;
                    if at == 0 {
                        // Rule 3: the next of its class keeps the place, another takes one.
                        match own.waiting.front() {
                            Some(next) if next.class == gone.class && own.place.is_some() => {}
                            Some(_) => {
                                own.place = Some(*next_seq);
                                *next_seq += 1;
                            }
                            None => own.place = None,
                        }
                    }
                }
            }
            wake_heads(&state);
        }
        drop(given_up);
    }
}

/// Wakes the waiting requests once a reservation is released. Held last in the
/// reservation, so it runs after the tokens are back.
#[derive(Debug)]
pub(crate) struct Wake {
    pub(crate) queue: Arc<Queue>,
    /// The tenant whose running count this reservation is in, if it drew from budgets.
    pub(crate) counted: Option<Box<str>>,
}

impl Drop for Wake {
    fn drop(&mut self) {
        self.queue.released(self.counted.as_deref());
    }
}
