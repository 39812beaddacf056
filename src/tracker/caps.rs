//! Where a tenant's cap comes from when none is set for it: the cap function's answer,
//! else the default. Shared by the in-memory and the Redis trackers.

use std::fmt;
use std::sync::Arc;

type CapFn = dyn Fn(&str) -> Option<u64> + Send + Sync;

/// The default cap and the cap function, if any.
#[derive(Clone)]
pub(crate) struct Caps {
    pub(crate) default: u64,
    lookup: Option<Arc<CapFn>>,
}

impl Caps {
    pub(crate) fn new(default: u64) -> Self {
        Self {
            default,
            lookup: None,
        }
    }

    pub(crate) fn set_lookup<F>(&mut self, f: F)
    where
        F: Fn(&str) -> Option<u64> + Send + Sync + 'static,
    {
        self.lookup = Some(Arc::new(f));
    }

    /// The cap of `tenant_id`.
    pub(crate) fn of(&self, tenant_id: &str) -> u64 {
        self.lookup
            .as_ref()
            .and_then(|lookup| lookup(tenant_id))
            .unwrap_or(self.default)
    }
}

impl fmt::Debug for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caps")
            .field("default_cap", &self.default)
            .field("cap_fn", &self.lookup.is_some())
            .finish()
    }
}
