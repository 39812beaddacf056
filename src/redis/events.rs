//! Noticing that Redis may have lost leases this replica holds: a call found the
//! connection broken, a connection was made to a new master, the Sentinels announced a
//! failover. Each raises a flag and wakes the renewal task, which renews at once (retrying
//! until it goes through) instead of at its next period, so the leases a new or restarted
//! server lacks are registered again within moments.
//!
//! All of it works only while this replica holds leases: with none there is nothing Redis
//! could have lost, so an idle replica sends nothing and listens to nothing.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind};
use tokio::sync::Notify;

/// A call found the connection broken (or the server no master any more).
pub(super) const BROKEN: u8 = 1;
/// A connection to a server that may lack this replica's leases was made.
pub(super) const RECONNECTED: u8 = 2;
/// The first lease is held: start checking the connection.
pub(super) const HELD: u8 = 4;
/// The master may have changed: check the connection now.
pub(super) const CHECK: u8 = 8;

/// What the connection tells the renewal task: flags raised since it last looked, and a
/// wake-up.
#[derive(Default)]
pub(super) struct Events {
    flags: AtomicU8,
    wake: Notify,
}

impl Events {
    /// Awaits `call`, telling of the error it ends with, if that error breaks the
    /// connection.
    pub(super) async fn watch<T>(
        &self,
        call: impl Future<Output = RedisResult<T>>,
    ) -> RedisResult<T> {
        let answer = call.await;
        if let Err(error) = &answer {
            self.saw(error);
        }
        answer
    }

    /// Tells of `error` if it breaks the connection.
    pub(super) fn saw(&self, error: &RedisError) {
        if breaks_connection(error) {
            self.raise(BROKEN);
        }
    }

    pub(super) fn reconnected(&self) {
        self.raise(RECONNECTED);
    }

    pub(super) fn held(&self) {
        self.raise(HELD);
    }

    pub(super) fn check(&self) {
        self.raise(CHECK);
    }

    fn raise(&self, flag: u8) {
        if self.flags.fetch_or(flag, Relaxed) & flag == 0 {
            self.wake.notify_one();
        }
    }

    /// The flags raised since the last call, cleared.
    pub(super) fn take(&self) -> u8 {
        self.flags.swap(0, Relaxed)
    }

    /// Returns once a flag was raised (at once if one was raised since the last wake-up).
    pub(super) async fn raised(&self) {
        self.wake.notified().await;
    }
}

/// Errors after which the connection is remade, or the master looked up again: the
/// server that answers next may be another one, or the same one restarted empty.
fn breaks_connection(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_unrecoverable_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
            )
        )
}
