//! A call to Redis: through the tracker's connection, within the call timeout.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use redis::RedisError;

use super::conn::Conn;
use crate::Error;

/// The connection, and how long one call through it may take. Clones share the
/// connection.
#[derive(Clone)]
pub(super) struct Calls {
    conn: Conn,
    timeout: Duration,
}

impl Calls {
    pub(super) fn new(conn: Conn, timeout: Duration) -> Self {
        Self { conn, timeout }
    }

    pub(super) fn conn(&self) -> &Conn {
        &self.conn
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Awaits `call`, giving up after the timeout.
    pub(super) async fn timed<T>(
        &self,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(Failure::Redis),
            Err(_) => Err(Failure::TimedOut(self.timeout)),
        }
    }
}

/// Why a call to Redis failed.
pub(super) enum Failure {
    TimedOut(Duration),
    Redis(RedisError),
}

impl Failure {
    /// A broken connection, which the connection manager is remaking: worth one retry.
    pub(super) fn is_connection(&self) -> bool {
        matches!(self, Failure::Redis(e) if e.is_io_error() || e.is_unrecoverable_error())
    }

    pub(super) fn unavailable(&self) -> Error {
        Error::BackendUnavailable {
            reason: format!("redis: {self}"),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::TimedOut(after) => write!(f, "no answer within {after:?}"),
            Failure::Redis(error) => error.fmt(f),
        }
    }
}
