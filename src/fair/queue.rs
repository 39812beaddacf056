//! Waiting for capacity: bounded in time and length, first come first served within a
//! tenant, and across tenants by priority, then fairly, for the shared budgets they wait
//! for.
//!
//! Fairness is the virtual token counter of "Fairness in Serving Large Language Models"
//! (Sheng et al., OSDI 2024): each tenant counts the tokens admitted for it from shared
//! budgets, divided by its weight, and when a budget frees, the waiting tenant with the
//! smallest count goes next. A tenant that starts waiting again after none of its requests
//! waited starts at the smallest count among those waiting, so idle time banks no credit.
//! Once it is a request's turn for a budget, no other request takes that budget's
//! capacity from it: arrivals queue behind it, and other waiters wait their turn.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use super::priority::Priority;
use crate::Error;

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
}

/// The requests waiting for capacity, and every tenant's virtual token counter.
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) max_wait: Duration,
    max_queued: usize,
    /// Requests waiting across tenants: 0 lets admissions skip the lock.
    queued: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    tenants: HashMap<Box<str>, Tenant>,
    next_seq: u64,
}

#[derive(Debug, Default)]
struct Tenant {
    /// First come, first served: only the first may try to reserve.
    waiting: VecDeque<Waiter>,
    /// Tokens admitted from shared budgets, divided by the tenant's weight.
    served: f64,
    /// Its requests admitted from shared budgets and not yet released.
    running: usize,
}

impl Tenant {
    /// Waiting or running: its counter is current.
    fn is_active(&self) -> bool {
        !self.waiting.is_empty() || self.running != 0
    }
}

#[derive(Debug)]
struct Waiter {
    seq: u64,
    class: Priority,
    /// The budget that last refused it, when that is what it waits for; `None` while it
    /// waits for its tenant's own cap.
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
    /// may try to reserve at once: not while others of its tenant wait (first come, first
    /// served), nor while a request of its class or a higher one waits for a budget it
    /// draws from. A sheddable request is refused instead while anyone waits for one.
    #[inline]
    pub(crate) fn arrival(&self, tenant: &str, class: Priority, keys: &impl Draws) -> Arrival {
        if self.queued.load(Relaxed) == 0 {
            return Arrival::Go;
        }
        let state = self.lock();
        let own = state.tenants.get(tenant);
        let mut arrival = match own {
            Some(own) if !own.waiting.is_empty() => Arrival::Queue,
            _ => Arrival::Go,
        };
        for waiter in state.tenants.values().flat_map(|t| &t.waiting) {
            let Some(budget) = waiter.budget.as_deref() else {
                continue;
            };
            if !keys.draws_from(budget) {
                continue;
            }
            if class == Priority::Sheddable {
                return Arrival::Shed(Box::from(budget));
            }
            if waiter.class >= class {
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
            let least = least_served(&state);
            let seq = state.next_seq;
            state.next_seq += 1;
            let own = state.tenants.entry(Box::from(tenant)).or_default();
            if own.waiting.len() >= self.max_queued {
                return None;
            }
            if !own.is_active() {
                // Back from idle: no credit banked while it asked for nothing.
                own.served = own.served.max(least.unwrap_or(own.served));
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
        match state.tenants.get_mut(tenant) {
            Some(own) => {
                if !own.is_active() {
                    // Back from idle, admitted at once: no credit banked either.
                    let least = least_served(&state);
                    let own = state.tenants.get_mut(tenant).expect("found above");
                    own.served = own.served.max(least.unwrap_or(own.served));
                    own.served += share;
                    own.running += 1;
                } else {
                    own.served += share;
                    own.running += 1;
                }
            }
            None => {
                if state.tenants.len() >= KEEP_IDLE_COUNTERS {
                    state.tenants.retain(|_, t| t.is_active());
                }
                // New or forgotten: it starts with the least served of the active ones.
                let start = least_served(&state).unwrap_or(0.0);
                let own = Tenant {
                    served: start + share,
                    running: 1,
                    ..Tenant::default()
                };
                state.tenants.insert(Box::from(tenant), own);
            }
        }
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

    /// Every tenant's first waiting request looks again: capacity may have come back
    /// elsewhere (another replica released).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn wake_all(&self) {
        if self.queued.load(Relaxed) != 0 {
            wake_heads(&self.lock());
        }
    }

    /// Whether `tenant` has requests waiting here, or admitted from shared budgets and
    /// still running.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn is_active(&self, tenant: &str) -> bool {
        self.lock()
            .tenants
            .get(tenant)
            .is_some_and(Tenant::is_active)
    }

    /// Nothing under this lock can panic half-way, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The smallest counter among the active tenants (waiting or running).
fn least_served(state: &State) -> Option<f64> {
    state
        .tenants
        .values()
        .filter(|t| t.is_active())
        .map(|t| t.served)
        .reduce(f64::min)
}

fn wake_heads(state: &State) {
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
    /// Whether it is this request's turn to try: it is first of its tenant's, and for
    /// every budget it draws from that others wait for, it comes first among the tenants'
    /// first requests waiting for that budget (by class, then the least served, then the
    /// earliest).
    pub(crate) fn may_try(&self, keys: &impl Draws) -> bool {
        let state = self.queue.lock();
        let Some(own) = state.tenants.get(&*self.tenant) else {
            return false;
        };
        let Some(me) = own.waiting.front().filter(|head| head.seq == self.seq) else {
            return false;
        };
        let rank = |waiter: &Waiter, served: f64| (waiter.class, -served, waiter.seq);
        let mine = rank(me, own.served);
        for (tenant, other) in &state.tenants {
            let Some(head) = other.waiting.front() else {
                continue;
            };
            if **tenant == *self.tenant {
                continue;
            }
            let Some(budget) = head.budget.as_deref() else {
                continue;
            };
            if keys.draws_from(budget) && greater(rank(head, other.served), mine) {
                return false;
            }
        }
        true
    }

    /// Records why the last try was refused: the budget it now waits for, or its own cap.
    /// `elsewhere`: the budget orders its waiting requests itself (in Redis, across
    /// replicas), so this queue does not order them for it.
    pub(crate) fn refused(&self, error: &Error, elsewhere: bool) {
        let mut state = self.queue.lock();
        let Some(own) = state.tenants.get_mut(&*self.tenant) else {
            return;
        };
        if let Some(me) = own.waiting.iter_mut().find(|w| w.seq == self.seq) {
            let budget = blocking_budget(error).filter(|_| !elsewhere);
            if me.budget != budget {
                me.budget = budget;
                wake_heads(&state); // the turn may have passed to another
            }
        }
    }

    /// Waits until woken or `limit` has passed, whichever is first.
    pub(crate) async fn wait(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.notify.notified()).await;
    }
}

/// `a` goes before `b`: a higher class, then a smaller counter, then an earlier arrival.
fn greater(a: (Priority, f64, u64), b: (Priority, f64, u64)) -> bool {
    match a.0.cmp(&b.0) {
        std::cmp::Ordering::Equal => match a.1.partial_cmp(&b.1) {
            Some(std::cmp::Ordering::Equal) | None => a.2 < b.2,
            Some(order) => order.is_gt(),
        },
        order => order.is_gt(),
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        if let Some(own) = state.tenants.get_mut(&*self.tenant) {
            if let Some(at) = own.waiting.iter().position(|w| w.seq == self.seq) {
                own.waiting.remove(at);
                self.queue.queued.fetch_sub(1, Relaxed);
            }
        }
        wake_heads(&state);
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
