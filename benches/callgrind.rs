//! Instructions per request, for `valgrind --tool=callgrind`.
//!
//! Not a benchmark to run by itself: `.ci/callgrind.sh` runs it under callgrind once per
//! variant (`callgrind VARIANT REQUESTS [sdk]`) and counts only the instructions spent
//! inside `measured`, so building the requests and setting up the services are left out.
//! With `sdk`, every request also carries the headers an OpenAI SDK sends.

#[path = "common/peers.rs"]
mod peers;

use std::cell::RefCell;
use std::convert::Infallible;
use std::sync::Arc;

use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service};
use tower_tenant_tokens::{TenantSource, TenantTokenLayer, TenantTokenTracker, TokenWindow};

const VARIANTS: [&str; 9] = [
    "bare",
    "tower-tenant-tokens",
    "tower-tenant-tokens-handle",
    "tower-tenant-tokens-window",
    "tower-tenant-tokens-fn",
    "tower-tenant-tokens-priority",
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

thread_local! {
    /// The header maps of the requests served, freed once counting is over.
    static KEPT: RefCell<Vec<http::HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// The bare service, keeping each request's headers until counting is over: what freeing
/// them costs depends on the allocator's state, which differs between variants, and would
/// otherwise swing each variant's count by more than the layers cost.
async fn bare<B>(mut request: http::Request<B>) -> Result<peers::Reply, Infallible> {
    KEPT.with(|kept| {
        kept.borrow_mut()
            .push(std::mem::take(request.headers_mut()))
    });
    peers::bare(request).await
}

type MakeRequest = fn(&str, u64) -> http::Request<http_body_util::Empty<bytes::Bytes>>;

fn run<S>(mut service: S, (requests, make): (usize, MakeRequest))
where
    S: Service<http::Request<http_body_util::Empty<bytes::Bytes>>>,
    S::Error: std::fmt::Debug,
{
    KEPT.with(|kept| kept.borrow_mut().reserve(requests + 1));
    // `BENCH_TENANT` sets the tenant id (default `tenant-a`; OpenAI's org ids are 28 bytes).
    let tenant = std::env::var("BENCH_TENANT").unwrap_or_else(|_| "tenant-a".to_owned());
    // The tenant is known (warm) before counting starts, as in a steady gateway.
    measured(&mut service, vec![make(&tenant, 100)]);
    let batch = (0..requests).map(|_| make(&tenant, 100)).collect();
    measured(&mut service, batch);
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (variant, requests, make): (&str, usize, MakeRequest) = match args.as_slice() {
        [variant, requests] => (variant, requests.parse().expect("a count"), peers::request),
        [variant, requests, sdk] if sdk == "sdk" => (
            variant,
            requests.parse().expect("a count"),
            peers::sdk_request,
        ),
        [] => return println!("variants: {}", VARIANTS.join(" ")),
        _ => panic!("usage: callgrind VARIANT REQUESTS [sdk]"),
    };
    let requests = (requests, make);
    let tracker = Arc::new(TenantTokenTracker::new(u64::MAX));
    match variant {
        "bare" => run(tower::service_fn(bare), requests),
        "tower-tenant-tokens" => run(
            TenantTokenLayer::new(tracker).layer(tower::service_fn(bare)),
            requests,
        ),
        "tower-tenant-tokens-handle" => run(
            TenantTokenLayer::new(tracker)
                .reservation_handle(true)
                .layer(tower::service_fn(bare)),
            requests,
        ),
        // One window per minute, large enough never to refuse, small enough that every
        // charge shows in its bucket (and so is refilled, as in use).
        "tower-tenant-tokens-window" => run(
            TenantTokenLayer::new(tracker)
                .window(TokenWindow::per_minute(1_000_000_000_000))
                .layer(tower::service_fn(bare)),
            requests,
        ),
        // The tenant found by a function of the request's `Parts`, which takes the request
        // apart and puts it together again.
        "tower-tenant-tokens-fn" => run(
            TenantTokenLayer::new(tracker)
                .tenant_source(TenantSource::from_fn(|parts| {
                    let id = parts.headers.get("x-tenant-id")?.to_str().ok()?;
                    Some(id.to_owned())
                }))
                .layer(tower::service_fn(bare)),
            requests,
        ),
        // A priority class read from a header the requests do not carry.
        "tower-tenant-tokens-priority" => run(
            TenantTokenLayer::new(tracker)
                .priority_header(http::HeaderName::from_static("x-priority"))
                .layer(tower::service_fn(bare)),
            requests,
        ),
        "concurrency-limit" => run(
            ConcurrencyLimitLayer::new(1 << 20).layer(tower::service_fn(bare)),
            requests,
        ),
        "governor" => run(
            peers::governor_layer().layer(tower::service_fn(bare)),
            requests,
        ),
        "naive" => run(
            peers::NaiveLayer(peers::NaiveTracker::new(u64::MAX)).layer(tower::service_fn(bare)),
            requests,
        ),
        other => panic!("unknown variant {other}; one of {}", VARIANTS.join(" ")),
    }
}
