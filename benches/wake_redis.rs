//! How soon a request waiting on one replica for a shared budget in Redis is admitted once
//! another replica releases: from the release of the reservation ahead of it to the waiting
//! request's call of the inner service.
//!
//! `cargo bench --features redis --bench wake_redis` starts its own `redis-server` on a
//! free loopback port and runs `WAKE_BENCH_ROUNDS` rounds (default 500) on two replicas,
//! each its own layer and budget tracker on that Redis, in front of a `service_fn`, with 1
//! and then 8 tenants waiting on the second replica: each round a request on the first
//! replica holds the whole budget, the waiting ones queue behind it, and the holder's
//! response body is dropped. The time printed is from that drop to the inner service's call
//! on the second replica: the release in Redis, its message over pub/sub, the wake-up, and
//! the waiting request's admission in its turn. A waiting request also looks again on its
//! own now and then; the figures show the wake-up, not that safety net.

#[path = "../tests/common/redis_server.rs"]
#[allow(dead_code)] // the tests' helper; the bench needs only part of it
mod redis_server;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Empty, Full};
use redis_server::RedisServer;
use tower::{Layer, Service, ServiceExt};
use tower_tenant_tokens::body::RequestBody;
use tower_tenant_tokens::redis::RedisTokenTracker;
use tower_tenant_tokens::{SharedBudget, TenantTokenLayer, TenantTokenTracker};

fn main() {
    let rounds: usize = std::env::var("WAKE_BENCH_ROUNDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(500);
    let Some(redis) = RedisServer::start("the wake_redis bench") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("\nfrom a release on one replica to the next waiting request's call on another");
    println!("(a budget in Redis), {rounds} rounds");
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "tenants waiting", "p50 µs", "p99 µs", "max µs"
    );
    let times = runtime.block_on(measure(&redis.url(), rounds, &[1, 8]));
    for (waiting, mut times) in [1, 8].into_iter().zip(times) {
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

/// The rounds with each count of tenants `waiting`, on the same two replicas (their
/// trackers live as long as the bench, as a gateway's do).
async fn measure(url: &str, rounds: usize, waiting: &[usize]) -> Vec<Vec<Duration>> {
    // A replica: its own tenants' tracker and budget tracker, every call of the inner
    // service sent on `calls` with its time.
    let replica = |calls: tokio::sync::mpsc::UnboundedSender<Instant>| {
        let upstream = RedisTokenTracker::builder(1_000)
            .key_prefix("budget:")
            .connect(url)
            .expect("url");
        TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(1_000_000)))
            .shared_budget(SharedBudget::new("upstream", upstream))
            .wait_for_capacity(Duration::from_secs(10))
            .layer(tower::service_fn(
                move |_: Request<RequestBody<Empty<Bytes>>>| {
                    let _ = calls.send(Instant::now());
                    // A body with data: the reservation is held until the response is
                    // dropped.
                    async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"x"))))
                    }
                },
            ))
    };
    let (holder_calls, _holder_called) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let (calls, mut called) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let (one, two) = (replica(holder_calls), replica(calls));
    let request = |tenant: String, tokens: u64| {
        Request::post("/")
            .header("x-tenant-id", tenant)
            .header("x-token-estimate", tokens)
            .body(Empty::<Bytes>::new())
            .expect("request")
    };
    let mut all = Vec::new();
    for &waiting in waiting {
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let holder = one
                .clone()
                .oneshot(request("holder".to_owned(), 1_000))
                .await
                .expect("admitted");
            let queued: Vec<_> = (0..waiting)
                .map(|t| {
                    let mut service = two.clone();
                    let request = request(format!("tenant-{t}"), 1_000);
                    tokio::spawn(async move {
                        let ready = service.ready().await.expect("ready");
                        // Dropped at once: the next in line is admitted in turn.
                        drop(ready.call(request).await.expect("admitted"));
                    })
                })
                .collect();
            // Let every waiting request take its ticket in Redis, then free the budget.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let released = Instant::now();
            drop(holder);
            // Every waiting request gives up after its wait: none called means none admitted.
            let at = tokio::time::timeout(Duration::from_secs(15), called.recv()).await;
            let at = at.expect("no waiting request admitted").expect("a call");
            times.push(at - released);
            for request in queued {
                request.await.expect("waiter");
            }
            while called.try_recv().is_ok() {} // the other waiters' calls
        }
        all.push(times);
    }
    all
}
