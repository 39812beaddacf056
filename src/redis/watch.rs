//! Noticing that Redis may have lost leases this replica holds: a connection found broken,
//! a new master, the Sentinels announcing a failover. Each wakes the renewal task, which
//! renews at once (retrying until it goes through) instead of at its next period, so the
//! leases a new or restarted server lacks are registered again within moments.
//!
//! Everything here works only while this replica holds leases: with none there is
//! nothing Redis could have lost, so an idle replica sends nothing and listens to nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use futures_core::Stream;
use redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind};
use tokio::sync::Notify;

use super::conn::SentinelMaster;
use super::lease::Lease;
use super::tracker::Inner;

/// A call found the connection broken (or the server no master any more).
pub(super) const BROKEN: u8 = 1;
/// A connection to a server that may lack this replica's leases was made.
pub(super) const RECONNECTED: u8 = 2;
/// The first lease is held: start checking the connection.
pub(super) const HELD: u8 = 4;
/// The master may have changed: check the connection now.
pub(super) const CHECK: u8 = 8;

/// What the connection tells the renewal task: flags raised since it last looked, and a
/// wake-up.
#[derive(Default)]
pub(crate) struct Events {
    flags: AtomicU8,
    wake: Notify,
}

impl Events {
    /// Awaits `call`, telling of the error it ends with, if that error breaks the
    /// connection.
    pub(super) async fn watch<T>(
        &self,
        call: impl Future<Output = RedisResult<T>>,
    ) -> RedisResult<T> {
        let answer = call.await;
        if let Err(error) = &answer {
            self.saw(error);
        }
        answer
    }

    /// Tells of `error` if it breaks the connection.
    pub(super) fn saw(&self, error: &RedisError) {
        if breaks_connection(error) {
            self.raise(BROKEN);
        }
    }

    pub(super) fn reconnected(&self) {
        self.raise(RECONNECTED);
    }

    pub(super) fn held(&self) {
        self.raise(HELD);
    }

    pub(super) fn check(&self) {
        self.raise(CHECK);
    }

    fn raise(&self, flag: u8) {
        if self.flags.fetch_or(flag, Relaxed) & flag == 0 {
            self.wake.notify_one();
        }
    }

    /// The flags raised since the last call, cleared.
    pub(super) fn take(&self) -> u8 {
        self.flags.swap(0, Relaxed)
    }

    /// Returns once a flag was raised (at once if one was raised since the last wake-up).
    pub(super) async fn raised(&self) {
        self.wake.notified().await;
    }
}

/// Errors after which the connection is remade, or the master looked up again: the
/// server that answers next may be another one, or the same one restarted empty.
fn breaks_connection(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_unrecoverable_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
            )
        )
}

impl Inner {
    /// Keeps `lease` for renewal. The first lease held starts the checks that notice a
    /// failover or a restart while the replica is otherwise idle.
    pub(super) fn hold(self: &Arc<Self>, lease: &Arc<Lease>) {
        let first = {
            let mut leases = self.lock_leases();
            let first = leases.is_empty();
            leases.insert(lease.seq, Arc::clone(lease));
            first
        };
        if first {
            self.conn.events.held();
            self.watch_sentinels();
        }
    }

    pub(super) fn holds_leases(&self) -> bool {
        !self.lock_leases().is_empty()
    }

    /// Listens for the Sentinels' `+switch-master` while leases are held, if the master is
    /// one the Sentinels name.
    fn watch_sentinels(self: &Arc<Self>) {
        if let Some(master) = self.conn.sentinel_master() {
            if !master.watching.swap(true, Relaxed) {
                let watch = watch_sentinels(Arc::downgrade(self), Arc::clone(master));
                self.runtime.spawn(watch);
            }
        }
    }
}

fn holds_leases(shared: &Weak<Inner>) -> bool {
    shared.upgrade().is_some_and(|inner| inner.holds_leases())
}

type Messages = Pin<Box<dyn Stream<Item = redis::Msg> + Send>>;

/// How long subscribing to one Sentinel may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Subscribes to `+switch-master` on every Sentinel that answers. A failover announced
/// by any of them puts the master in doubt and has the renewal task check it at once.
/// Returns when no lease is held any more (or the tracker is gone); subscribes again
/// when a Sentinel's connection breaks.
async fn watch_sentinels(shared: Weak<Inner>, master: Arc<SentinelMaster>) {
    let mut pause = Duration::from_millis(100);
    let mut subscribed_before = false;
    loop {
        if !holds_leases(&shared) {
            master.watching.store(false, Relaxed);
            // A lease taken just now saw the watch still running: it carries on.
            if !holds_leases(&shared) || master.watching.swap(true, Relaxed) {
                return;
            }
        }
        let mut streams: Vec<Messages> = Vec::new();
        for sentinel in &master.sentinels {
            let subscribed = async {
                let client = redis::Client::open(sentinel.clone())?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe("+switch-master").await?;
                Ok::<_, RedisError>(pubsub)
            };
            match tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribed).await {
                Ok(Ok(pubsub)) => streams.push(Box::pin(pubsub.into_on_message())),
                Ok(Err(error)) => {
                    tracing::debug!(sentinel = %sentinel.addr(), %error,
                        "could not subscribe to a sentinel's failovers")
                }
                Err(_) => tracing::debug!(sentinel = %sentinel.addr(),
                    "subscribing to a sentinel's failovers timed out"),
            }
        }
        if streams.is_empty() {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
            continue;
        }
        pause = Duration::from_millis(100);
        if subscribed_before {
            // A failover announced while the subscription was down went unheard.
            master.in_doubt();
            if let Some(inner) = shared.upgrade() {
                inner.conn.events.check();
            }
        }
        subscribed_before = true;
        loop {
            let next = std::future::poll_fn(|cx| {
                for stream in streams.iter_mut() {
                    match stream.as_mut().poll_next(cx) {
                        Poll::Ready(Some(message)) => return Poll::Ready(Some(message)),
                        // A Sentinel went away: subscribe to them all again.
                        Poll::Ready(None) => return Poll::Ready(None),
                        Poll::Pending => {}
                    }
                }
                Poll::Pending
            });
            // Wakes up now and then to notice that no lease is held any more.
            match tokio::time::timeout(Duration::from_secs(1), next).await {
                Ok(Some(message)) => {
                    let payload: String = message.get_payload().unwrap_or_default();
                    // "<name> <old ip> <old port> <new ip> <new port>"
                    if payload.split_whitespace().next() != Some(master.name.as_str()) {
                        continue;
                    }
                    tracing::info!(switch = payload, "the sentinels announced a new master");
                    master.in_doubt();
                    match shared.upgrade() {
                        Some(inner) => inner.conn.events.check(),
                        None => return,
                    }
                }
                Ok(None) => {
                    tokio::time::sleep(pause).await;
                    break;
                }
                Err(_) if !holds_leases(&shared) => break,
                Err(_) => {}
            }
        }
    }
}
