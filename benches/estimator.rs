//! `OpenAiEstimator` against parsing the same body into a `serde_json::Value`.
//!
//! ```text
//! cargo bench --bench estimator -- --warm-up-time 1 --measurement-time 2
//! ```
//!
//! First prints an interleaved ratio table (one line per body size): the estimator and a
//! plain `serde_json::from_slice::<Value>` are timed alternately on one thread, round
//! after round, and the median of the per-round ratios is reported, so that load from
//! other processes hits both sides alike. Each line has three cells: a compact body, the
//! same conversation as Python's `json.dumps` writes it (`\uXXXX` escapes), and several
//! distinct compact bodies in turn (one body timed over and over lets the branch
//! predictor learn it). Then the criterion groups run, one per size,
//! with four functions: `tower_tenant_tokens` (the estimator), `tower_tenant_tokens_model`
//! (the estimator also finding the body's model in the same pass, for per-model budgets;
//! through a hidden hook), `serde_json_value` (the parse alone) and `value_plus_reference`
//! (the parse plus walking the `Value` with the same rules, what a user would write
//! without the estimator).

#[path = "common/corpus.rs"]
mod corpus;
#[path = "common/reference.rs"]
mod reference;

#[cfg(feature = "openai")]
mod imp {
    use super::{corpus, reference};
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    use corpus::Style;
    use criterion::{Criterion, Throughput};
    use serde_json::Value;
    use tower_tenant_tokens::OpenAiEstimator;

    /// The sizes benchmarked: label, target bytes, seed, and how many distinct bodies the
    /// "rotating" column cycles through.
    const SIZES: [(&str, usize, u64, u64); 3] = [
        ("1KB", 1024, 11, 64),
        ("100KB", 100 * 1024, 12, 8),
        ("1MB", 1024 * 1024, 13, 4),
    ];

    /// Rounds of the interleaved comparison.
    const ROUNDS: usize = 31;

    /// How long one side of one round runs.
    const BATCH: Duration = Duration::from_millis(8);

    fn ours(estimator: &OpenAiEstimator, bodies: &[Vec<u8>]) {
        for body in bodies {
            black_box(estimator.estimate(black_box(body)).ok());
        }
    }

    fn value(bodies: &[Vec<u8>]) {
        for body in bodies {
            black_box(serde_json::from_slice::<Value>(black_box(body)).ok());
        }
    }

    fn median(values: &mut [f64]) -> f64 {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    }

    /// Runs `f` `iters` times; the elapsed time.
    fn batch(iters: u64, f: &mut dyn FnMut()) -> Duration {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        start.elapsed()
    }

    /// Iterations of `f` that take about `BATCH`.
    fn calibrate(f: &mut dyn FnMut()) -> u64 {
        let mut iters = 1;
        loop {
            let elapsed = batch(iters, f);
            if elapsed >= BATCH / 4 || iters >= 1 << 24 {
                let per_iter = elapsed.as_secs_f64() / iters as f64;
                return ((BATCH.as_secs_f64() / per_iter) as u64).max(1);
            }
            iters *= 2;
        }
    }

    struct Interleaved {
        ratio: f64,
        ratio_low: f64,
        ratio_high: f64,
        ours_ns: f64,
        value_ns: f64,
    }

    /// Times the estimator and the `Value` parse alternately, `ROUNDS` rounds; one iteration
    /// is a pass over all `bodies`, the times reported are per body.
    fn interleave(estimator: &OpenAiEstimator, bodies: &[Vec<u8>]) -> Interleaved {
        let mut run_ours = || ours(estimator, bodies);
        let mut run_value = || value(bodies);
        // Warm up both, then size each side's batch to about the same wall time.
        calibrate(&mut run_ours);
        calibrate(&mut run_value);
        let ours_iters = calibrate(&mut run_ours);
        let value_iters = calibrate(&mut run_value);

        let mut ratios = Vec::with_capacity(ROUNDS);
        let mut ours_ns = Vec::with_capacity(ROUNDS);
        let mut value_ns = Vec::with_capacity(ROUNDS);
        for round in 0..ROUNDS {
            // Alternate which side goes first so that a drift in load favours neither.
            let (o, v) = if round % 2 == 0 {
                let o = batch(ours_iters, &mut run_ours);
                (o, batch(value_iters, &mut run_value))
            } else {
                let v = batch(value_iters, &mut run_value);
                (batch(ours_iters, &mut run_ours), v)
            };
            let o = o.as_secs_f64() * 1e9 / (ours_iters as f64 * bodies.len() as f64);
            let v = v.as_secs_f64() * 1e9 / (value_iters as f64 * bodies.len() as f64);
            ours_ns.push(o);
            value_ns.push(v);
            ratios.push(v / o);
        }
        let ratio = median(&mut ratios);
        Interleaved {
            ratio,
            ratio_low: ratios[ROUNDS / 4],
            ratio_high: ratios[ROUNDS - 1 - ROUNDS / 4],
            ours_ns: median(&mut ours_ns),
            value_ns: median(&mut value_ns),
        }
    }

    fn human(ns: f64) -> String {
        if ns >= 1e6 {
            format!("{:.2} ms", ns / 1e6)
        } else if ns >= 1e3 {
            format!("{:.2} µs", ns / 1e3)
        } else {
            format!("{ns:.0} ns")
        }
    }

    /// One line per size: the median of per-round ratios (Value parse time / estimator time)
    /// for a compact body (raw UTF-8), for the same conversation written the way Python's
    /// `json.dumps` writes it (every non-ASCII character a `\u` escape), and for several
    /// distinct compact bodies taken in turn. Timing one body over and over lets the CPU's
    /// branch predictor learn it (up to ~100 KB of text), which flatters whichever side
    /// branches more per byte; the rotating column is closer to live traffic.
    fn ratio_table() {
        let estimator = OpenAiEstimator::new();
        println!(
            "interleaved, {ROUNDS} rounds, median of per-round ratios [interquartile range]; \
             ratio = serde_json::Value parse time / OpenAiEstimator::estimate time"
        );
        for (label, size, seed, distinct) in SIZES {
            let mut cells = Vec::new();
            for (name, style) in [("compact", Style::Compact), ("python", Style::Python)] {
                let body = corpus::chat_body_styled(size, seed, style);
                let len = body.len();
                let r = interleave(&estimator, &[body]);
                cells.push(format!(
                    "{name} {len} B: {:.2}x [{:.2}-{:.2}] ({} vs {}, {:.0} MB/s)",
                    r.ratio,
                    r.ratio_low,
                    r.ratio_high,
                    human(r.value_ns),
                    human(r.ours_ns),
                    len as f64 / r.ours_ns * 1e3,
                ));
            }
            let bodies: Vec<Vec<u8>> = (0..distinct)
                .map(|i| corpus::chat_body_styled(size, seed + 1000 * i, Style::Compact))
                .collect();
            let r = interleave(&estimator, &bodies);
            cells.push(format!(
                "{distinct} compact rotating: {:.2}x [{:.2}-{:.2}] ({} vs {})",
                r.ratio,
                r.ratio_low,
                r.ratio_high,
                human(r.value_ns),
                human(r.ours_ns),
            ));
            println!("ratio {label:>5}: {}", cells.join(" | "));
        }
        println!();
    }

    fn criterion_groups(c: &mut Criterion) {
        let estimator = OpenAiEstimator::new();
        for (label, size, seed, _) in SIZES {
            let body = corpus::chat_body_styled(size, seed, Style::Compact);
            let mut group = c.benchmark_group(format!("estimator/{label}"));
            group.throughput(Throughput::Bytes(body.len() as u64));
            if size >= 1024 * 1024 {
                group.sample_size(30);
            }
            group.bench_function("tower_tenant_tokens", |b| {
                b.iter(|| estimator.estimate(black_box(&body)).ok())
            });
            group.bench_function("tower_tenant_tokens_model", |b| {
                b.iter(|| estimator.__estimate_parts_and_model(black_box(&body)).ok())
            });
            group.bench_function("serde_json_value", |b| {
                b.iter(|| serde_json::from_slice::<Value>(black_box(&body)).ok())
            });
            group.bench_function("value_plus_reference", |b| {
                b.iter(|| reference::reference_estimate(black_box(&body), 1024, 4))
            });
            group.finish();
        }
    }

    pub fn main() {
        // The table is for `cargo bench` only: not for `cargo test --benches` (which runs
        // each benchmark once as a test), `--list`, or profiling runs.
        let args: Vec<String> = std::env::args().collect();
        let has = |flag: &str| args.iter().any(|a| a == flag);
        if has("--bench") && !has("--test") && !has("--list") && !has("--profile-time") {
            // The generator and the estimator must agree with the reference on what they time.
            let estimator = OpenAiEstimator::new();
            for (_, size, seed, _) in SIZES {
                let body = corpus::chat_body_styled(size, seed, Style::Compact);
                assert_eq!(
                    estimator.estimate(&body).ok(),
                    reference::reference_estimate(&body, 1024, 4)
                );
            }
            ratio_table();
        }

        let mut c = Criterion::default().configure_from_args();
        criterion_groups(&mut c);
        c.final_summary();
    }
}

fn main() {
    #[cfg(feature = "openai")]
    imp::main();
    #[cfg(not(feature = "openai"))]
    eprintln!("the estimator bench needs the `openai` feature");
}
