//! How soon a request waiting for a shared budget is admitted once capacity frees: from the
//! release of the reservation ahead of it to the waiting request's call of the inner
//! service.
//!
//! `cargo bench --bench wake` runs `WAKE_BENCH_ROUNDS` rounds (default 2,000) in one
//! process, in front of a `service_fn`, with 1 and then 8 other tenants also waiting:
//! each round one request holds the whole budget, the waiting ones queue behind it, and the
//! holder's response body is dropped (its release wakes the queue). The time printed is
//! from that drop to the inner service's call for the next request admitted. A waiting
//! request also rechecks every 50 ms on its own; the figures show the wake-up, not that
//! safety net.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Empty, Full};
use tower::{Layer, Service, ServiceExt};
use tower_tenant_tokens::body::RequestBody;
use tower_tenant_tokens::{SharedBudget, TenantTokenLayer, TenantTokenTracker};

fn main() {
    let rounds: usize = std::env::var("WAKE_BENCH_ROUNDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(2_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("\nfrom a release to the next waiting request's call, {rounds} rounds");
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "tenants waiting", "p50 µs", "p99 µs", "max µs"
    );
    for waiting in [1, 8] {
        let mut times = runtime.block_on(measure(rounds, waiting));
        times.sort_unstable();
        let at = |p: f64| times[((times.len() - 1) as f64 * p) as usize].as_micros();
        println!(
            "{:<28} {:>10} {:>10} {:>10}",
            waiting,
            at(0.5),
            at(0.99),
            times.last().unwrap().as_micros()
        );
    }
}

async fn measure(rounds: usize, waiting: usize) -> Vec<Duration> {
    let upstream = Arc::new(TenantTokenTracker::new(1_000));
    // Every call of the inner service, timed where it happens.
    let (calls, mut called) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let service = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(1_000_000)))
        .shared_budget(SharedBudget::new("upstream", upstream))
        .wait_for_capacity(Duration::from_secs(10))
        .layer(tower::service_fn(
            move |_: Request<RequestBody<Empty<Bytes>>>| {
                let _ = calls.send(Instant::now());
                // A body with data: the reservation is held until the response is dropped.
                async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"x")))) }
            },
        ));
    let request = |tenant: String, tokens: u64| {
        Request::post("/")
            .header("x-tenant-id", tenant)
            .header("x-token-estimate", tokens)
            .body(Empty::<Bytes>::new())
            .expect("request")
    };
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let holder = service
            .clone()
            .oneshot(request("holder".to_owned(), 1_000))
            .await
            .expect("admitted");
        let queued: Vec<_> = (0..waiting)
            .map(|t| {
                let mut service = service.clone();
                let request = request(format!("tenant-{t}"), 1_000);
                tokio::spawn(async move {
                    let ready = service.ready().await.expect("ready");
                    // Dropped at once: the next in line is admitted in turn.
                    drop(ready.call(request).await.expect("admitted"));
                })
            })
            .collect();
        // Let every waiting request reach the queue, then free the budget.
        tokio::time::sleep(Duration::from_millis(2)).await;
        while called.try_recv().is_ok() {} // the holder's own call
        let released = Instant::now();
        drop(holder);
        let at = called.recv().await.expect("a call");
        times.push(at - released);
        for request in queued {
            request.await.expect("waiter");
        }
    }
    times
}
