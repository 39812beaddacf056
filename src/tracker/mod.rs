//! The in-process ledger: who holds how many tokens right now.

mod caps;
pub(crate) mod entry;
mod reservation;
mod scope;
mod shard;
mod state;

use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;

pub(crate) use self::caps::Caps;
use self::entry::Entry;
use self::shard::Shard;
use crate::{sync, Error};

pub use self::reservation::TokenReservation;
pub use self::scope::TenantScope;
pub use self::state::TenantTokenState;

const MAX_SHARDS: usize = 64;

/// Enforces a per-tenant cap on tokens in flight.
///
/// [`reserve`](Self::reserve) admits a request's tokens if they fit under the tenant's cap
/// next to everything that tenant already has in flight, and returns a
/// [`TokenReservation`] that gives them back when dropped. It never blocks and never waits:
/// a request that does not fit gets [`Error::TenantOverloaded`] (try again later) or, when
/// it is larger than the cap itself, [`Error::RequestTooLarge`] (it never will fit).
///
/// # Caps
///
/// Each tenant's cap is, in order: one set with [`set_cap`](Self::set_cap); else the answer
/// of the cap function given to [`TenantTokenTrackerBuilder::cap_fn`] (plans and tiers looked
/// up elsewhere); else the default cap. Any `u64` is a valid cap, `u64::MAX` included. A
/// cap lowered while work is in flight revokes nothing: it gates new reservations only.
///
/// # Memory
///
/// A tenant with work in flight is always tracked. Once idle, it stays cached so the next
/// request finds it without allocating, but only up to
/// [`max_idle_tenants`](TenantTokenTrackerBuilder::max_idle_tenants) idle tenants (default
/// [`DEFAULT_MAX_IDLE_TENANTS`](TenantTokenTracker::DEFAULT_MAX_IDLE_TENANTS)). Beyond that, idle tenants are forgotten (down to three
/// quarters of the bound, so clean-ups are rare), those seen only once going first: a
/// caller spraying random tenant ids cannot grow the tracker without bound, and evicts its
/// own one-off ids before the steady tenants. Tenants with a cap from `set_cap` are configuration and are kept until
/// [`remove_cap`](Self::remove_cap).
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use tower_tenant_tokens::{Error, TenantScope, TenantTokenTracker};
///
/// let tracker = Arc::new(TenantTokenTracker::new(1_000));
/// let acme = TenantScope::new("acme");
///
/// let first = tracker.reserve(&acme, 800)?;
/// assert!(matches!(
///     tracker.reserve(&acme, 300),
///     Err(Error::TenantOverloaded { .. })
/// ));
/// drop(first);
/// let _second = tracker.reserve(&acme, 300)?;
/// # Ok::<(), Error>(())
/// ```
pub struct TenantTokenTracker {
    shards: Box<[sync::Arc<Shard>]>,
    /// Seeded at random per tracker; see [`locate`](Self::locate).
    hasher: foldhash::fast::RandomState,
    caps: Caps,
    max_idle: usize,
}

impl TenantTokenTracker {
    /// How many idle tenants a tracker keeps by default: a few kilobytes of cache that
    /// spare steady tenants an allocation. A gateway whose tenants come back after idle
    /// spells of their own can keep more with
    /// [`TenantTokenTrackerBuilder::max_idle_tenants`]. (Tenants with work in flight are
    /// tracked whatever the bound.)
    pub const DEFAULT_MAX_IDLE_TENANTS: usize = 4_096;

    /// A tracker where every tenant's cap is `default_cap`, keeping up to
    /// [`DEFAULT_MAX_IDLE_TENANTS`](Self::DEFAULT_MAX_IDLE_TENANTS) idle tenants.
    pub fn new(default_cap: u64) -> Self {
        Self::builder(default_cap).build()
    }

    /// Starts a tracker with more settings than [`new`](Self::new).
    pub fn builder(default_cap: u64) -> TenantTokenTrackerBuilder {
        TenantTokenTrackerBuilder {
            caps: Caps::new(default_cap),
            max_idle: Self::DEFAULT_MAX_IDLE_TENANTS,
        }
    }

    /// Reserves `tokens` for the scope's tenant, if they fit under its cap now.
    ///
    /// # Errors
    ///
    /// [`Error::RequestTooLarge`] when `tokens` exceeds the cap itself, and
    /// [`Error::TenantOverloaded`] when it only exceeds what is left of it now.
    pub fn reserve(
        self: &Arc<Self>,
        scope: &TenantScope,
        tokens: u64,
    ) -> Result<TokenReservation, Error> {
        self.reserve_id(&scope.tenant_id, tokens)
    }

    /// [`reserve`](Self::reserve) by tenant id, without building a [`TenantScope`].
    ///
    /// # Errors
    ///
    /// As for [`reserve`](Self::reserve).
    pub fn reserve_id(&self, tenant_id: &str, tokens: u64) -> Result<TokenReservation, Error> {
        self.reserve_in(tenant_id, tokens, true)
    }

    /// Reserves `tokens` for `tenant_id` whatever its cap: for work that runs regardless,
    /// such as a request admitted in shadow mode
    /// ([`TenantTokenLayer::shadow`](crate::TenantTokenLayer::shadow)). The tokens count
    /// like any others (new reservations see them), and an overshoot of the cap shows in
    /// [`TenantTokenState::overcommits`].
    pub fn reserve_unchecked(&self, tenant_id: &str, tokens: u64) -> TokenReservation {
        match self.reserve_in(tenant_id, tokens, false) {
            Ok(reservation) => reservation,
            Err(_) => unreachable!("an unchecked reservation is never refused"),
        }
    }

    #[inline]
    fn reserve_in(
        &self,
        tenant_id: &str,
        tokens: u64,
        checked: bool,
    ) -> Result<TokenReservation, Error> {
        let admit = |entry: &sync::Arc<Entry>| {
            let held = if checked {
                entry
                    .admit(tokens)
                    .map_err(|refusal| Error::from_refusal(tenant_id, tokens, refusal))?;
                tokens
            } else {
                entry.admit_unchecked(tokens)
            };
            Ok(TokenReservation::new(sync::Arc::clone(entry), held))
        };
        let (hash, shard) = self.locate(tenant_id);
        {
            let map = shard.read();
            if let Some(entry) = map.get(hash, tenant_id) {
                entry.mark_reused();
                return admit(entry);
            }
        }
        // A tenant seen for the first time (or evicted while idle). The cap is resolved
        // before taking the write lock so a slow cap function does not stall the shard.
        let cap = self.resolved_cap(tenant_id);
        if checked && tokens > cap {
            // Not inserted: an entry that would hold nothing only costs memory.
            return Err(Error::RequestTooLarge {
                tenant_id: tenant_id.to_owned(),
                tokens,
                cap,
            });
        }
        let mut map = shard.write();
        let entry = match map.get(hash, tenant_id) {
            Some(entry) => entry, // inserted by a racing request meanwhile
            None => {
                let entry = Entry::new(Box::from(tenant_id), cap, false, sync::Arc::clone(shard));
                map.insert(hash, sync::Arc::new(entry))
            }
        };
        admit(entry)
    }

    /// Sets `tenant_id`'s cap, overriding the cap function and the default, until
    /// [`remove_cap`](Self::remove_cap). Reservations already admitted are kept even when
    /// the new cap is lower; new ones are checked against it.
    pub fn set_cap(&self, tenant_id: &str, cap: u64) {
        let (hash, shard) = self.locate(tenant_id);
        let mut map = shard.write();
        match map.get(hash, tenant_id) {
            Some(entry) => {
                entry.set_cap(cap);
                entry.set_pinned(true);
            }
            None => {
                let entry = Entry::new(Box::from(tenant_id), cap, true, sync::Arc::clone(shard));
                map.insert(hash, sync::Arc::new(entry));
            }
        }
    }

    /// Removes a cap set with [`set_cap`](Self::set_cap): the tenant goes back to the cap
    /// function or the default cap, and to the idle cache. Returns whether a cap was set.
    pub fn remove_cap(&self, tenant_id: &str) -> bool {
        let cap = self.resolved_cap(tenant_id);
        let (hash, shard) = self.locate(tenant_id);
        let was_pinned = {
            let map = shard.read();
            match map.get(hash, tenant_id) {
                Some(entry) if entry.is_pinned() => {
                    entry.set_cap(cap);
                    entry.set_pinned(false);
                    true
                }
                _ => false,
            }
        };
        if was_pinned {
            shard.note_idle(); // it may be idle now; an overcount only brings a sweep forward
        }
        was_pinned
    }

    /// Asks the cap function again for every tracked tenant without a cap from
    /// [`set_cap`](Self::set_cap). The function's answer is otherwise kept while the tenant
    /// is tracked; call this after the plans it reads from change.
    pub fn refresh_caps(&self) {
        for shard in self.shards.iter() {
            let entries: Vec<sync::Arc<Entry>> = shard.read().entries().cloned().collect();
            for entry in entries.iter().filter(|entry| !entry.is_pinned()) {
                entry.set_cap(self.resolved_cap(&entry.id));
            }
        }
    }

    /// The cap that applies to `tenant_id` now.
    pub fn cap(&self, tenant_id: &str) -> u64 {
        let (hash, shard) = self.locate(tenant_id);
        match shard.read().get(hash, tenant_id) {
            Some(entry) => entry.cap(),
            None => self.resolved_cap(tenant_id),
        }
    }

    /// Tokens `tenant_id` has in flight now (0 for a tenant not tracked).
    pub fn in_flight(&self, tenant_id: &str) -> u64 {
        let (hash, shard) = self.locate(tenant_id);
        shard
            .read()
            .get(hash, tenant_id)
            .map_or(0, |e| e.in_flight())
    }

    /// The state of one tenant, if it is tracked.
    pub fn tenant_state(&self, tenant_id: &str) -> Option<TenantTokenState> {
        let (hash, shard) = self.locate(tenant_id);
        shard.read().get(hash, tenant_id).map(|e| e.state())
    }

    /// Every tracked tenant (with work in flight, idle but cached, or with a set cap) and its
    /// state, in no particular order.
    pub fn snapshot(&self) -> Vec<(String, TenantTokenState)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let map = shard.read();
            out.extend(map.entries().map(|e| (e.id.to_string(), e.state())));
        }
        out
    }

    /// How many tenants the tracker holds now (in flight, idle, or with a set cap).
    pub fn tracked_tenants(&self) -> usize {
        self.shards.iter().map(|shard| shard.read().len()).sum()
    }

    /// The most idle tenants the tracker keeps.
    ///
    /// The bound is split evenly across the tracker's internal shards, so the number kept
    /// can be a little lower than the value configured, never higher.
    pub fn max_idle_tenants(&self) -> usize {
        self.max_idle
    }

    /// The cap for tenants without a set cap or an answer from the cap function.
    pub fn default_cap(&self) -> u64 {
        self.caps.default
    }

    /// The tenant id's hash (computed once per request) and the shard it lives in.
    ///
    /// The hash is foldhash (hashbrown's default hasher), seeded at random per tracker:
    /// callers choose tenant ids, but without the seed they cannot choose ids that collide.
    /// It costs a tenth of std's SipHash on a short id, on every request.
    fn locate(&self, tenant_id: &str) -> (u64, &sync::Arc<Shard>) {
        let hash = self.hasher.hash_one(tenant_id);
        // The table inside a shard uses a hash's low bits for buckets and its top bits for
        // tags; the middle bits pick the shard so neither is skewed within one.
        let index = (hash >> 32) as usize & (self.shards.len() - 1);
        (hash, &self.shards[index])
    }

    fn resolved_cap(&self, tenant_id: &str) -> u64 {
        self.caps.of(tenant_id)
    }
}

impl Drop for TenantTokenTracker {
    fn drop(&mut self) {
        // Entries point at their shard, and shards own their entries: break the cycle.
        // Reservations still alive keep their entry (and its shard) until they end.
        for shard in self.shards.iter() {
            shard.clear();
        }
    }
}

impl fmt::Debug for TenantTokenTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantTokenTracker")
            .field("caps", &self.caps)
            .field("max_idle_tenants", &self.max_idle)
            .field("tracked_tenants", &self.tracked_tenants())
            .finish()
    }
}

/// Settings for a [`TenantTokenTracker`]; start one with [`TenantTokenTracker::builder`].
///
/// ```
/// use tower_tenant_tokens::TenantTokenTracker;
///
/// let tracker = TenantTokenTracker::builder(10_000)
///     .cap_fn(|tenant| tenant.starts_with("enterprise-").then_some(100_000))
///     .max_idle_tenants(50_000)
///     .build();
/// assert_eq!(tracker.cap("enterprise-acme"), 100_000);
/// assert_eq!(tracker.cap("hobbyist"), 10_000);
/// ```
#[must_use]
pub struct TenantTokenTrackerBuilder {
    caps: Caps,
    max_idle: usize,
}

impl TenantTokenTrackerBuilder {
    /// Looks up a tenant's cap when the tenant is first tracked; `None` means the default
    /// cap. The answer is kept while the tenant stays tracked (see
    /// [`TenantTokenTracker::refresh_caps`]). Keep it fast: it runs on the request path of a
    /// tenant's first request.
    pub fn cap_fn<F>(mut self, cap_fn: F) -> Self
    where
        F: Fn(&str) -> Option<u64> + Send + Sync + 'static,
    {
        self.caps.set_lookup(cap_fn);
        self
    }

    /// How many idle tenants to keep for reuse (default
    /// [`DEFAULT_MAX_IDLE_TENANTS`](TenantTokenTracker::DEFAULT_MAX_IDLE_TENANTS)).
    /// `0` forgets a tenant as soon as its last reservation ends.
    pub fn max_idle_tenants(mut self, max_idle: usize) -> Self {
        self.max_idle = max_idle;
        self
    }

    /// Builds the tracker.
    pub fn build(self) -> TenantTokenTracker {
        // Enough shards that two cores rarely meet on one lock, few enough that each keeps
        // a useful share of the idle bound.
        let wanted = (self.max_idle / 16).clamp(1, MAX_SHARDS);
        let shard_count = if wanted.is_power_of_two() {
            wanted
        } else {
            wanted.next_power_of_two() / 2
        };
        let per_shard = self.max_idle / shard_count;
        let shards = (0..shard_count)
            .map(|_| sync::Arc::new(Shard::new(per_shard)))
            .collect();
        TenantTokenTracker {
            shards,
            hasher: foldhash::fast::RandomState::default(),
            caps: self.caps,
            max_idle: self.max_idle,
        }
    }
}

impl fmt::Debug for TenantTokenTrackerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantTokenTrackerBuilder")
            .field("caps", &self.caps)
            .field("max_idle_tenants", &self.max_idle)
            .finish()
    }
}
