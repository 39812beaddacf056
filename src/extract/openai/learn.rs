//! Learning the output allowance of requests that set no output limit from what such
//! requests really produced, per tenant and model.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

/// How many recent outputs each (tenant, model) keeps.
const WINDOW: usize = 32;

/// Learned output allowances for requests that set no `max_tokens`-like limit, per
/// (tenant, model), for [`TenantTokenLayer::adaptive_output`](crate::TenantTokenLayer::adaptive_output).
///
/// Each (tenant, model) keeps the output of its last 32 such requests that ran to the
/// end, as the usage reader found it (the reported output, else the streamed text
/// counted). Its allowance is a high quantile of those (the second largest of 32, about
/// p95) plus a quarter, within [`floor`](Self::floor) and [`ceiling`](Self::ceiling);
/// until [`warmup`](Self::warmup) outputs are known it is the estimator's fixed default.
/// Old outputs leave the window as new ones come, so an allowance follows a change in a
/// tenant's traffic within a window's length of requests, up at once (a few larger outputs
/// pass the quantile) and down once the larger outputs have left. An allowance that proves too
/// small costs nothing in safety: the usage reader grows a stream's reservation as it
/// produces more.
///
/// Memory is bounded: at most [`max_keys`](Self::max_keys) (tenant, model) pairs are kept
/// (a fixed window each, plus the names); a new pair past that forgets the least recently
/// used quarter at once, so a spray of new pairs costs one pass per quarter of the bound.
///
/// ```
/// use std::sync::Arc;
/// use tower_tenant_tokens::{AdaptiveOutput, OpenAiEstimator, TenantTokenLayer, TenantTokenTracker};
///
/// let learned = Arc::new(AdaptiveOutput::new().floor(32));
/// let layer = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(4_096)))
///     .estimator(OpenAiEstimator::new())
///     .adaptive_output(learned.clone());
/// assert!(learned.snapshot().is_empty());
/// ```
pub struct AdaptiveOutput {
    floor: u64,
    ceiling: u64,
    warmup: usize,
    max_keys: usize,
    cap_explicit: bool,
    state: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    /// Counts uses, for eviction.
    clock: u64,
    /// Tenant, then model: looked up by borrowed names, so a lookup allocates nothing.
    keys: HashMap<Box<str>, HashMap<Box<str>, Window>>,
    /// Pairs in `keys`.
    pairs: usize,
}

/// The recent outputs of one (tenant, model).
struct Window {
    outputs: [u32; WINDOW],
    /// Outputs recorded so far (the next slot is `seen % WINDOW`).
    seen: u64,
    used: u64,
}

impl Window {
    fn len(&self) -> usize {
        usize::try_from(self.seen).map_or(WINDOW, |seen| seen.min(WINDOW))
    }

    /// The second largest output in the window (the largest while fewer than 20 are
    /// known): about the 95th percentile of 32.
    fn quantile(&self) -> u64 {
        let outputs = &self.outputs[..self.len()];
        let (mut first, mut second) = (0, 0);
        for &output in outputs {
            if output > first {
                second = first;
                first = output;
            } else if output > second {
                second = output;
            }
        }
        u64::from(if outputs.len() >= 20 { second } else { first })
    }
}

/// One learned allowance, as [`AdaptiveOutput::snapshot`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LearnedOutput {
    /// The tenant.
    pub tenant: String,
    /// The model, as the request body named it (empty when it named none).
    pub model: String,
    /// Outputs recorded so far (only the last 32 count).
    pub samples: u64,
    /// The allowance a request without an output limit gets now; `None` while fewer than
    /// the warm-up number of outputs are known (the estimator's default applies).
    pub allowance: Option<u64>,
}

impl Default for AdaptiveOutput {
    fn default() -> Self {
        Self::new()
    }
}

impl AdaptiveOutput {
    /// Learned allowances with the defaults: floor 64 tokens, ceiling 32,768, 8 outputs
    /// before the learned allowance is used, 10,000 (tenant, model) pairs at most.
    pub fn new() -> Self {
        Self {
            floor: 64,
            ceiling: 32_768,
            warmup: 8,
            max_keys: 10_000,
            cap_explicit: false,
            state: Mutex::new(Table::default()),
        }
    }

    /// The smallest allowance learned (default 64).
    pub fn floor(mut self, tokens: u64) -> Self {
        self.floor = tokens;
        self
    }

    /// The largest allowance learned (default 32,768).
    pub fn ceiling(mut self, tokens: u64) -> Self {
        self.ceiling = tokens;
        self
    }

    /// How many outputs a (tenant, model) needs before its learned allowance is used
    /// (default 8, at most 32).
    pub fn warmup(mut self, outputs: usize) -> Self {
        self.warmup = outputs.min(WINDOW);
        self
    }

    /// How many (tenant, model) pairs are kept at most (default 10,000, at least 1).
    pub fn max_keys(mut self, keys: usize) -> Self {
        self.max_keys = keys.max(1);
        self
    }

    /// Whether a request's explicit output limit (`max_tokens` and the like) is also
    /// capped at the learned allowance (default: no). For operators whose clients set
    /// limits far above what they use (a `max_tokens` of the model's maximum "to be
    /// safe"): the reservation is the smaller of the two once enough outputs are known,
    /// and the usage reader grows a response that produces more, as it produces it. With
    /// it on, the outputs of requests with a limit are learned from too. The limit the
    /// upstream enforces is the request's, unchanged: only the reservation is smaller.
    pub fn cap_explicit_limits(mut self, enabled: bool) -> Self {
        self.cap_explicit = enabled;
        self
    }

    pub(crate) fn caps_explicit_limits(&self) -> bool {
        self.cap_explicit
    }

    /// The allowance learned for `tenant`'s requests to `model` without an output limit;
    /// `None` until enough outputs are known.
    pub fn allowance(&self, tenant: &str, model: &str) -> Option<u64> {
        let mut table = self.lock();
        let table = &mut *table;
        table.clock += 1;
        let window = table.keys.get_mut(tenant)?.get_mut(model)?;
        window.used = table.clock;
        self.allowance_of(window)
    }

    fn allowance_of(&self, window: &Window) -> Option<u64> {
        if window.len() < self.warmup.max(1) {
            return None;
        }
        let quantile = window.quantile();
        let allowance = quantile.saturating_add(quantile.div_ceil(4));
        Some(allowance.max(self.floor).min(self.ceiling.max(self.floor)))
    }

    /// Records the output of one request by `tenant` to `model` (one that set no limit, or
    /// any with [`cap_explicit_limits`](Self::cap_explicit_limits)); returns
    /// the allowance now learned, if any.
    pub(crate) fn record(&self, tenant: &str, model: &str, output: u64) -> Option<u64> {
        let mut table = self.lock();
        let table = &mut *table;
        table.clock += 1;
        let clock = table.clock;
        let known = table
            .keys
            .get(tenant)
            .is_some_and(|models| models.contains_key(model));
        if !known && table.pairs >= self.max_keys {
            // Full: forget the least recently used quarter at once, so that a stream of
            // new pairs costs one pass per quarter of the bound, not one per request.
            let windows = table.keys.values().flat_map(HashMap::values);
            let mut used: Vec<u64> = windows.map(|window| window.used).collect();
            let cut = (used.len() / 4).max(1);
            let (_, threshold, _) = used.select_nth_unstable(cut - 1);
            let threshold = *threshold;
            for models in table.keys.values_mut() {
                models.retain(|_, window| window.used > threshold);
            }
            table.keys.retain(|_, models| !models.is_empty());
            table.pairs = table.keys.values().map(HashMap::len).sum();
        }
        if !known {
            table.pairs += 1;
        }
        let models = match table.keys.get_mut(tenant) {
            Some(models) => models,
            None => table.keys.entry(Box::from(tenant)).or_default(),
        };
        let window = match models.get_mut(model) {
            Some(window) => window,
            None => models.entry(Box::from(model)).or_insert(Window {
                outputs: [0; WINDOW],
                seen: 0,
                used: clock,
            }),
        };
        let slot = usize::try_from(window.seen % WINDOW as u64).unwrap_or(0);
        window.outputs[slot] = u32::try_from(output).unwrap_or(u32::MAX);
        window.seen += 1;
        window.used = clock;
        self.allowance_of(window)
    }

    /// Every (tenant, model) known, with its allowance.
    pub fn snapshot(&self) -> Vec<LearnedOutput> {
        let table = self.lock();
        let mut learned: Vec<_> = table
            .keys
            .iter()
            .flat_map(|(tenant, models)| models.iter().map(move |entry| (tenant, entry)))
            .map(|(tenant, (model, window))| LearnedOutput {
                tenant: tenant.to_string(),
                model: model.to_string(),
                samples: window.seen,
                allowance: self.allowance_of(window),
            })
            .collect();
        learned.sort_by(|a, b| (&a.tenant, &a.model).cmp(&(&b.tenant, &b.model)));
        learned
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl fmt::Debug for AdaptiveOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveOutput")
            .field("floor", &self.floor)
            .field("ceiling", &self.ceiling)
            .field("warmup", &self.warmup)
            .field("max_keys", &self.max_keys)
            .field("cap_explicit_limits", &self.cap_explicit)
            .field("keys", &self.lock().pairs)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_until_warm_then_a_high_quantile_within_bounds() {
        let learned = AdaptiveOutput::new().warmup(4).floor(10).ceiling(1_000);
        for _ in 0..3 {
            learned.record("t", "m", 40);
        }
        assert_eq!(learned.allowance("t", "m"), None);
        learned.record("t", "m", 40);
        assert_eq!(learned.allowance("t", "m"), Some(50));
        learned.record("t", "m", 5_000);
        assert_eq!(learned.allowance("t", "m"), Some(1_000));
        assert_eq!(learned.allowance("t", "other"), None);
    }

    #[test]
    fn a_full_table_forgets_its_least_recently_used_quarter() {
        let learned = AdaptiveOutput::new().max_keys(8);
        for tenant in 0..8 {
            learned.record(&format!("t{tenant}"), "m", 1);
        }
        learned.record("t0", "m", 1); // t0 used again: t1 and t2 are the oldest now
        learned.record("t8", "m", 1);
        let kept: Vec<_> = learned.snapshot().into_iter().map(|l| l.tenant).collect();
        assert_eq!(kept, ["t0", "t3", "t4", "t5", "t6", "t7", "t8"]);
        for tenant in 9..40 {
            learned.record(&format!("t{tenant}"), "other", 1);
            assert!(learned.snapshot().len() <= 8);
        }
    }

    #[test]
    fn follows_a_change_and_forgets_the_least_used_pair() {
        let learned = AdaptiveOutput::new().max_keys(2);
        for _ in 0..32 {
            learned.record("t", "m", 2_000);
        }
        for _ in 0..31 {
            learned.record("t", "m", 16);
        }
        assert_eq!(learned.allowance("t", "m"), Some(64));
        learned.record("u", "m", 1);
        learned.allowance("t", "m");
        learned.record("v", "m", 1);
        let kept: Vec<_> = learned.snapshot().into_iter().map(|l| l.tenant).collect();
        assert_eq!(kept, ["t", "v"]);
    }
}
