//! The Lua scripts that change a tenant's leases atomically inside Redis.
//!
//! Every script works on one tenant's hash, `KEYS[1]` (one key, so one cluster slot):
//!
//! - each lease id → `"<tokens>:<deadline>"` (the deadline in milliseconds of Redis's own
//!   clock);
//! - `=sum`, the tokens of all its leases (the tenant's tokens in flight);
//! - `=min`, a time no lease's deadline is earlier than (so nothing can have expired
//!   before it);
//! - `=exp`, when the key itself expires.
//!
//! Lease ids never start with `=`, and the three `=` fields are there whenever the key is.
//!
//! Expired leases are swept only where that can change an answer: before a reservation is
//! refused, and before a lease is resized or renewed or the state read, each time only once
//! `=min` has passed. A sweep reads the whole hash, drops the expired leases, and
//! counts `=sum` and `=min` again from what is left, so the common path pays for none.
//! Expired leases left meanwhile count in the figures returned until then; they never
//! refuse a request. A deadline moved later leaves `=min` early, which costs at most one
//! sweep that finds nothing, and that sweep sets `=min` right again.
//!
//! The key expires two TTLs after its latest write that needed it; its expiry is pushed
//! only when a new deadline would pass `=exp`, so most reservations skip it. It outlives
//! its last lease until then, holding `=sum` 0, rather than being deleted with it: making
//! and deleting a tenant's key costs Redis more than the reservation itself, and a tenant
//! whose requests come one at a time would pay for both on every request.

use std::sync::OnceLock;

use redis::Script;

/// Shared by every script: Redis's clock, reading and writing leases, the sweep, and
/// reserving and releasing one lease.
pub(super) const CORE: &str = include_str!("core.lua");

/// `ARGV`: lease, tokens, cap (empty: unchecked growth), ttl, the tokens the lease holds
/// now. Returns `{status, in_flight, registered_again}`: status 1 set, 0 growth over the
/// cap (the tokens unchanged); `registered_again` 1 when the lease had been lost and was
/// registered again with the tokens it holds now first.
const RESIZE: &str = include_str!("resize.lua");

/// `ARGV`: ttl, then pairs of lease id and the tokens it holds. Pushes the deadline of each
/// lease; one Redis no longer has (expired, or lost with the server's data) is registered
/// again with its tokens, whatever the cap. Returns `{in_flight, {ids registered again}}`.
const RENEW: &str = include_str!("renew.lua");

/// The buckets of windows over time, kept beside a tenant's leases: reading, charging
/// all or none, adjusting (see the file).
const WINDOW: &str = include_str!("window.lua");

/// Reservations, releases and windows' adjustments in one call, each on its own tenant's
/// keys: `KEYS` are an operation's keys in order, and `ARGV` the ttl, then for each
/// operation
///
/// - `r` (reserve): the lease, its tokens and the cap; key: the tenant's hash;
/// - `R` (reserve and charge windows): the same, then the number `n` of windows to charge
///   with it, and for each window its units, limit, period in milliseconds and `1` to
///   charge it whatever it holds (`0` otherwise); keys: the tenant's hash, then each
///   window's bucket;
/// - `x` (release): the lease; key: the tenant's hash;
/// - `w` (adjust a window): the units to charge (negative: given back), the limit and the
///   period; key: the bucket.
///
/// Returns two numbers an operation, in order: for a reservation its status and the
/// tenant's tokens in flight (see `reserve`), or for a window's refusal `-1 - i` for the
/// `i`-th window (from 1) and what its bucket held (the lease is released again), then
/// for `R` what each window's bucket holds after the call; for a release 1 if the lease
/// was there and the tokens in flight after it; for an adjustment 1 and 0.
const BATCH: &str = include_str!("batch.lua");

/// `KEYS[1]` a window's bucket; `ARGV`: its limit and period in milliseconds. Returns the
/// units left, at least 0.
const WINDOW_STATE: &str = "local level = level_of(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if level < 0 then level = 0 end
return math.floor(level)";

/// No `ARGV`. Returns the tokens in flight, after the sweep.
const STATE: &str = "return (look(KEYS[1], nil))";

/// The fair queue's Lua: helpers and entry points (`admit`, `cancel`, `renew`), after the
/// lease helpers (`KEYS[1]` the budget's leases). See `queue`.
const QUEUE: &str = include_str!("queue.lua");

/// `KEYS[1]` the tickets' deadlines; `ARGV`: channel. Wakes the waiters, if any.
const QUEUE_WAKE: &str = r"
if redis.call('ZCARD', KEYS[1]) > 0 then redis.call('PUBLISH', ARGV[1], '') end
return 0
";

/// Every script, hashed once a process, as every tracker's are the same; `redis::Script`
/// loads one again when the server answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).
pub(crate) struct Scripts {
    pub(crate) batch: Script,
    pub(crate) resize: Script,
    pub(crate) renew: Script,
    pub(crate) state: Script,
    pub(crate) window_state: Script,
    /// The fair queue's.
    pub(crate) queue_admit: Script,
    pub(crate) queue_cancel: Script,
    pub(crate) queue_renew: Script,
    pub(crate) queue_wake: Script,
}

impl Scripts {
    fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{CORE}{body}"));
        let queue = |name: &str| Script::new(&format!("{CORE}{QUEUE}\nreturn {name}()\n"));
        Self {
            batch: Script::new(&format!("{CORE}{WINDOW}{BATCH}")),
            resize: script(RESIZE),
            renew: script(RENEW),
            state: script(STATE),
            window_state: Script::new(&format!("{CORE}{WINDOW}{WINDOW_STATE}")),
            queue_admit: queue("admit"),
            queue_cancel: queue("cancel"),
            queue_renew: queue("renew"),
            queue_wake: Script::new(QUEUE_WAKE),
        }
    }
}

/// The scripts, hashed on first use.
pub(crate) fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(Scripts::new)
}
