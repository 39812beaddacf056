//! The fair order of `admit::queue` (its module notes state the rule, "The fair order",
//! once), kept in Redis for the requests waiting on a shared budget across replicas. The
//! scripts are in `queue.lua`.
//!
//! Per budget key, next to the budget's own leases and under the same hash tag (so a
//! cluster keeps the budget and its queue in one slot), Redis keeps:
//!
//! - `{prefix}{t:<key>}:q:tickets`, a hash: ticket id → its class digit and tenant; under
//!   `=<class><tenant>` how many tickets that tenant has waiting in that class, under
//!   `=p<class><tenant>` its member in the class's turn, and under `=n` the last place
//!   given out (ticket ids never start with `=`);
//! - `{prefix}{t:<key>}:q:deadlines`, a sorted set: ticket id → deadline (Redis's clock),
//!   pushed back by the renewal of the replica that waits, so a dead replica's tickets
//!   expire with its leases;
//! - `{prefix}{t:<key>}:q:turn:<class>`, one sorted set per class, of the tenants with a
//!   ticket of that class: member (the tenant's place, 16 hex digits, then its name) →
//!   its counter, so that the first member is the tenant whose turn it is;
//! - `{prefix}{t:<key>}:q:vtc`, a hash: `t:<tenant>` → the tenant's counter (tokens
//!   admitted from the budget divided by its weight), and `=last`, the counter of the
//!   tenant admitted last.
//!
//! A request holds a ticket while it is its tenant's first waiting request on its replica
//! and waits for the budget (not for its tenant's own cap). It reserves the budget only
//! in its turn, and while it is refused for room the turn stays with it. When it goes
//! (admitted, cancelled, timed out) and the next request of its tenant on the replica is
//! of the same class, its ticket is handed to that one rather than given up, by the very
//! script that admits it when it is admitted: the tenant keeps its place (rule 3) with no
//! moment out of line in which a tenant behind it could take its turn. A request without
//! a ticket goes straight to the budget only when no ticket of its class or a higher one
//! waits; a sheddable one is refused while any ticket waits. Every script first sweeps the
//! tickets past their deadline.
//!
//! Wake-ups: an admission that leaves tickets waiting and a cancelled ticket publish on
//! `{prefix}{t:<key>}:q:wake` in their script; a release (sent in the tracker's batches)
//! is followed, once Redis has answered it, by a small script that publishes there if
//! tickets wait. Each replica listens on one dedicated pub/sub connection (a pattern
//! subscription to every budget of the tracker) and wakes its waiting requests. Their
//! periodic look is the safety net.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use redis::{Script, ScriptInvocation};

use super::keys::escape_glob;
use super::lease::Lease;
use super::reservation::RedisReservation;
use super::reserve::Unanswered;
use super::scripts::scripts;
use super::shared::Inner;
use super::stats::Count;
use crate::fair::{Priority, Queue};
use crate::Error;

/// One waiting request's place in the fair order of the Redis budgets it draws from: its
/// tenant, class and weight, and the ticket it holds (or may hold) in each budget.
/// Dropped, it gives up every ticket still held.
pub(crate) struct Turn {
    tenant: Box<str>,
    class: Priority,
    weight: u32,
    queue: Arc<Queue>,
    tickets: Mutex<Vec<Place>>,
}

/// A ticket of one budget key, as this request knows it.
struct Place {
    inner: Arc<Inner>,
    key: Arc<str>,
    id: String,
    /// It may be in Redis: taken, or asked for without an answer.
    held: bool,
}

impl Turn {
    pub(crate) fn new(tenant: &str, class: Priority, weight: u32, queue: Arc<Queue>) -> Self {
        Self {
            tenant: Box::from(tenant),
            class,
            weight: weight.max(1),
            queue,
            tickets: Mutex::new(Vec::new()),
        }
    }

    /// Whether `error` is the refusal of a budget this turn orders in Redis: then the order
    /// across replicas is Redis's, not this process's.
    pub(crate) fn orders(&self, error: &Error) -> bool {
        let Error::BudgetOverloaded { budget, .. } = error else {
            return false;
        };
        self.lock().iter().any(|place| *place.key == **budget)
    }

    /// Gives up every ticket held (a request that must let others of its tenant go first
    /// here takes a new one, under a new id, when it may try again).
    pub(crate) fn give_up(&self) {
        for place in self.lock().iter_mut().filter(|place| place.held) {
            place.held = false;
            place.inner.cancel_later(&place.key, &place.id);
            let seq = place.inner.fair().next_ticket();
            place.id = format!("{}:q{seq}", place.inner.replica());
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Place>> {
        self.tickets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The ticket id for `key` in `inner`'s budgets, marked as possibly held: the one
    /// handed to this request by the one before it of its tenant, if any. That one may
    /// arrive after this request took a ticket of its own (the one before it leaves this
    /// process's queue, which wakes this one, before it hands its ticket over): its own is
    /// then given up.
    fn ticket(&self, inner: &Arc<Inner>, key: &str) -> String {
        let passed = self
            .queue
            .take_passed(&self.tenant, self.class, |place| {
                place
                    .downcast_ref::<Passed>()
                    .is_some_and(|passed| passed.is_for(inner, key))
            })
            .and_then(|place| place.downcast::<Passed>().ok())
            .map(|mut passed| passed.take());
        let mut places = self.lock();
        let found = places
            .iter()
            .position(|place| Arc::ptr_eq(&place.inner, inner) && *place.key == *key);
        let place = match found {
            Some(at) => {
                let place = &mut places[at];
                if let Some(id) = passed {
                    if place.held {
                        place.inner.cancel_later(&place.key, &place.id);
                    }
                    place.id = id;
                }
                place
            }
            None => {
                let id = passed.unwrap_or_else(|| {
                    let seq = inner.fair().next_ticket();
                    format!("{}:q{seq}", inner.replica())
                });
                places.push(Place {
                    inner: Arc::clone(inner),
                    key: Arc::from(key),
                    id,
                    held: false,
                });
                places.last_mut().expect("just pushed")
            }
        };
        place.held = true;
        place.id.clone()
    }

    /// Records what Redis answered for the ticket of `key`: still held, gone, or kept for
    /// the next request of the tenant (`passed`), which this request hands it to.
    fn answered(&self, inner: &Arc<Inner>, key: &str, held: bool, passed: bool) {
        let mut places = self.lock();
        let found = places
            .iter_mut()
            .find(|place| Arc::ptr_eq(&place.inner, inner) && *place.key == *key);
        let Some(place) = found else {
            return;
        };
        place.held = held;
        if passed {
            // Still renewed with this replica's tickets until the next request takes it.
            let ticket = (Arc::clone(inner), Arc::clone(&place.key), place.id.clone());
            let seq = inner.fair().next_ticket();
            place.id = format!("{}:q{seq}", inner.replica());
            drop(places);
            let passed = Box::new(Passed(Some(ticket)));
            self.queue.pass_on(&self.tenant, self.class, passed, true);
            return;
        }
        let mut tickets = inner.fair().lock_tickets();
        if held {
            tickets.insert(place.id.clone(), Arc::clone(&place.key));
        } else {
            tickets.remove(&place.id);
        }
    }
}

impl Drop for Turn {
    /// The tickets still held pass to the tenant's next request of this class here, or
    /// are given up. The request has left this process's queue by now (a waiting request
    /// drops its place there before its turn), so that next request is its tenant's first.
    fn drop(&mut self) {
        let places = std::mem::take(&mut *self.lock());
        for place in places.into_iter().filter(|place| place.held) {
            let passed = Box::new(Passed(Some((place.inner, place.key, place.id))));
            self.queue.pass_on(&self.tenant, self.class, passed, false);
        }
    }
}

/// A ticket handed from one request of a tenant to its next (see the module notes): the
/// tracker, budget key and ticket id. Dropped untaken, it is given up in Redis.
struct Passed(Option<(Arc<Inner>, Arc<str>, String)>);

impl Passed {
    fn is_for(&self, inner: &Arc<Inner>, key: &str) -> bool {
        self.0
            .as_ref()
            .is_some_and(|(held_in, held_key, _)| Arc::ptr_eq(held_in, inner) && **held_key == *key)
    }

    /// The ticket id, taken over: no longer given up when this is dropped.
    fn take(&mut self) -> String {
        self.0.take().expect("taken once").2
    }
}

impl Drop for Passed {
    fn drop(&mut self) {
        if let Some((inner, key, id)) = self.0.take() {
            inner.cancel_later(&key, &id);
        }
    }
}

impl std::fmt::Debug for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turn")
            .field("tenant", &self.tenant)
            .field("class", &self.class)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

/// Class digits as the scripts order them.
fn class_digit(class: Priority) -> u8 {
    match class {
        Priority::Sheddable => 0,
        Priority::Standard => 1,
        Priority::Critical => 2,
    }
}

impl Inner {
    /// The keys of budget `key`'s queue: tickets, deadlines, counters, the three turns.
    fn queue_keys(&self, key: &str) -> [String; 6] {
        let base = format!("{}{{t:{key}}}:q:", self.prefix());
        [
            format!("{base}tickets"),
            format!("{base}deadlines"),
            format!("{base}vtc"),
            format!("{base}turn:0"),
            format!("{base}turn:1"),
            format!("{base}turn:2"),
        ]
    }

    fn channel(&self, key: &str) -> String {
        format!("{}{{t:{key}}}:q:wake", self.prefix())
    }

    /// A script on budget `key`'s leases and queue, its keys given.
    fn on_queue<'a>(&self, script: &'a Script, key: &str) -> ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        invocation.key(self.key(key));
        for name in &self.queue_keys(key) {
            invocation.key(name);
        }
        invocation
    }

    pub(super) async fn reserve_in_turn(
        this: &Arc<Self>,
        key: &str,
        tokens: u64,
        turn: &Arc<Turn>,
    ) -> Result<RedisReservation, Error> {
        let cap = this.cap(key);
        if tokens > cap {
            return Err(Error::RequestTooLarge {
                tenant_id: key.to_owned(),
                tokens,
                cap,
            });
        }
        if !this.breaker().allow() {
            return this.unavailable(key, tokens, true, "circuit open");
        }
        this.listen(&turn.queue);
        let lease = Arc::new(this.new_lease(key, cap, tokens));
        // Released by id should the answer never come (it may have landed).
        let unanswered = Unanswered::new(this, Arc::clone(&lease));
        let ticket = turn.ticket(this, key);
        let active = turn.queue.is_active(&turn.tenant);
        // Its ticket stays for the next request of its tenant here if that one is of the
        // same class (the script keeps it only for a request that holds it).
        let pass = turn.queue.next_class(&turn.tenant) == Some(turn.class);
        let share = tokens as f64 / f64::from(turn.weight);
        let mut invocation = this.on_queue(&scripts().queue_admit, key);
        invocation
            .arg(lease.id())
            .arg(tokens)
            .arg(cap)
            .arg(this.ttl_ms())
            .arg(&ticket)
            .arg(&*turn.tenant)
            .arg(class_digit(turn.class))
            .arg(share.to_string())
            .arg(u8::from(active))
            .arg(this.channel(key))
            .arg(u8::from(pass));
        let mut conn = this.conn().clone();
        let answer: Result<(i64, u64), _> = this.timed(invocation.invoke_async(&mut conn)).await;
        let (status, in_flight) = match answer {
            Ok(answer) => answer,
            Err(failure) => {
                let reason = failure.to_string();
                this.breaker().failure(&reason);
                drop(unanswered);
                return this.unavailable(key, tokens, true, &reason);
            }
        };
        this.breaker().success();
        let lease = unanswered.answered();
        turn.answered(this, key, matches!(status, 0 | 2), status == 4);
        match status {
            1 | 4 => {
                this.fair().set_in_use();
                this.counters().add(Count::Admitted);
                lease.set_in_flight(in_flight);
                this.hold(&lease);
                Ok(RedisReservation::lease(lease, Arc::clone(this)))
            }
            0 | 2 => {
                this.counters().add(Count::Refused);
                Err(Error::TenantOverloaded {
                    tenant_id: key.to_owned(),
                    requested: tokens,
                    in_flight,
                    cap,
                })
            }
            3 => Err(Error::Shed {
                tenant_id: turn.tenant.to_string(),
                budget: key.to_owned(),
            }),
            _ => Err(Error::RequestTooLarge {
                tenant_id: key.to_owned(),
                tokens,
                cap,
            }),
        }
    }

    /// Gives up ticket `id` of budget `key` in a spawned task; if Redis cannot be told,
    /// the ticket expires with its deadline.
    fn cancel_later(self: &Arc<Self>, key: &Arc<str>, id: &str) {
        self.fair().lock_tickets().remove(id);
        let (this, key, id) = (Arc::clone(self), Arc::clone(key), id.to_owned());
        self.runtime().spawn(async move {
            let mut invocation = this.on_queue(&scripts().queue_cancel, &key);
            invocation
                .arg(&id)
                .arg(this.ttl_ms())
                .arg(this.channel(&key));
            let mut conn = this.conn().clone();
            let answer: Result<i64, _> = this.timed(invocation.invoke_async(&mut conn)).await;
            if let Err(failure) = answer {
                tracing::warn!(budget = &*key, ticket = id, %failure,
                    "could not give up a waiting ticket in redis; it expires with its deadline");
            }
        });
    }

    /// Pushes back the deadlines of the tickets this replica holds, one call per budget.
    pub(super) async fn renew_tickets(self: &Arc<Self>) {
        let mut by_key: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for (id, key) in self.fair().lock_tickets().iter() {
            by_key.entry(Arc::clone(key)).or_default().push(id.clone());
        }
        for (key, ids) in by_key {
            let mut invocation = self.on_queue(&scripts().queue_renew, &key);
            invocation.arg(self.ttl_ms());
            for id in &ids {
                invocation.arg(id);
            }
            let mut conn = self.conn().clone();
            let answer: Result<i64, _> = self.timed(invocation.invoke_async(&mut conn)).await;
            if let Err(failure) = answer {
                tracing::warn!(budget = &*key, %failure, "could not renew waiting tickets");
            }
        }
    }

    /// Once `lease` is released: wakes the waiters of its budget on every replica, if this
    /// tracker admits leases through a queue and any wait (in a spawned task; should it
    /// fail, the waiters look again on their own).
    pub(super) fn wake_after_release(&self, lease: &Lease) {
        if !self.fair().in_use() {
            return;
        }
        let script = scripts().queue_wake.clone();
        let [_, deadlines, ..] = self.queue_keys(lease.tenant());
        let channel = self.channel(lease.tenant());
        let (mut conn, timeout) = (self.conn().clone(), self.timeout());
        self.runtime().spawn(async move {
            let mut invocation = script.key(deadlines);
            invocation.arg(channel);
            let woken = tokio::time::timeout(timeout, invocation.invoke_async::<i64>(&mut conn));
            if let Ok(Err(error)) = woken.await {
                tracing::debug!(%error, "could not wake the waiters of a budget");
            }
        });
    }

    /// Wakes `queue` on wake-ups from Redis, and starts listening for them if need be.
    fn listen(self: &Arc<Self>, queue: &Arc<Queue>) {
        {
            let mut queues = self.fair().lock_queues();
            let known = queues
                .iter()
                .any(|known| std::ptr::eq(known.as_ptr(), Arc::as_ptr(queue)));
            if !known {
                queues.retain(|known| known.strong_count() > 0);
                queues.push(Arc::downgrade(queue));
            }
        }
        if self.fair().start_listening() {
            let pattern = format!("{}{{t:*}}:q:wake", escape_glob(self.prefix()));
            self.runtime()
                .spawn(listen_forever(Arc::downgrade(self), pattern));
        }
    }

    fn wake_queues(&self) {
        let queues: Vec<Arc<Queue>> = self
            .fair()
            .lock_queues()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for queue in queues {
            queue.wake_all();
        }
    }
}

/// Listens for wake-ups on a dedicated pub/sub connection until the tracker is gone,
/// connecting again (after a pause) whenever the connection breaks.
async fn listen_forever(shared: Weak<Inner>, pattern: String) {
    use futures_core::Stream;
    let mut pause = Duration::from_millis(100);
    loop {
        let Some(inner) = shared.upgrade() else {
            return;
        };
        let subscribed = async {
            let mut pubsub = inner.fair().subscribe().connect().await?;
            pubsub.psubscribe(&pattern).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = match tokio::time::timeout(Duration::from_secs(2), subscribed).await {
            Ok(Ok(pubsub)) => pubsub,
            failed => {
                let failure = match failed {
                    Ok(Err(error)) => error.to_string(),
                    _ => "timed out".to_owned(),
                };
                tracing::debug!(%failure, "could not subscribe to wake-ups; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        drop(inner);
        pause = Duration::from_millis(100);
        let mut messages = pubsub.into_on_message();
        loop {
            // Wakes up now and then to notice a tracker that is gone.
            let next = std::future::poll_fn(|cx| Pin::new(&mut messages).poll_next(cx));
            match tokio::time::timeout(Duration::from_secs(1), next).await {
                Ok(Some(_)) => match shared.upgrade() {
                    Some(inner) => inner.wake_queues(),
                    None => return,
                },
                Ok(None) => break, // the connection broke
                Err(_) if shared.strong_count() == 0 => return,
                Err(_) => {}
            }
        }
    }
}
