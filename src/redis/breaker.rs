//! A circuit breaker, so an outage costs each request nothing instead of a timeout.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Closed while Redis answers. After `threshold` failures in a row it opens for `cooldown`:
/// calls are not attempted and the failure policy answers at once. Then one call is let
/// through as a probe; its success closes the breaker, its failure opens it again.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    started: Instant,
    failures: AtomicU32,
    /// Milliseconds since `started` until which calls are not attempted; 0 when closed.
    open_until: AtomicU64,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            started: Instant::now(),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
        }
    }

    /// Whether to attempt a call now. While open, one caller after each cooldown wins the
    /// right to probe (the deadline moves on for the others).
    pub(crate) fn allow(&self) -> bool {
        let until = self.open_until.load(Relaxed);
        if until == 0 {
            return true;
        }
        let now = self.now_ms();
        now >= until
            && self
                .open_until
                .compare_exchange(until, now + self.cooldown_ms(), Relaxed, Relaxed)
                .is_ok()
    }

    /// Whether calls are being skipped now.
    pub(crate) fn is_open(&self) -> bool {
        self.open_until.load(Relaxed) != 0
    }

    pub(crate) fn success(&self) {
        self.failures.store(0, Relaxed);
        if self.open_until.swap(0, Relaxed) != 0 {
            tracing::warn!("redis reachable again: shared token caps enforced again");
        }
    }

    pub(crate) fn failure(&self, reason: &str) {
        let failures = self.failures.fetch_add(1, Relaxed).saturating_add(1);
        if failures < self.threshold {
            return;
        }
        let until = self.now_ms() + self.cooldown_ms();
        if self.open_until.swap(until, Relaxed) == 0 {
            tracing::warn!(
                failures,
                cooldown_ms = self.cooldown_ms(),
                reason,
                "redis unreachable: circuit open, the failure policy answers without calling it"
            );
        }
    }

    fn now_ms(&self) -> u64 {
        // At least 1, so that 0 can mean "closed".
        (self.started.elapsed().as_millis() as u64).max(1)
    }

    fn cooldown_ms(&self) -> u64 {
        (self.cooldown.as_millis() as u64).max(1)
    }
}
