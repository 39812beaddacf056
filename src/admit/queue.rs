//! Waiting for capacity: bounded in time and length, first come first served per tenant.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// How often a waiting request looks again even without being woken: capacity can also
/// come back without a release through this layer (a raised cap, a shared budget freed by
/// another tenant, a reservation made outside the layer).
pub(crate) const RECHECK: Duration = Duration::from_millis(50);

/// The queues of requests waiting for capacity, one per tenant with anyone waiting.
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) max_wait: Duration,
    max_queued: usize,
    /// Requests waiting across tenants: 0 lets admissions skip the lock.
    queued: AtomicUsize,
    queues: Mutex<HashMap<Box<str>, VecDeque<Arc<Notify>>>>,
}

impl Queue {
    pub(crate) fn new(max_wait: Duration, max_queued: usize) -> Self {
        Self {
            max_wait,
            max_queued,
            queued: AtomicUsize::new(0),
            queues: Mutex::default(),
        }
    }

    /// Whether requests of `tenant` are waiting: a new one must queue behind them rather
    /// than take capacity the first in line is waiting for.
    pub(crate) fn has_queue(&self, tenant: &str) -> bool {
        self.queued.load(Relaxed) != 0 && self.lock().contains_key(tenant)
    }

    /// Joins `tenant`'s queue, unless it is full.
    pub(crate) fn enqueue(self: &Arc<Self>, tenant: &str) -> Option<Ticket> {
        let notify = Arc::new(Notify::new());
        {
            let mut queues = self.lock();
            let queue = queues.entry(Box::from(tenant)).or_default();
            if queue.len() >= self.max_queued {
                if queue.is_empty() {
                    queues.remove(tenant);
                }
                return None;
            }
            queue.push_back(Arc::clone(&notify));
            self.queued.fetch_add(1, Relaxed);
        }
        Some(Ticket {
            queue: Arc::clone(self),
            tenant: Box::from(tenant),
            notify,
        })
    }

    /// Wakes the first request waiting for `tenant`, if any: capacity came back.
    pub(crate) fn wake(&self, tenant: &str) {
        if self.queued.load(Relaxed) == 0 {
            return;
        }
        if let Some(first) = self.lock().get(tenant).and_then(VecDeque::front) {
            first.notify_one();
        }
    }

    /// Nothing under this lock can panic half-way, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, VecDeque<Arc<Notify>>>> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A place in a tenant's queue. Dropped — admitted, timed out, or cancelled with its
/// request — it leaves the queue and wakes the request behind it, which may fit now.
#[derive(Debug)]
pub(crate) struct Ticket {
    queue: Arc<Queue>,
    tenant: Box<str>,
    notify: Arc<Notify>,
}

impl Ticket {
    /// Whether this request is first in line: only the first may reserve, so a large
    /// request is not overtaken by small ones.
    pub(crate) fn is_first(&self) -> bool {
        let queues = self.queue.lock();
        let first = queues.get(&*self.tenant).and_then(VecDeque::front);
        first.is_some_and(|first| Arc::ptr_eq(first, &self.notify))
    }

    /// Waits until woken or `limit` has passed, whichever is first.
    pub(crate) async fn wait(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.notify.notified()).await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut queues = self.queue.lock();
        let Some(queue) = queues.get_mut(&*self.tenant) else {
            return;
        };
        if let Some(at) = queue.iter().position(|n| Arc::ptr_eq(n, &self.notify)) {
            queue.remove(at);
            self.queue.queued.fetch_sub(1, Relaxed);
        }
        match queue.front() {
            Some(next) => next.notify_one(),
            None => {
                queues.remove(&*self.tenant);
            }
        }
    }
}

/// Wakes the first request waiting for the tenant once a reservation is released. Held
/// last in the reservation, so it runs after the tokens are back.
#[derive(Debug)]
pub(crate) struct Wake {
    pub(crate) queue: Arc<Queue>,
    pub(crate) tenant: Box<str>,
}

impl Drop for Wake {
    fn drop(&mut self) {
        self.queue.wake(&self.tenant);
    }
}
