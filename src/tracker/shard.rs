//! One slice of the tenant map, and the bounded cache of its idle tenants.

use std::sync::PoisonError;

use crate::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use crate::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::entry::Entry;
use crate::sync::Arc;
use crate::table::Table;

/// A slice of the tenant map with its own lock.
///
/// Idle entries (no live reservation) stay in the map so that a steady tenant does not pay
/// an allocation per request, but at most `idle_limit` of them. Counting idle entries
/// exactly would put a shared counter on every request; instead `idle_hint` counts the
/// entries that became idle since the last sweep, each once (an entry keeps a mark until
/// the next sweep). It never undercounts (reuse of an idle entry does not decrement it), so
/// once it passes the limit a sweep under the write lock counts for real and evicts the
/// excess.
pub(crate) struct Shard {
    map: RwLock<Table<Arc<Entry>>>,
    idle_hint: AtomicUsize,
    idle_limit: usize,
}

impl Shard {
    pub(crate) fn new(idle_limit: usize) -> Self {
        Self {
            map: RwLock::new(Table::default()),
            idle_hint: AtomicUsize::new(0),
            idle_limit,
        }
    }

    /// The map for lookups. No code holding this lock can panic in a way that leaves the
    /// map inconsistent (the critical sections only read and bump atomics), so a poisoned
    /// lock is taken as it is rather than turned into an error or a leak.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Table<Arc<Entry>>> {
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The map for inserts and evictions; see [`read`](Self::read) on poisoning.
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Table<Arc<Entry>>> {
        self.map.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called when an entry's last reservation ends.
    pub(crate) fn note_idle(&self) {
        if self.idle_hint.fetch_add(1, Relaxed) >= self.idle_limit {
            self.sweep();
        }
    }

    /// Evicts idle entries down to three quarters of the limit, tenants seen only once
    /// first.
    ///
    /// Evicting below the limit, not just to it, spaces sweeps out: the next one comes
    /// after at least a quarter of the limit more idle transitions, so a full cache costs a
    /// sweep per `limit / 4` releases, not one per release.
    ///
    /// Runs under the write lock: no reservation can be admitted meanwhile (admission holds
    /// the read lock from lookup to `live` increment), so an entry seen idle here has no
    /// reservation pointing at it, and removing it can never leave two live entries for one
    /// tenant.
    fn sweep(&self) {
        let mut map = self.write();
        if self.idle_hint.load(Relaxed) <= self.idle_limit {
            return; // another release swept while this one waited for the lock
        }
        let target = self.idle_limit - self.idle_limit / 4;
        // Reservations can end while this runs (releases take no lock), so the count it
        // leaves may again be over the limit; then it goes round once more.
        loop {
            let seen = self.idle_hint.load(Relaxed);
            let idle = map.entries().filter(|entry| entry.is_idle()).count();
            let mut excess = idle.saturating_sub(target);
            // First the tenants never seen again after their first request (a spray of
            // one-off ids), then, if that is not enough, any idle ones.
            for spare_reused in [true, false] {
                if excess == 0 {
                    break;
                }
                map.retain(|entry| {
                    let spared = spare_reused && entry.was_reused();
                    let evict = excess > 0 && entry.is_idle() && !spared;
                    excess -= usize::from(evict);
                    !evict
                });
            }
            let mut kept = 0;
            for entry in map.entries() {
                kept += usize::from(entry.settle_idle_count());
            }
            // Releases that ran meanwhile added to the hint after `seen` was read; keep
            // their counts, replace the rest by what is really idle now.
            let now = self
                .idle_hint
                .fetch_update(Relaxed, Relaxed, |now| Some(now - seen + kept))
                .map_or(0, |now| now - seen + kept);
            if now <= self.idle_limit {
                break;
            }
        }
    }

    /// Drops every entry. The tracker calls this when it is dropped, since entries point
    /// back at their shard.
    pub(crate) fn clear(&self) {
        self.write().clear();
    }
}
