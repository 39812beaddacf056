//! The ledger alone: a reserve + release pair, next to the naive tracker.
//!
//! `cargo bench --bench tracker` prints a table measured in interleaved rounds (ns per
//! pair; on two threads both run the same variant at the same moment), then runs the same
//! cases as criterion benchmarks.

#[path = "common/interleave.rs"]
mod interleave;
#[path = "common/peers.rs"]
mod peers;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::Criterion;
use interleave::{interleave, Variant};
use peers::NaiveTracker;
use tower_tenant_tokens::TenantTokenTracker;

const ROUNDS: usize = 41;
const BATCH: usize = 5_000;
const LIVE_TENANTS: usize = 100_000;

/// The two trackers, shared by every thread.
#[derive(Clone)]
struct Trackers {
    ours: Arc<TenantTokenTracker>,
    naive: Arc<NaiveTracker>,
}

impl Trackers {
    fn new() -> Self {
        Self {
            ours: Arc::new(
                TenantTokenTracker::builder(u64::MAX)
                    .max_idle_tenants(2 * LIVE_TENANTS)
                    .build(),
            ),
            naive: NaiveTracker::new(u64::MAX),
        }
    }

    /// A pair for each tenant of `tenants` in turn.
    fn variants(&self, tenants: Vec<String>) -> Vec<Variant<'static>> {
        let (ours, naive) = (Arc::clone(&self.ours), Arc::clone(&self.naive));
        let (a, b) = (tenants.clone(), tenants);
        let mut i = 0;
        let mut j = 0;
        vec![
            Variant::new(
                "nothing (loop only)",
                |n| vec![(); n],
                |()| {
                    std::hint::black_box(());
                },
            ),
            Variant::new(
                "tower-tenant-tokens",
                |n| vec![(); n],
                move |()| {
                    i = (i + 1) % a.len();
                    drop(std::hint::black_box(ours.reserve_id(&a[i], 1)));
                },
            ),
            Variant::new(
                "naive RwLock<HashMap>",
                |n| vec![(); n],
                move |()| {
                    j = (j + 1) % b.len();
                    drop(std::hint::black_box(naive.reserve(&b[j], 1)));
                },
            ),
        ]
    }
}

/// Per-variant ns per pair, averaged over the threads (one tenant list per thread).
fn pairs(trackers: &Trackers, tenants: Vec<Vec<String>>) -> Vec<f64> {
    let barrier = Barrier::new(tenants.len());
    let results: Vec<Vec<(f64, f64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = tenants
            .into_iter()
            .map(|list| {
                let mut variants = trackers.variants(list);
                let barrier = &barrier;
                scope.spawn(move || interleave(&mut variants, ROUNDS, BATCH, Some(barrier)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (0..results[0].len())
        .map(|i| results.iter().map(|r| r[i].1).sum::<f64>() / results.len() as f64)
        .collect()
}

fn one(tenant: &str) -> Vec<String> {
    vec![tenant.to_owned()]
}

fn table() {
    let trackers = Trackers::new();
    let single = pairs(&trackers, vec![one("acme")]);
    let distinct = pairs(&trackers, vec![one("acme"), one("globex")]);
    let same = pairs(&trackers, vec![one("acme"), one("acme")]);

    // 100k tenants with a reservation each, held throughout; pairs on random ones of them.
    let ids: Vec<String> = (0..LIVE_TENANTS)
        .map(|i| format!("tenant-{i:06}"))
        .collect();
    let _held_ours: Vec<_> = ids
        .iter()
        .map(|id| trackers.ours.reserve_id(id, 1))
        .collect();
    let _held_naive: Vec<_> = ids.iter().map(|id| trackers.naive.reserve(id, 1)).collect();
    let mut shuffled = ids.clone();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for i in (1..shuffled.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        shuffled.swap(i, (state % (i as u64 + 1)) as usize);
    }
    let live = pairs(&trackers, vec![shuffled]);

    println!("\ntracker: one reserve + release pair, ns (median of per-round differences");
    println!("from an empty loop, {ROUNDS} rounds of {BATCH} pairs)\n");
    println!(
        "{:<24} {:>9} {:>17} {:>14} {:>18}",
        "variant", "1 thread", "2 thr. distinct", "2 thr. same", "100k live tenants"
    );
    for (i, name) in ["tower-tenant-tokens", "naive RwLock<HashMap>"]
        .iter()
        .enumerate()
    {
        let i = i + 1;
        println!(
            "{:<24} {:>9.1} {:>17.1} {:>14.1} {:>18.1}",
            name, single[i], distinct[i], same[i], live[i]
        );
    }
    let ratio = |v: &[f64]| v[2] / v[1];
    println!(
        "{:<24} {:>8.1}× {:>16.1}× {:>13.1}× {:>17.1}×\n",
        "naive ÷ ours",
        ratio(&single),
        ratio(&distinct),
        ratio(&same),
        ratio(&live)
    );
}

/// Runs `pair` `iters` times on this thread and, at the same moment, on a second one.
fn two_threads(iters: u64, pair: impl Fn(usize) + Sync) -> Duration {
    let barrier = Barrier::new(2);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| {
            barrier.wait();
            for _ in 0..iters {
                pair(1);
            }
        });
        barrier.wait();
        let start = Instant::now();
        for _ in 0..iters {
            pair(0);
        }
        let elapsed = start.elapsed();
        other.join().unwrap();
        elapsed
    })
}

fn criterion_benches(c: &mut Criterion) {
    let trackers = Trackers::new();
    let (ours, naive) = (&trackers.ours, &trackers.naive);
    let mut group = c.benchmark_group("tracker");
    group.bench_function("1 thread/tower-tenant-tokens", |b| {
        b.iter(|| drop(ours.reserve_id("acme", 1)))
    });
    group.bench_function("1 thread/naive", |b| {
        b.iter(|| drop(naive.reserve("acme", 1)))
    });
    let tenants = ["acme", "globex"];
    for (label, distinct) in [("distinct", true), ("same", false)] {
        let tenant = move |thread: usize| tenants[if distinct { thread } else { 0 }];
        group.bench_function(format!("2 threads {label}/tower-tenant-tokens"), |b| {
            b.iter_custom(|iters| two_threads(iters, |t| drop(ours.reserve_id(tenant(t), 1))))
        });
        group.bench_function(format!("2 threads {label}/naive"), |b| {
            b.iter_custom(|iters| two_threads(iters, |t| drop(naive.reserve(tenant(t), 1))))
        });
    }
    group.finish();
}

fn main() {
    interleave::table_then_criterion(table, criterion_benches);
}
