//! The layer's cost per request over a bare `service_fn`, next to its peers.
//!
//! `cargo bench --bench layer` first prints a table measured in interleaved rounds (the
//! figures to compare: every variant's overhead is a median of per-round differences from
//! the bare service, run on one thread, then on two threads with distinct and with the
//! same tenant), then runs the same variants as criterion benchmarks.
//!
//! With `LAYER_BENCH_HEADERS=sdk` every request also carries the 17 other headers an OpenAI
//! SDK sends (the layer then looks its two headers up rather than walking the map).

#[path = "common/interleave.rs"]
mod interleave;
#[path = "common/peers.rs"]
mod peers;

use std::sync::{Arc, Barrier};

use bytes::Bytes;
use criterion::Criterion;
use http::Request;
use http_body_util::Empty;
use interleave::{interleave, Variant};
use peers::{bare, governor_layer, request, run_one, sdk_request, NaiveLayer, NaiveTracker};
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service};
use tower_tenant_tokens::{TenantTokenLayer, TenantTokenTracker, TokenWindow};

const ROUNDS: usize = 41;
const BATCH: usize = 2_000;
const TOKENS: u64 = 100;

type Req = Request<Empty<Bytes>>;

/// The services under test, each shared by every thread that clones it.
#[derive(Clone)]
struct Services {
    layer: TenantTokenLayer,
    layer_handle: TenantTokenLayer,
    layer_window: TenantTokenLayer,
    concurrency: ConcurrencyLimitLayer,
    governor: peers::GovernorLayerType,
    naive: NaiveLayer,
}

impl Services {
    fn new() -> Self {
        let tracker = Arc::new(TenantTokenTracker::new(u64::MAX));
        let layer = TenantTokenLayer::new(tracker);
        Self {
            layer_handle: layer.clone().reservation_handle(true),
            // One window per minute, large enough never to refuse.
            layer_window: layer
                .clone()
                .window(TokenWindow::per_minute(1_000_000_000_000)),
            layer,
            concurrency: ConcurrencyLimitLayer::new(1 << 20),
            governor: governor_layer(),
            naive: NaiveLayer(NaiveTracker::new(u64::MAX)),
        }
    }

    /// Every variant, the bare baseline first, charging `tenant`.
    fn variants(&self, tenant: &str) -> Vec<Variant<'static>> {
        vec![
            variant("bare service_fn", tower::service_fn(bare), tenant),
            variant(
                "tower-tenant-tokens",
                self.layer.layer(tower::service_fn(bare)),
                tenant,
            ),
            variant(
                "tower-tenant-tokens, with handle",
                self.layer_handle.layer(tower::service_fn(bare)),
                tenant,
            ),
            variant(
                "tower-tenant-tokens, a window",
                self.layer_window.layer(tower::service_fn(bare)),
                tenant,
            ),
            variant(
                "tower ConcurrencyLimit",
                self.concurrency.layer(tower::service_fn(bare)),
                tenant,
            ),
            variant(
                "tower_governor (keyed)",
                self.governor.layer(tower::service_fn(bare)),
                tenant,
            ),
            variant(
                "naive RwLock<HashMap>",
                self.naive.layer(tower::service_fn(bare)),
                tenant,
            ),
        ]
    }
}

fn variant<S>(name: &'static str, mut service: S, tenant: &str) -> Variant<'static>
where
    S: Service<Req> + Send + 'static,
    S::Error: std::fmt::Debug,
{
    let tenant = tenant.to_owned();
    let make = match std::env::var("LAYER_BENCH_HEADERS").as_deref() {
        Ok("sdk") => sdk_request,
        _ => request,
    };
    Variant::new(
        name,
        move |n| (0..n).map(|_| make(&tenant, TOKENS)).collect(),
        move |req| run_one(&mut service, req),
    )
}

/// Runs the interleaved rounds on `threads` threads at once; returns each variant's
/// overhead over bare (ns), averaged over the threads.
fn overheads(services: &Services, tenants: &[&str]) -> (Vec<&'static str>, Vec<f64>) {
    let barrier = Arc::new(Barrier::new(tenants.len()));
    let results: Vec<Vec<(f64, f64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = tenants
            .iter()
            .map(|tenant| {
                let mut variants = services.variants(tenant);
                let barrier = Arc::clone(&barrier);
                scope.spawn(move || interleave(&mut variants, ROUNDS, BATCH, Some(&barrier)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let names = services.variants("x").iter().map(|v| v.name).collect();
    let count = results[0].len();
    let mean = (0..count)
        .map(|i| results.iter().map(|r| r[i].1).sum::<f64>() / results.len() as f64)
        .collect();
    (names, mean)
}

fn table() {
    let services = Services::new();
    let (names, one) = overheads(&services, &["tenant-a"]);
    let (_, distinct) = overheads(&services, &["tenant-a", "tenant-b"]);
    let (_, same) = overheads(&services, &["tenant-a", "tenant-a"]);
    let governor = names
        .iter()
        .position(|n| n.starts_with("tower_governor"))
        .unwrap();
    let sdk = std::env::var("LAYER_BENCH_HEADERS").is_ok_and(|h| h == "sdk");
    println!(
        "\nlayer overhead over a bare service_fn, ns per request{}",
        if sdk {
            ", requests with SDK headers"
        } else {
            ""
        }
    );
    println!("(median of per-round differences, {ROUNDS} rounds of {BATCH} requests)\n");
    println!(
        "{:<32} {:>10} {:>18} {:>15} {:>13}",
        "variant", "1 thread", "2 thr. distinct", "2 thr. same", "÷ governor"
    );
    for (i, name) in names.iter().enumerate().skip(1) {
        println!(
            "{:<32} {:>10.1} {:>18.1} {:>15.1} {:>13.2}",
            name,
            one[i],
            distinct[i],
            same[i],
            one[i] / one[governor]
        );
    }
    println!();
}

fn criterion_benches(c: &mut Criterion) {
    let services = Services::new();
    let mut group = c.benchmark_group("layer");
    for mut variant in services.variants("tenant-a") {
        group.bench_function(variant.name, |b| {
            b.iter_custom(|iters| {
                let per_item = (variant.run)(iters as usize);
                std::time::Duration::from_nanos((per_item * iters as f64) as u64)
            })
        });
    }
    group.finish();
}

fn main() {
    interleave::table_then_criterion(table, criterion_benches);
}
