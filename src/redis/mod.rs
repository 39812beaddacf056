//! One cap shared by every replica: the ledger in Redis, with expiring leases (feature
//! `redis`). Use [`RedisTokenTracker`] with
//! [`TenantTokenLayer::new`](crate::TenantTokenLayer::new).

// Each file uses only files earlier in this order. The parts, each owning its state:
// breaker, events, fair, keys, lease, scripts, stats; conn, headroom, policy; call,
// watch; batch. What a tracker's clones, reservations and tasks share, built of them:
// shared. What works on that: draw, reservation, reserve, queue, renew. On top: tracker,
// then list and windows, and ledger, the tracker's side of the crate's ledger boundary.
mod batch;
mod breaker;
mod call;
mod conn;
mod draw;
mod events;
mod fair;
mod headroom;
mod keys;
mod lease;
mod ledger;
mod list;
mod policy;
mod queue;
mod renew;
mod reservation;
mod reserve;
mod scripts;
mod shared;
mod stats;
mod tracker;
mod watch;
mod windows;

pub use self::lease::MAX_REDIS_TOKENS;
pub use self::policy::FailurePolicy;
pub(crate) use self::queue::Turn;
pub use self::reservation::RedisReservation;
pub use self::stats::RedisTrackerStats;
pub use self::tracker::{
    RedisTokenTracker, RedisTokenTrackerBuilder, DEFAULT_CALL_TIMEOUT, DEFAULT_LEASE_TTL,
    DEFAULT_RENEW_EVERY,
};
