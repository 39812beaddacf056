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
    lease: Arc<Lease>,
    /// `Some((tokens, cap))` to reserve, `None` to release.
    reserve: Option<(u64, u64)>,
    /// Where the answer goes.
    reply: Reply,
}

enum Reply {
    /// To the caller, who waits for it.
    Answer(oneshot::Sender<Answer>),
    /// To the tracker, for a release nobody waits for.
    Tell(Arc<dyn Owner>),
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
        self.send(lease, Some((tokens, cap))).await
    }

    /// Releases `lease`.
    pub(super) async fn release(&self, lease: &Arc<Lease>) -> Answer {
        self.send(lease, None).await
    }

    /// Releases `lease` of `tracker` without waiting: `tracker` is told how it ended.
    /// Returns `lease` if the queue's task is gone.
    pub(super) fn release_later(
        &self,
        lease: Arc<Lease>,
        tracker: Arc<impl Owner + 'static>,
    ) -> Result<(), Arc<Lease>> {
        let op = Op {
            lease,
            reserve: None,
            reply: Reply::Tell(tracker),
        };
        self.queue.send(op).map_err(|gone| gone.0.lease)
    }

    async fn send(&self, lease: &Arc<Lease>, reserve: Option<(u64, u64)>) -> Answer {
        let (answer, answered) = oneshot::channel();
        let op = Op {
            lease: Arc::clone(lease),
            reserve,
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
        let tag = hash_tag(op.lease.key());
        match calls
            .iter_mut()
            .find(|call| hash_tag(call[0].lease.key()) == tag)
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
            add(&mut invocation, &op.lease, op.reserve);
        }
        let mut conn = self.calls.conn().clone();
        let answers: Result<Vec<i64>, Failure> =
            self.calls.timed(invocation.invoke_async(&mut conn)).await;
        match answers {
            Ok(answers) if answers.len() == 2 * batch.len() => {
                for (op, answer) in batch.drain(..).zip(answers.chunks_exact(2)) {
                    let in_flight = u64::try_from(answer[1]).unwrap_or(0);
                    answer_one(op, Ok((answer[0], in_flight)));
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

/// Adds an operation on `lease` to a call of the batch script: `r`, the lease, its
/// tokens and the cap to reserve, `x` and the lease to release.
fn add(invocation: &mut ScriptInvocation<'_>, lease: &Lease, reserve: Option<(u64, u64)>) {
    invocation.key(&**lease.key());
    match reserve {
        Some((tokens, cap)) => invocation.arg("r").arg(lease.id()).arg(tokens).arg(cap),
        None => invocation.arg("x").arg(lease.id()),
    };
}

/// A call of the batch script that releases `lease` alone, for when the tracker's task
/// is going away with it.
pub(super) fn release_alone<'s>(
    script: &'s Script,
    ttl_ms: u64,
    lease: &Lease,
) -> ScriptInvocation<'s> {
    let mut invocation = script.prepare_invoke();
    invocation.arg(ttl_ms);
    add(&mut invocation, lease, None);
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
            tracker.released(&op.lease, answer);
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
