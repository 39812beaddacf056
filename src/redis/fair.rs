//! What a tracker keeps for the fair queues of the budgets it counts in Redis (see
//! [`queue`](super::queue)): the tickets it holds, the queues of this process to wake,
//! and where it hears wake-ups.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use crate::fair::Queue;

/// Where a tracker hears wake-ups: a server of its own (the one server, or any node of a
/// cluster, which passes every message to all its nodes), or the master the Sentinels
/// name.
pub(super) enum Subscribe {
    /// Tried in turn.
    Nodes(Vec<redis::ConnectionInfo>),
    /// The Sentinels, and the master's name.
    Sentinel(Vec<redis::ConnectionInfo>, String),
}

impl Subscribe {
    /// A pub/sub connection to a server that hears the budgets' messages.
    pub(super) async fn connect(&self) -> redis::RedisResult<redis::aio::PubSub> {
        match self {
            Subscribe::Nodes(nodes) => {
                let mut failed = None;
                for node in nodes {
                    match redis::Client::open(node.clone()) {
                        Ok(client) => match client.get_async_pubsub().await {
                            Ok(pubsub) => return Ok(pubsub),
                            Err(error) => failed = Some(error),
                        },
                        Err(error) => failed = Some(error),
                    }
                }
                Err(failed.unwrap_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::Client, "no node to subscribe on"))
                }))
            }
            Subscribe::Sentinel(sentinels, name) => {
                let mut sentinel = redis::sentinel::SentinelClient::build(
                    sentinels.clone(),
                    name.clone(),
                    None,
                    redis::sentinel::SentinelServerType::Master,
                )?;
                sentinel.async_get_client().await?.get_async_pubsub().await
            }
        }
    }
}

/// What a tracker keeps for the fair queues of the budgets it counts: nothing but where to
/// hear wake-ups until a request first waits on one of them.
pub(super) struct Fair {
    subscribe: Subscribe,
    /// Set once a lease was admitted through a queue: releases then wake waiters.
    in_use: AtomicBool,
    next_ticket: AtomicU64,
    /// Tickets this replica holds in Redis (id → budget key), renewed with the leases.
    tickets: Mutex<HashMap<String, Arc<str>>>,
    /// The queues of this process waiting on this tracker's budgets, woken on a message.
    queues: Mutex<Vec<Weak<Queue>>>,
    /// Whether the task listening for wake-ups runs.
    listening: AtomicBool,
}

impl Fair {
    pub(super) fn new(subscribe: Subscribe) -> Self {
        Self {
            subscribe,
            in_use: AtomicBool::new(false),
            next_ticket: AtomicU64::new(0),
            tickets: Mutex::default(),
            queues: Mutex::default(),
            listening: AtomicBool::new(false),
        }
    }

    /// Where it hears wake-ups.
    pub(super) fn subscribe(&self) -> &Subscribe {
        &self.subscribe
    }

    /// Whether a lease was admitted through a queue: releases then wake waiters.
    pub(super) fn in_use(&self) -> bool {
        self.in_use.load(Relaxed)
    }

    /// A lease was admitted through a queue.
    pub(super) fn set_in_use(&self) {
        self.in_use.store(true, Relaxed);
    }

    /// The sequence number of this replica's next ticket.
    pub(super) fn next_ticket(&self) -> u64 {
        self.next_ticket.fetch_add(1, Relaxed)
    }

    /// Claims the listening for wake-ups: `false` when a task listens already.
    pub(super) fn start_listening(&self) -> bool {
        !self.listening.swap(true, Relaxed)
    }

    /// The tickets this replica holds in Redis (id → budget key).
    pub(super) fn lock_tickets(&self) -> MutexGuard<'_, HashMap<String, Arc<str>>> {
        self.tickets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The queues of this process waiting on this tracker's budgets.
    pub(super) fn lock_queues(&self) -> MutexGuard<'_, Vec<Weak<Queue>>> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
