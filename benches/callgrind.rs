//! Instructions per request, for `valgrind --tool=callgrind`.
//!
//! Not a benchmark to run by itself: `.ci/callgrind.sh` runs it under callgrind once per
//! variant (`callgrind VARIANT REQUESTS`) and counts only the instructions spent inside
//! `measured`, so building the requests and setting up the services are left out.

#[path = "common/peers.rs"]
mod peers;

use std::sync::Arc;

use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service};
use tower_tenant_tokens::{TenantTokenLayer, TenantTokenTracker};

const VARIANTS: [&str; 6] = [
    "bare",
    "tower-tenant-tokens",
    "tower-tenant-tokens-handle",
    "concurrency-limit",
    "governor",
    "naive",
];

/// The only code callgrind counts.
#[inline(never)]
fn measured<S, B>(service: &mut S, requests: Vec<http::Request<B>>)
where
    S: Service<http::Request<B>>,
    S::Error: std::fmt::Debug,
{
    for request in requests {
        peers::run_one(service, request);
    }
}

fn run<S>(mut service: S, requests: usize)
where
    S: Service<http::Request<http_body_util::Empty<bytes::Bytes>>>,
    S::Error: std::fmt::Debug,
{
    // The tenant is known (warm) before counting starts, as in a steady gateway.
    measured(&mut service, vec![peers::request("tenant-a", 100)]);
    let batch = (0..requests)
        .map(|_| peers::request("tenant-a", 100))
        .collect();
    measured(&mut service, batch);
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (variant, requests) = match args.as_slice() {
        [variant, requests] => (variant.as_str(), requests.parse().expect("a count")),
        [] => return println!("variants: {}", VARIANTS.join(" ")),
        _ => panic!("usage: callgrind VARIANT REQUESTS"),
    };
    let tracker = Arc::new(TenantTokenTracker::new(u64::MAX));
    match variant {
        "bare" => run(tower::service_fn(peers::bare), requests),
        "tower-tenant-tokens" => run(
            TenantTokenLayer::new(tracker).layer(tower::service_fn(peers::bare)),
            requests,
        ),
        "tower-tenant-tokens-handle" => run(
            TenantTokenLayer::new(tracker)
                .reservation_handle(true)
                .layer(tower::service_fn(peers::bare)),
            requests,
        ),
        "concurrency-limit" => run(
            ConcurrencyLimitLayer::new(1 << 20).layer(tower::service_fn(peers::bare)),
            requests,
        ),
        "governor" => run(
            peers::governor_layer().layer(tower::service_fn(peers::bare)),
            requests,
        ),
        "naive" => run(
            peers::NaiveLayer(peers::NaiveTracker::new(u64::MAX))
                .layer(tower::service_fn(peers::bare)),
            requests,
        ),
        other => panic!("unknown variant {other}; one of {}", VARIANTS.join(" ")),
    }
}
