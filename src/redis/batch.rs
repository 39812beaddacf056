//! Reservations and releases sent to Redis in batches: whatever queued up while earlier
//! batches were in flight goes in one script call.
//!
//! A script call has a fixed cost inside Redis (and a round trip) that dwarfs the few
//! commands one reservation needs, so under load a replica sends what its requests asked
//! for together: one task per tracker takes the queue in order, sends it as one call of
//! the batch script (up to [`IN_FLIGHT`] calls at once, pipelined on the connection), and
//! answers each operation. A lone request is sent at once (a batch of one); a busy
//! replica's batches grow with its load. Calls are sent in the order their operations
//! were queued, and Redis runs one connection's calls in order, so the release of an
//! unanswered reservation does not overtake it (should the connection be remade between
//! the two, the reservation's lease would expire after its TTL). Of a release nobody
//! waits for, the tracker that queued it is told how it ended. On a Redis Cluster a call
//! holds one tenant's operations only (a script's keys must share a slot).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::task::Poll;

use redis::{ErrorKind, RedisError, Script, ScriptInvocation};
use tokio::sync::{mpsc, oneshot};

use super::call::{Calls, Failure};
use super::lease::Lease;

/// The most operations one script call carries.
const MAX_BATCH: usize = 64;

/// The most script calls in flight at once.
const IN_FLIGHT: usize = 2;

/// What one operation is answered: `(status, tokens in flight)` as the batch script
/// returns them.
pub(super) type Answer = Result<(i64, u64), RedisError>;

/// The tracker that queued a release nobody waits for: kept until the release is sent
/// (the reservation that queued it may have held the last handle on the tracker), and
/// told how it ended.
pub(super) trait Owner: Send + Sync {
    /// Counts and logs how the release of `lease` ended.
    fn released(&self, lease: &Lease, answer: Result<(), &dyn fmt::Display>);
}

/// One operation waiting for its batch.
pub(super) struct Op {
    asked: Asked,
    /// Where the answer goes.
    reply: Reply,
}

/// What an operation asks of Redis.
enum Asked {
    /// A lease of `tokens` under `cap`, and the windows' charges with it, all or nothing.
    Reserve {
        lease: Arc<Lease>,
        tokens: u64,
        cap: u64,
        windows: Vec<WindowAsk>,
    },
    Release(Arc<Lease>),
    /// A change to a window's charge, after the admission: never refused.
    Adjust(WindowAsk),
}

/// A window's bucket, and what to charge it (or give back, when negative).
pub(super) struct WindowAsk {
    pub(super) key: String,
    pub(super) units: f64,
    pub(super) limit: u64,
    pub(super) period_ms: u64,
    /// Charged whether it fits or not (shadow mode).
    pub(super) force: bool,
    /// The window, to say why it refused.
    pub(super) window: Option<crate::TokenWindow>,
    /// What the bucket held once the reservation's call was answered (set by the batch
    /// that carried it).
    pub(super) left: Arc<AtomicU64>,
}

impl WindowAsk {
    /// The same ask, for another attempt.
    pub(super) fn again(&self) -> WindowAsk {
        WindowAsk {
            key: self.key.clone(),
            units: self.units,
            limit: self.limit,
            period_ms: self.period_ms,
            force: self.force,
            window: None,
            left: Arc::clone(&self.left),
        }
    }

    /// The refusal of a bucket that held `remaining`, for `tenant_id`.
    pub(super) fn refused(&self, tenant_id: &str, remaining: u64) -> crate::Error {
        let too_large = self.units > self.limit as f64;
        match &self.window {
            Some(window) => window.refusal(
                tenant_id,
                self.units,
                remaining as f64,
                self.limit,
                too_large,
            ),
            None => crate::Error::BackendUnavailable {
                reason: "a window refused without saying which".to_owned(),
            },
        }
    }
}

impl Asked {
    /// The key whose hash tag the operation's keys share.
    fn key(&self) -> &str {
        match self {
            Asked::Reserve { lease, .. } | Asked::Release(lease) => lease.key(),
            Asked::Adjust(window) => &window.key,
        }
    }
}

enum Reply {
    /// To the caller, who waits for it.
    Answer(oneshot::Sender<Answer>),
    /// To the tracker, for a release nobody waits for.
    Tell(Arc<dyn Owner>),
    /// To nobody: a window's adjustment (a failure is logged).
    Nobody,
}

/// The queue of a tracker's operations.
pub(super) struct Batches {
    queue: mpsc::UnboundedSender<Op>,
}

impl Batches {
    /// The queue, and its far end for [`send_forever`].
    pub(super) fn new() -> (Self, mpsc::UnboundedReceiver<Op>) {
        let (queue, taken) = mpsc::unbounded_channel();
        (Self { queue }, taken)
    }

    /// Reserves `tokens` for `lease` under `cap`.
    pub(super) async fn reserve(&self, lease: &Arc<Lease>, tokens: u64, cap: u64) -> Answer {
        self.reserve_charged(lease, tokens, cap, Vec::new()).await
    }

    /// Reserves `tokens` for `lease` under `cap` and charges `windows`, all or nothing.
    /// A window's refusal answers `-2 - i` for the `i`-th window (from 0) and what its
    /// bucket held.
    pub(super) async fn reserve_charged(
        &self,
        lease: &Arc<Lease>,
        tokens: u64,
        cap: u64,
        windows: Vec<WindowAsk>,
    ) -> Answer {
        let lease = Arc::clone(lease);
        self.send(Asked::Reserve {
            lease,
            tokens,
            cap,
            windows,
        })
        .await
    }

    /// Releases `lease`.
    pub(super) async fn release(&self, lease: &Arc<Lease>) -> Answer {
        self.send(Asked::Release(Arc::clone(lease))).await
    }

    /// Changes a window's charge, without waiting.
    pub(super) fn adjust(&self, window: WindowAsk) {
        let op = Op {
            asked: Asked::Adjust(window),
            reply: Reply::Nobody,
        };
        // The task is gone with its runtime: nothing is left to charge.
        let _ = self.queue.send(op);
    }

    /// Releases `lease` of `tracker` without waiting: `tracker` is told how it ended.
    /// Returns `lease` if the queue's task is gone.
    pub(super) fn release_later(
        &self,
        lease: Arc<Lease>,
        tracker: Arc<impl Owner + 'static>,
    ) -> Result<(), Arc<Lease>> {
        let op = Op {
            asked: Asked::Release(lease),
            reply: Reply::Tell(tracker),
        };
        self.queue.send(op).map_err(|gone| match gone.0.asked {
            Asked::Release(lease) => lease,
            _ => unreachable!("sent as a release"),
        })
    }

    async fn send(&self, asked: Asked) -> Answer {
        let (answer, answered) = oneshot::channel();
        let op = Op {
            asked,
            reply: Reply::Answer(answer),
        };
        if self.queue.send(op).is_err() {
            return Err(gone());
        }
        answered.await.unwrap_or_else(|_| Err(gone()))
    }
}

/// The queue's task went away (its runtime shut down) before answering.
fn gone() -> RedisError {
    RedisError::from((ErrorKind::Client, "the tracker's batch task is gone"))
}

/// A script call in flight.
type Call = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where batches go: the connection, the batch script and the lease TTL.
struct Sender {
    calls: Calls,
    script: Script,
    ttl_ms: u64,
}

/// Sends a tracker's queued operations in batches, with `script` through `calls`, until
/// the tracker, and every reservation it made, is gone.
pub(super) async fn send_forever(
    mut queue: mpsc::UnboundedReceiver<Op>,
    tracker: Weak<impl Owner>,
    calls: Calls,
    script: Script,
    ttl_ms: u64,
) {
    let one_slot_per_call = calls.conn().is_cluster();
    let sender = Arc::new(Sender {
        calls,
        script,
        ttl_ms,
    });
    let mut calls: Vec<Call> = Vec::with_capacity(IN_FLIGHT);
    let mut batch = Vec::new();
    let mut open = true;
    std::future::poll_fn(|cx| loop {
        let mut progress = false;
        if open && calls.len() < IN_FLIGHT {
            while batch.len() < MAX_BATCH {
                match queue.poll_recv(cx) {
                    Poll::Ready(Some(op)) => batch.push(op),
                    Poll::Ready(None) => {
                        open = false;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if !batch.is_empty() {
                if tracker.strong_count() == 0 {
                    return Poll::Ready(());
                }
                // One server takes the batch whole; a cluster, one call per slot.
                let taken = std::mem::take(&mut batch);
                let (whole, per_slot) = if one_slot_per_call {
                    (None, split(taken))
                } else {
                    (Some(taken), Vec::new())
                };
                for ops in whole.into_iter().chain(per_slot) {
                    let sender = Arc::clone(&sender);
                    // Polled once now, which sends it: calls go out in the queue's order.
                    let mut call: Call = Box::pin(async move { sender.send(ops).await });
                    if call.as_mut().poll(cx).is_pending() {
                        calls.push(call);
                    }
                }
                progress = true;
            }
        }
        let before = calls.len();
        calls.retain_mut(|call| call.as_mut().poll(cx).is_pending());
        progress |= calls.len() < before;
        if !open && calls.is_empty() {
            return Poll::Ready(());
        }
        if !progress {
            return Poll::Pending;
        }
    })
    .await;
}

/// The script calls a batch makes on a cluster: one for each tenant's operations (in
/// order).
fn split(batch: Vec<Op>) -> Vec<Vec<Op>> {
    let mut calls: Vec<Vec<Op>> = Vec::new();
    for op in batch {
        let tag = hash_tag(op.asked.key());
        match calls
            .iter_mut()
            .find(|call| hash_tag(call[0].asked.key()) == tag)
        {
            Some(call) => call.push(op),
            None => calls.push(vec![op]),
        }
    }
    calls
}

/// The part of a key Redis Cluster hashes: between the first `{` and the next `}`.
fn hash_tag(key: &str) -> &str {
    key.split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map_or(key, |(tag, _)| tag)
}

impl Sender {
    /// Sends `batch` as one script call and answers each of its operations.
    async fn send(&self, mut batch: Vec<Op>) {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(self.ttl_ms);
        for op in batch.iter() {
            add(&mut invocation, &op.asked);
        }
        let mut conn = self.calls.conn().clone();
        let answers: Result<Vec<i64>, Failure> =
            self.calls.timed(invocation.invoke_async(&mut conn)).await;
        // Two numbers an operation, and for a reservation what each of its windows' buckets
        // holds.
        let windows = |op: &Op| match &op.asked {
            Asked::Reserve { windows, .. } => windows.len(),
            _ => 0,
        };
        let expected: usize = batch.iter().map(|op| 2 + windows(op)).sum();
        match answers {
            Ok(answers) if answers.len() == expected => {
                let mut answers = answers.into_iter();
                for op in batch.drain(..) {
                    let status = answers.next().unwrap_or_default();
                    let in_flight = u64::try_from(answers.next().unwrap_or_default());
                    if let Asked::Reserve { windows, .. } = &op.asked {
                        for (window, left) in windows.iter().zip(answers.by_ref()) {
                            window.left.store(u64::try_from(left).unwrap_or(0), Relaxed);
                        }
                    }
                    answer_one(op, Ok((status, in_flight.unwrap_or(0))));
                }
            }
            Ok(_) => {
                let error = RedisError::from((
                    ErrorKind::UnexpectedReturnType,
                    "the batch script answered a different number of operations",
                ));
                answer_all(batch, &error);
            }
            Err(Failure::Redis(error)) => answer_all(batch, &error),
            Err(Failure::TimedOut(_)) => {
                // Each operation waits with the same timeout: it is already answered.
                let error = RedisError::from((ErrorKind::Client, "the batch timed out"));
                answer_all(batch, &error);
            }
        }
    }
}

/// Adds an operation to a call of the batch script (see `scripts::BATCH`).
fn add(invocation: &mut ScriptInvocation<'_>, asked: &Asked) {
    match asked {
        Asked::Reserve {
            lease,
            tokens,
            cap,
            windows,
        } => {
            invocation.key(&**lease.key());
            if windows.is_empty() {
                invocation.arg("r").arg(lease.id()).arg(tokens).arg(cap);
                return;
            }
            invocation.arg("R").arg(lease.id()).arg(tokens).arg(cap);
            invocation.arg(windows.len());
            for window in windows {
                invocation.key(&window.key);
                invocation.arg(window.units.to_string()).arg(window.limit);
                invocation.arg(window.period_ms).arg(u8::from(window.force));
            }
        }
        Asked::Release(lease) => {
            invocation.key(&**lease.key());
            invocation.arg("x").arg(lease.id());
        }
        Asked::Adjust(window) => {
            invocation.key(&window.key);
            invocation.arg("w").arg(window.units.to_string());
            invocation.arg(window.limit).arg(window.period_ms);
        }
    }
}

/// A call of the batch script that releases `lease` alone, for when the tracker's task
/// is going away with it.
pub(super) fn release_alone<'s>(
    script: &'s Script,
    ttl_ms: u64,
    lease: &Arc<Lease>,
) -> ScriptInvocation<'s> {
    let mut invocation = script.prepare_invoke();
    invocation.arg(ttl_ms);
    add(&mut invocation, &Asked::Release(Arc::clone(lease)));
    invocation
}

fn answer_all(batch: Vec<Op>, error: &RedisError) {
    for op in batch {
        answer_one(op, Err(error.clone()));
    }
}

/// Answers one operation: its waiter, or for a release nobody waits for, its tracker.
fn answer_one(op: Op, answer: Answer) {
    match op.reply {
        Reply::Answer(waiter) => {
            let _ = waiter.send(answer);
        }
        Reply::Tell(tracker) => {
            let answer = answer
                .as_ref()
                .map(drop)
                .map_err(|e| e as &dyn fmt::Display);
            if let Asked::Release(lease) = &op.asked {
                tracker.released(lease, answer);
            }
        }
        Reply::Nobody => {
            if let Err(error) = answer {
                tracing::debug!(%error, "a window's charge could not be changed in redis");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::hash_tag;

    #[test]
    fn the_hash_tag_is_what_redis_cluster_hashes() {
        assert_eq!(hash_tag("tt:{t:acme}:leases"), "t:acme");
        assert_eq!(hash_tag("budget:{t:upstream}:tokens"), "t:upstream");
        assert_eq!(hash_tag("plain"), "plain");
        assert_eq!(hash_tag("open{only"), "open{only");
    }
}
