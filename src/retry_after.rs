//! How long reservations are held, for a `Retry-After` derived from what is in flight.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The mean time a layer's reservations are held, exponentially weighted (each new
/// sample counts for 1/8), across tenants.
#[derive(Debug, Default)]
pub(crate) struct HoldTimes {
    /// Nanoseconds; 0 until the first reservation ends.
    mean_ns: AtomicU64,
}

impl HoldTimes {
    fn record(&self, held: Duration) {
        let sample = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX).max(1);
        let _ = self.mean_ns.fetch_update(Relaxed, Relaxed, |mean| {
            Some(match mean {
                0 => sample,
                mean => mean - mean / 8 + sample / 8,
            })
        });
    }

    /// When `requested` tokens may fit next to `in_flight` under `cap`: the mean hold time
    /// times the share of what is in flight that must be released first, at most `max`.
    /// `None` until a reservation has ended (nothing is known yet).
    pub(crate) fn retry_after(
        &self,
        requested: u64,
        in_flight: u64,
        cap: u64,
        max: Duration,
    ) -> Option<Duration> {
        let mean = self.mean_ns.load(Relaxed);
        if mean == 0 || in_flight == 0 {
            return None;
        }
        let needed = requested.saturating_add(in_flight).saturating_sub(cap);
        let share = needed as f64 / in_flight as f64;
        let wait = Duration::from_secs_f64((mean as f64 * share / 1e9).min(max.as_secs_f64()));
        Some(wait.min(max))
    }
}

/// The clock of one reservation, started at admission and read at its release.
#[derive(Debug)]
pub(crate) struct HoldClock {
    started: Instant,
    times: Arc<HoldTimes>,
}

impl HoldClock {
    pub(crate) fn start(times: &Arc<HoldTimes>) -> Self {
        Self {
            started: Instant::now(),
            times: Arc::clone(times),
        }
    }

    pub(crate) fn stop(&self) {
        self.times.record(self.started.elapsed());
    }
}
