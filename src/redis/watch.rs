//! Listening to the Sentinels' `+switch-master` while this replica holds leases, so that
//! a failover is followed at once (see [`events`](super::events)).

use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use futures_core::Stream;
use redis::RedisError;
use tokio::runtime::Handle;

use super::conn::{Conn, SentinelMaster};
use super::events::Events;
use super::lease::Leases;

/// Listens for the Sentinels' `+switch-master` while `leases` holds any, if `conn`'s
/// master is one the Sentinels name and nobody listens yet.
pub(super) fn watch_sentinels(conn: &Conn, leases: &Arc<Leases>, runtime: &Handle) {
    if let Some(master) = conn.sentinel_master() {
        if master.start_watching() {
            let events = Arc::clone(conn.events());
            let watch = watch(Arc::downgrade(leases), events, Arc::clone(master));
            runtime.spawn(watch);
        }
    }
}

/// Whether the tracker is there and holds leases.
fn holds_leases(leases: &Weak<Leases>) -> bool {
    leases.upgrade().is_some_and(|leases| !leases.is_empty())
}

type Messages = Pin<Box<dyn Stream<Item = redis::Msg> + Send>>;

/// How long subscribing to one Sentinel may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Subscribes to `+switch-master` on every Sentinel that answers. A failover announced
/// by any of them puts the master in doubt and has the renewal task check it at once.
/// Returns when no lease is held any more (or the tracker is gone); subscribes again
/// when a Sentinel's connection breaks.
async fn watch(leases: Weak<Leases>, events: Arc<Events>, master: Arc<SentinelMaster>) {
    let mut pause = Duration::from_millis(100);
    let mut subscribed_before = false;
    loop {
        if !holds_leases(&leases) {
            master.stop_watching();
            // A lease taken just now saw the watch still running: it carries on.
            if !holds_leases(&leases) || !master.start_watching() {
                return;
            }
        }
        let mut streams: Vec<Messages> = Vec::new();
        for sentinel in master.sentinels() {
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
            if leases.strong_count() > 0 {
                events.check();
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
                    if payload.split_whitespace().next() != Some(master.name()) {
                        continue;
                    }
                    tracing::info!(switch = payload, "the sentinels announced a new master");
                    master.in_doubt();
                    if leases.strong_count() == 0 {
                        return;
                    }
                    events.check();
                }
                Ok(None) => {
                    tokio::time::sleep(pause).await;
                    break;
                }
                Err(_) if !holds_leases(&leases) => break,
                Err(_) => {}
            }
        }
    }
}
