//! One tenant's counters, updated without locks.

use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use crate::sync::Arc;

use super::shard::Shard;
use super::state::TenantTokenState;
use crate::window::KeptBucket;

/// Why an entry refused a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The request alone is larger than the cap.
    TooLarge { cap: u64 },
    /// It would fit an idle tenant, but not next to what is in flight now.
    Overloaded { in_flight: u64, cap: u64 },
}

/// In `live`: the entry has been counted in its shard's idle hint since the last sweep.
/// A tenant that goes idle again and again is counted once, so steady traffic leaves the
/// shard's counter (and its cache line) alone.
const COUNTED: u32 = 1 << 31;

/// In `marks`: set when a request finds the entry already there. Tenants seen more than
/// once are evicted last, so a spray of one-off ids evicts itself rather than steady
/// tenants.
const REUSED: u32 = 1 << 31;

/// In `marks`: set by `set_cap`. The entry is configuration, not cache, so never evicted.
const PINNED: u32 = 1 << 30;

/// In `marks`: the overcommits (a count that stops at its largest value).
const OVERCOMMITS: u32 = PINNED - 1;

/// The ledger entry of one tenant.
///
/// Every counter is its own atomic, so admission and release never take a lock. The map that
/// finds an entry holds one `Arc` to it and each live reservation holds another; `live`
/// counts the reservations so that the shard can tell an idle entry (safe to evict) from one
/// that work still points at.
///
/// Kept small (88 bytes with its `Arc` counts, plus the id) since a tracker may hold
/// hundreds of thousands: the marks and the overcommits share a word for that. What every
/// reservation reads or changes comes first, right after the `Arc`'s own counts (48 bytes
/// in all), so that one tenant's traffic from several cores moves as few cache lines
/// between them as it can.
#[repr(C)]
pub(crate) struct Entry {
    in_flight: AtomicU64,
    /// Live reservations (low 31 bits: two billion reservations of one tenant alive at
    /// once would need far more memory than any machine has), and [`COUNTED`].
    live: AtomicU32,
    /// [`REUSED`], [`PINNED`], and the [`OVERCOMMITS`].
    marks: AtomicU32,
    cap: AtomicU64,
    high_water: AtomicU64,
    pub(crate) id: Box<str>,
    pub(crate) shard: Arc<Shard>,
    /// The tenant's bucket of a token window, found here without a lookup.
    pub(crate) bucket: KeptBucket,
}

impl crate::table::Keyed for Arc<Entry> {
    fn key(&self) -> &str {
        &self.id
    }
}

impl Entry {
    pub(crate) fn new(id: Box<str>, cap: u64, pinned: bool, shard: Arc<Shard>) -> Self {
        Self {
            id,
            in_flight: AtomicU64::new(0),
            high_water: AtomicU64::new(0),
            cap: AtomicU64::new(cap),
            live: AtomicU32::new(0),
            marks: AtomicU32::new(if pinned { PINNED } else { 0 }),
            shard,
            bucket: KeptBucket::default(),
        }
    }

    /// Adds `tokens` to `in_flight` if the total stays within the cap, and counts one more
    /// live reservation. The caller holds the shard's read lock, so no sweep can evict the
    /// entry between the lookup and the `live` increment.
    pub(crate) fn admit(&self, tokens: u64) -> Result<(), Refusal> {
        let cap = self.cap.load(Relaxed);
        if tokens > cap {
            return Err(Refusal::TooLarge { cap });
        }
        let mut current = self.in_flight.load(Relaxed);
        let next = loop {
            // `current` can exceed `cap` after an overcommitting resize, so the sum is
            // checked rather than assumed to fit.
            let next = match current.checked_add(tokens) {
                Some(next) if next <= cap => next,
                _ => {
                    return Err(Refusal::Overloaded {
                        in_flight: current,
                        cap,
                    })
                }
            };
            match self
                .in_flight
                .compare_exchange_weak(current, next, Relaxed, Relaxed)
            {
                Ok(_) => break next,
                Err(actual) => current = actual,
            }
        };
        self.live.fetch_add(1, Relaxed);
        self.raise_high_water(next);
        Ok(())
    }

    /// Adds `tokens` to `in_flight` whatever the cap, and counts one more live reservation
    /// (under the shard's read lock, as [`admit`](Self::admit)), and an overcommit if that
    /// leaves it over the cap. Returns the tokens added: fewer only where the counter would
    /// pass `u64::MAX`.
    pub(crate) fn admit_unchecked(&self, tokens: u64) -> u64 {
        self.live.fetch_add(1, Relaxed);
        let (added, _, now) = self.add(tokens);
        if added > 0 && now > self.cap.load(Relaxed) {
            self.count_overcommit();
        }
        added
    }

    /// Marks the entry as seen again after its first request.
    pub(crate) fn mark_reused(&self) {
        if self.marks.load(Relaxed) & REUSED == 0 {
            self.marks.fetch_or(REUSED, Relaxed);
        }
    }

    /// Counts one more overcommit, unless the count is at its largest.
    fn count_overcommit(&self) {
        let more = |marks: u32| (marks & OVERCOMMITS != OVERCOMMITS).then_some(marks + 1);
        let _ = self.marks.fetch_update(Relaxed, Relaxed, more);
    }

    /// Grows `in_flight` by up to `delta` without a cap check and returns how much it grew:
    /// less than `delta` only when the counter would pass `u64::MAX`. Growth that takes
    /// `in_flight` from within the cap to above it counts an overcommit; growing further
    /// while above does not, so a stream that keeps growing past the cap counts once.
    pub(crate) fn grow(&self, delta: u64) -> u64 {
        let (added, previous, now) = self.add(delta);
        let cap = self.cap.load(Relaxed);
        if previous <= cap && now > cap {
            self.count_overcommit();
        }
        added
    }

    /// Adds up to `delta` to `in_flight`, saturating; returns what was added, and
    /// `in_flight` before and after.
    fn add(&self, delta: u64) -> (u64, u64, u64) {
        let previous = self
            .in_flight
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_add(delta)))
            .unwrap_or_else(|n| n);
        let added = delta.min(u64::MAX - previous);
        let now = previous + added;
        self.raise_high_water(now);
        (added, previous, now)
    }

    /// Grows `in_flight` by `delta` only if the total stays within the cap.
    pub(crate) fn try_grow(&self, delta: u64) -> Result<(), Refusal> {
        let cap = self.cap.load(Relaxed);
        let result = self.in_flight.fetch_update(Relaxed, Relaxed, |n| {
            n.checked_add(delta).filter(|&next| next <= cap)
        });
        match result {
            Ok(previous) => {
                self.raise_high_water(previous + delta);
                Ok(())
            }
            Err(in_flight) => Err(Refusal::Overloaded { in_flight, cap }),
        }
    }

    /// Returns `tokens` that a reservation held. Never more than was added for it, so the
    /// subtraction cannot wrap.
    pub(crate) fn shrink(&self, tokens: u64) {
        self.in_flight.fetch_sub(tokens, Relaxed);
    }

    /// Counts one reservation gone; when that leaves the entry idle and it is not counted
    /// yet, counts it in the shard's idle hint. (A pinned entry is counted too, and an entry
    /// admitted again meanwhile may be: over-counting only brings a sweep forward.)
    pub(crate) fn end_reservation(&self) {
        let before = self.live.fetch_sub(1, Relaxed);
        if before & !COUNTED == 1
            && before & COUNTED == 0
            && self.live.fetch_or(COUNTED, Relaxed) & COUNTED == 0
        {
            self.shard.note_idle();
        }
    }

    /// After a sweep (under the write lock, so nothing is admitted meanwhile): marks an
    /// idle entry as counted and a busy one as not, and tells whether the new hint must
    /// count it. A busy entry whose last reservation ends while this runs is caught by
    /// the value `fetch_and` returns.
    pub(crate) fn settle_idle_count(&self) -> bool {
        if self.is_pinned() {
            return false;
        }
        let before = self.live.fetch_and(!COUNTED, Relaxed);
        if before & !COUNTED == 0 {
            self.live.fetch_or(COUNTED, Relaxed);
            return true;
        }
        false
    }

    fn raise_high_water(&self, value: u64) {
        if value > self.high_water.load(Relaxed) {
            self.high_water.fetch_max(value, Relaxed);
        }
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Relaxed)
    }

    pub(crate) fn cap(&self) -> u64 {
        self.cap.load(Relaxed)
    }

    pub(crate) fn set_cap(&self, cap: u64) {
        self.cap.store(cap, Relaxed);
    }

    pub(crate) fn is_pinned(&self) -> bool {
        self.marks.load(Relaxed) & PINNED != 0
    }

    pub(crate) fn set_pinned(&self, pinned: bool) {
        match pinned {
            true => self.marks.fetch_or(PINNED, Relaxed),
            false => self.marks.fetch_and(!PINNED, Relaxed),
        };
    }

    /// Idle: nothing points at it but the map, and it is not pinned configuration.
    /// Only meaningful under the shard's write lock.
    pub(crate) fn is_idle(&self) -> bool {
        self.live.load(Relaxed) & !COUNTED == 0 && !self.is_pinned()
    }

    pub(crate) fn was_reused(&self) -> bool {
        self.marks.load(Relaxed) & REUSED != 0
    }

    pub(crate) fn state(&self) -> TenantTokenState {
        TenantTokenState {
            in_flight: self.in_flight.load(Relaxed),
            high_water: self.high_water.load(Relaxed),
            cap: self.cap.load(Relaxed),
            reservations: u64::from(self.live.load(Relaxed) & !COUNTED),
            overcommits: u64::from(self.marks.load(Relaxed) & OVERCOMMITS),
        }
    }
}
