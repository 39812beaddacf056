//! Two minutes of traffic against a window of 5,000 tokens per minute, from one process
//! and from two replicas sharing one bucket in Redis: at no instant has more got through
//! than the bucket allows (full at the start, then what refilled since), and what
//! refilled was used.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use common::*;
use http::StatusCode;
use tower_tenant_tokens::{TenantTokenLayer, TenantTokenTracker, TokenWindow};

/// The window's limit, per minute.
const LIMIT: u64 = 5_000;
/// Each request's estimate.
const TOKENS: u64 = 100;
/// How long the traffic runs: two of the window's periods.
const RUN: Duration = Duration::from_secs(120);

/// When each admitted request reached the service, and its tokens.
type Admitted = Arc<Mutex<Vec<(Instant, u64)>>>;

/// An app whose `/ok` notes each request that reaches it, behind `layer`.
fn app(layer: TenantTokenLayer, admitted: &Admitted) -> Router {
    let admitted = admitted.clone();
    Router::new()
        .route(
            "/ok",
            post(move || {
                admitted.lock().unwrap().push((Instant::now(), TOKENS));
                async { "ok" }
            }),
        )
        .layer(layer)
}

/// Eight clients, each sending a request every 25 ms (far more than the window refills)
/// to `servers` in turn, for [`RUN`]. Every answer is an admission or the window's
/// refusal.
async fn keep_sending(servers: &[&TestServer], started: Instant) {
    let client = pooled_client();
    let clients = (0..8).map(|n| {
        let client = client.clone();
        let requests: Vec<_> = (0..servers.len())
            .map(|i| servers[(n + i) % servers.len()].url("/ok"))
            .collect();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(25));
            for url in requests.iter().cycle() {
                ticks.tick().await;
                if started.elapsed() >= RUN {
                    break;
                }
                let request = http::Request::post(url)
                    .header("x-tenant-id", "acme")
                    .header("x-token-estimate", TOKENS)
                    .body(empty())
                    .unwrap();
                let reply = call(&client, request).await;
                if reply.status != StatusCode::OK {
                    let code = assert_openai_error(&reply, StatusCode::TOO_MANY_REQUESTS);
                    assert_eq!(code, "window_exceeded");
                }
            }
        })
    });
    for client in clients.collect::<Vec<_>>() {
        client.await.unwrap();
    }
}

/// At every admission, the tokens admitted so far fit a full bucket plus what refilled
/// since `started`; and by the end, most of what refilled was used.
fn check(admitted: &Admitted, started: Instant) {
    let mut admitted = admitted.lock().unwrap().clone();
    admitted.sort();
    let rate = LIMIT as f64 / 60.0;
    let mut total = 0.0;
    for (at, tokens) in &admitted {
        total += *tokens as f64;
        let allowed = LIMIT as f64 + rate * at.duration_since(started).as_secs_f64();
        assert!(
            total <= allowed,
            "{total} tokens by {:?}, {allowed:.0} allowed",
            at.duration_since(started)
        );
    }
    let refilled = rate * RUN.as_secs_f64();
    assert!(
        total >= LIMIT as f64 + 0.9 * refilled,
        "only {total} tokens admitted in {RUN:?}"
    );
    eprintln!(
        "{} requests ({total} tokens) admitted in {RUN:?}; {:.0} allowed",
        admitted.len(),
        LIMIT as f64 + refilled
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_minutes_in_one_process_never_get_past_the_bucket() {
    let admitted = Admitted::default();
    let layer = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(1_000_000)))
        .window(TokenWindow::per_minute(LIMIT));
    let server = serve(app(layer, &admitted)).await;
    let started = Instant::now();
    keep_sending(&[&server], started).await;
    check(&admitted, started);
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_minutes_on_two_replicas_never_get_past_the_shared_bucket() {
    use common::redis_server::RedisServer;
    use tower_tenant_tokens::redis::RedisTokenTracker;

    let Some(redis) = RedisServer::start("two_minutes_on_two_replicas") else {
        return;
    };
    let admitted = Admitted::default();
    let replica = || {
        let tracker = RedisTokenTracker::builder(1_000_000)
            .connect(redis.url())
            .expect("a valid redis url");
        let layer = TenantTokenLayer::new(tracker).window(TokenWindow::per_minute(LIMIT));
        serve(app(layer, &admitted))
    };
    let (first, second) = (replica().await, replica().await);
    let started = Instant::now();
    keep_sending(&[&first, &second], started).await;
    check(&admitted, started);
}
