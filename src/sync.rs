//! The synchronisation the ledger is built on: std's, or shuttle's when the tracker's
//! interleavings are explored (`RUSTFLAGS="--cfg tower_tenant_tokens_shuttle"
//! cargo test --release --test shuttle`).

#[cfg(tower_tenant_tokens_shuttle)]
pub(crate) use shuttle::sync::{atomic, Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
#[cfg(not(tower_tenant_tokens_shuttle))]
pub(crate) use std::sync::{atomic, Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
