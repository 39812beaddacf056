//! A point-in-time view of one tenant's ledger entry.

/// What the tracker knows about one tenant at the moment of a
/// [`snapshot`](crate::TenantTokenTracker::snapshot).
///
/// The fields are read one by one without a lock, so under concurrent traffic they may come
/// from slightly different instants; each is exact on its own.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TenantTokenState {
    /// Tokens reserved by requests being served right now.
    pub in_flight: u64,
    /// The highest `in_flight` seen since the tenant was first tracked (or last evicted).
    pub high_water: u64,
    /// The cap new reservations are checked against.
    pub cap: u64,
    /// How many reservations are alive.
    pub reservations: u64,
    /// How many times admitted work took `in_flight` above `cap`: growth of a running
    /// request ([`resize`](crate::TokenReservation::resize)) that crossed it, or a request
    /// admitted over it (shadow mode). Such work is allowed (it is already running) and
    /// counted here so that it is never invisible. Growth while already above the cap does
    /// not count again: a stream that keeps growing past the cap counts once, not once a
    /// chunk. The count stops at 2^30 - 1 (it shares a word with the entry's marks).
    pub overcommits: u64,
}
