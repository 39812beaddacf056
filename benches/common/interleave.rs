//! Measuring several variants against a baseline in interleaved rounds.
//!
//! Wall-clock figures on a small shared machine swing by tens of percent between runs.
//! Running every variant once per round, one after the other, and taking the median of the
//! per-round differences from the baseline cancels most of that drift: a slow moment slows
//! the baseline of the same round too.
#![allow(dead_code)]

use std::time::Instant;

/// One thing to time: `setup` builds a batch's inputs before the clock starts, `run`
/// consumes them while it runs.
pub struct Variant<'a> {
    pub name: &'static str,
    pub run: Box<dyn FnMut(usize) -> f64 + Send + 'a>,
}

impl<'a> Variant<'a> {
    /// A variant whose batch is built by `setup` (untimed) and consumed by `each`
    /// (timed); returns nanoseconds per item.
    pub fn new<T: 'a>(
        name: &'static str,
        mut setup: impl FnMut(usize) -> Vec<T> + Send + 'a,
        mut each: impl FnMut(T) + Send + 'a,
    ) -> Self {
        Variant {
            name,
            run: Box::new(move |batch| {
                let mut inputs = setup(batch);
                let start = Instant::now();
                for input in inputs.drain(..) {
                    each(input);
                }
                let elapsed = start.elapsed();
                drop(inputs);
                elapsed.as_nanos() as f64 / batch as f64
            }),
        }
    }
}

/// Runs `rounds` rounds of every variant (the first is the baseline) on this thread and
/// returns, per variant, the median per-item time and the median per-round difference
/// from the baseline, in nanoseconds.
///
/// Threads measuring together pass one `barrier`: each batch then starts on every thread
/// at once, so the threads really contend on the same variant.
pub fn interleave(
    variants: &mut [Variant<'_>],
    rounds: usize,
    batch: usize,
    barrier: Option<&std::sync::Barrier>,
) -> Vec<(f64, f64)> {
    let sync = || {
        if let Some(barrier) = barrier {
            barrier.wait();
        }
    };
    // One warm-up round, not recorded.
    for variant in variants.iter_mut() {
        sync();
        (variant.run)(batch);
    }
    let mut times = vec![Vec::with_capacity(rounds); variants.len()];
    for _ in 0..rounds {
        for (i, variant) in variants.iter_mut().enumerate() {
            sync();
            times[i].push((variant.run)(batch));
        }
    }
    let baseline = times[0].clone();
    times
        .iter()
        .map(|t| {
            let diffs: Vec<f64> = t.iter().zip(&baseline).map(|(v, b)| v - b).collect();
            (median(t.clone()), median(diffs))
        })
        .collect()
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A bench target's `main`: the interleaved table first, then the criterion benchmarks
/// (which take criterion's usual command-line arguments).
pub fn table_then_criterion(table: fn(), benches: fn(&mut criterion::Criterion)) {
    table();
    let mut criterion = criterion::Criterion::default().configure_from_args();
    benches(&mut criterion);
    criterion.final_summary();
}
