//! What a tracker counts of what it did.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counts of what a [`RedisTokenTracker`](super::RedisTokenTracker) did, since it was
/// built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisTrackerStats {
    /// Reservations Redis admitted, one lease each.
    pub admitted: u64,
    /// Reservations admitted from this replica's
    /// [headroom](super::RedisTokenTrackerBuilder::local_headroom), without a round trip.
    pub admitted_locally: u64,
    /// Reservations Redis refused (over the cap).
    pub refused: u64,
    /// Requests the failure policy answered because Redis could not be asked.
    pub unavailable: u64,
    /// Leases Redis had lost while this replica still held them (a restart without the
    /// data, a flush, a failover, or this replica cut off for longer than the TTL), each
    /// registered again at the next renewal or resize (at once after a reconnection).
    pub lost_leases: u64,
    /// Releases Redis could not be told of; those leases expire after their TTL instead.
    pub failed_releases: u64,
}

/// One of the things counted, as [`RedisTrackerStats`] names them.
#[derive(Clone, Copy)]
pub(super) enum Count {
    Admitted,
    AdmittedLocally,
    Refused,
    Unavailable,
    LostLease,
    FailedRelease,
}

#[derive(Default)]
pub(super) struct Counters {
    admitted: AtomicU64,
    admitted_locally: AtomicU64,
    refused: AtomicU64,
    unavailable: AtomicU64,
    lost_leases: AtomicU64,
    failed_releases: AtomicU64,
}

impl Counters {
    pub(super) fn add(&self, count: Count) {
        let counter = match count {
            Count::Admitted => &self.admitted,
            Count::AdmittedLocally => &self.admitted_locally,
            Count::Refused => &self.refused,
            Count::Unavailable => &self.unavailable,
            Count::LostLease => &self.lost_leases,
            Count::FailedRelease => &self.failed_releases,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub(super) fn stats(&self) -> RedisTrackerStats {
        RedisTrackerStats {
            admitted: self.admitted.load(Relaxed),
            admitted_locally: self.admitted_locally.load(Relaxed),
            refused: self.refused.load(Relaxed),
            unavailable: self.unavailable.load(Relaxed),
            lost_leases: self.lost_leases.load(Relaxed),
            failed_releases: self.failed_releases.load(Relaxed),
        }
    }
}
