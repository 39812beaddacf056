//! Leases: tokens a replica holds in Redis for one reservation (or one headroom), and the
//! registry of those it renews.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The largest token amount Redis keeps exactly (its Lua numbers are doubles); caps and
/// estimates above it count as this.
pub const MAX_REDIS_TOKENS: u64 = (1 << 53) - 1;

pub(super) fn clamp(tokens: u64) -> u64 {
    tokens.min(MAX_REDIS_TOKENS)
}

/// One lease, as this replica knows it. The registry of live leases (renewed in the
/// background) and the reservation that owns it share it.
pub(super) struct Lease {
    /// `replica:sequence`, unique across replicas.
    id: String,
    /// The key in this replica's registry of live leases.
    seq: u64,
    tenant: Arc<str>,
    /// The tenant's hash of leases.
    key: Arc<str>,
    cap: u64,
    /// Tokens held, as this replica last set them.
    tokens: AtomicU64,
    /// The tenant's tokens in flight across replicas when Redis last answered.
    in_flight: AtomicU64,
    /// Redis lost the lease at least once (and this replica registered it again).
    lost: AtomicBool,
    /// Its owner let it go: a background write still queued must not call it lost.
    released: AtomicBool,
    /// Orders this lease's background writes: each writes the value current when it runs.
    write: tokio::sync::Mutex<()>,
}

impl Lease {
    /// The lease a headroom holds: its id says so.
    pub(super) fn headroom(mut self) -> Self {
        self.id.push_str(":headroom");
        self
    }

    pub(super) fn id(&self) -> &str {
        &self.id
    }

    pub(super) fn tenant(&self) -> &Arc<str> {
        &self.tenant
    }

    /// The tenant's hash of leases.
    pub(super) fn key(&self) -> &Arc<str> {
        &self.key
    }

    pub(super) fn cap(&self) -> u64 {
        self.cap
    }

    /// Tokens held, as this replica last set them.
    pub(super) fn tokens(&self) -> u64 {
        self.tokens.load(Relaxed)
    }

    pub(super) fn set_tokens(&self, tokens: u64) {
        self.tokens.store(tokens, Relaxed);
    }

    /// The tenant's tokens in flight across replicas when Redis last answered.
    pub(super) fn in_flight(&self) -> u64 {
        self.in_flight.load(Relaxed)
    }

    pub(super) fn set_in_flight(&self, in_flight: u64) {
        self.in_flight.store(in_flight, Relaxed);
    }

    /// The tenant's cap and what was left of it when Redis last answered.
    pub(super) fn limits(&self) -> (u64, u64) {
        (self.cap, self.cap.saturating_sub(self.in_flight()))
    }

    /// Whether Redis lost the lease at least once.
    pub(super) fn is_lost(&self) -> bool {
        self.lost.load(Relaxed)
    }

    /// Redis had lost the lease, and this replica registered it again.
    pub(super) fn set_lost(&self) {
        self.lost.store(true, Relaxed);
    }

    /// Whether its owner let it go.
    pub(super) fn is_released(&self) -> bool {
        self.released.load(Relaxed)
    }

    /// Waits for the lease's earlier writes to Redis, and holds the later ones back until
    /// the guard is dropped.
    pub(super) async fn order(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.write.lock().await
    }
}

/// A replica's leases: the ids it gives them, and the live ones, which it renews.
pub(super) struct Leases {
    /// This replica's id, the first part of each of its lease ids.
    replica: String,
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Lease>>>,
}

impl Leases {
    pub(super) fn new() -> Self {
        Self {
            replica: replica_id(),
            next: AtomicU64::new(0),
            live: Mutex::default(),
        }
    }

    pub(super) fn replica(&self) -> &str {
        &self.replica
    }

    /// A new lease of `tokens` for `tenant_id`, in its hash `key`, whose cap is `cap`,
    /// with this replica's next id.
    pub(super) fn new_lease(&self, tenant_id: &str, key: String, cap: u64, tokens: u64) -> Lease {
        let seq = self.next.fetch_add(1, Relaxed);
        Lease {
            id: format!("{}:{seq}", self.replica),
            seq,
            tenant: Arc::from(tenant_id),
            key: key.into(),
            cap,
            tokens: AtomicU64::new(tokens),
            in_flight: AtomicU64::new(0),
            lost: Default::default(),
            released: Default::default(),
            write: tokio::sync::Mutex::new(()),
        }
    }

    /// Keeps `lease` for renewal; `true` when no other lease was held.
    pub(super) fn hold(&self, lease: &Arc<Lease>) -> bool {
        let mut live = self.lock();
        let first = live.is_empty();
        live.insert(lease.seq, Arc::clone(lease));
        first
    }

    /// Stops renewing a lease that is being released.
    pub(super) fn forget(&self, lease: &Lease) {
        lease.released.store(true, Relaxed);
        self.lock().remove(&lease.seq);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// The live leases, by the hash they are in.
    pub(super) fn by_key(&self) -> HashMap<Arc<str>, Vec<Arc<Lease>>> {
        let mut by_key: HashMap<Arc<str>, Vec<Arc<Lease>>> = HashMap::new();
        for lease in self.lock().values() {
            by_key
                .entry(Arc::clone(&lease.key))
                .or_default()
                .push(Arc::clone(lease));
        }
        by_key
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Lease>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A replica id unlikely to repeat: std's random hasher keys, the process id and the time.
fn replica_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    format!("{:016x}", hasher.finish())
}
