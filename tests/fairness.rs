//! Fair shares of a saturated shared budget, over real HTTP: tenants waiting for the
//! upstream's capacity are served by priority class, then by the tokens each has been
//! served (weighted), whatever how many requests each keeps going.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fair::*;
use common::*;
use http::{HeaderName, StatusCode};
use tower_tenant_tokens::{SharedBudget, TenantTokenLayer, TenantTokenTracker};

/// The tests here run one at a time: they time streams and waits against each other, and a
/// neighbour's load would skew them.
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct App {
    server: Arc<TestServer>,
    upstream: Arc<TenantTokenTracker>,
    /// The tenants in the order the handler saw them (admitted), with the time.
    admitted: Arc<Mutex<Vec<(String, Instant)>>>,
}

/// An app whose `/stream` answers with a body of 4 chunks `chunk_ms` apart and whose
/// `/hold` streams until the test drops its sender, behind a layer drawing every request
/// from one upstream budget and waiting up to `max_wait`, classes from `x-priority`.
async fn app(
    chunk_ms: u64,
    max_wait: Duration,
    adjust: impl FnOnce(TenantTokenLayer) -> TenantTokenLayer,
) -> (App, Streams) {
    let (source, streams) = streams();
    let tenants = Arc::new(TenantTokenTracker::new(1_000_000));
    let upstream = Arc::new(TenantTokenTracker::new(UPSTREAM));
    let admitted = Arc::new(Mutex::new(Vec::new()));
    let seen = admitted.clone();
    let router = routes(chunk_ms, seen, source).layer(adjust(
        TenantTokenLayer::new(tenants)
            .shared_budget(SharedBudget::new("upstream", upstream.clone()))
            .wait_for_capacity(max_wait)
            .priority_header(HeaderName::from_static("x-priority")),
    ));
    let app = App {
        server: Arc::new(serve(router).await),
        upstream,
        admitted,
    };
    (app, streams)
}

/// Runs the tenants for `run`, sampling the upstream budget all along; returns each
/// tenant's share of the upstream's tokens admitted while all were backlogged (after a
/// warm-up, before the clients stop) and its waits.
async fn contend(
    app: &App,
    tenants: &[(&'static str, usize)],
    run: Duration,
) -> HashMap<&'static str, (f64, Vec<Duration>)> {
    let started = Instant::now();
    let server = app.server.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let highest = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn({
        let (upstream, stop, highest) = (app.upstream.clone(), stop.clone(), highest.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                highest.fetch_max(upstream.in_flight("upstream"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let runs: Vec<_> = tenants
        .iter()
        .map(|&(tenant, loops)| {
            let run = keep_busy(server.clone(), tenant, loops, stop.clone());
            (tenant, tokio::spawn(run))
        })
        .collect();
    tokio::time::sleep(run).await;
    let stopped = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let mut waits = HashMap::new();
    for (tenant, run) in runs {
        waits.insert(tenant, within("the clients to stop", run).await.unwrap());
    }
    sampler.await.unwrap();
    assert!(
        highest.load(Ordering::Relaxed) <= UPSTREAM,
        "the budget was exceeded: {}",
        highest.load(Ordering::Relaxed)
    );
    wait_for_in_flight(&app.upstream, "upstream", 0).await;
    let admitted = app.admitted.lock().unwrap();
    let window = admitted
        .iter()
        .filter(|(_, at)| *at >= started + Duration::from_millis(300) && *at < stopped);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (tenant, _) in window {
        *counts.entry(tenant.as_str()).or_default() += 1;
    }
    let total: usize = counts.values().sum();
    assert!(total >= 20, "too few admissions to judge: {counts:?}");
    tenants
        .iter()
        .map(|&(tenant, _)| {
            let share = counts.get(tenant).copied().unwrap_or(0) as f64 / total as f64;
            (tenant, (share, waits.remove(tenant).unwrap()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_asking_for_little_gets_half_of_a_saturated_upstream() {
    let _alone = MEASURING.lock().await;
    // Each request holds 400 of the upstream's 1,000 tokens for about 100 ms: two run at
    // once. `heavy` keeps 16 going, `light` 2, so both always have one waiting.
    let (app, _streams) = app(25, Duration::from_secs(20), |layer| layer).await;
    let results = contend(&app, &[("heavy", 16), ("light", 2)], Duration::from_secs(3)).await;
    let light = results["light"].0;
    let waited = median(results["light"].1.clone());
    eprintln!("light's share {light:.3}, median wait {waited:?}");
    assert!(light >= 0.45, "light's share of the upstream: {light:.3}");
    assert!(
        waited <= Duration::from_millis(2 * 100),
        "light's median wait {waited:?}, a request runs ~100 ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_three_to_one_share_the_upstream_three_to_one() {
    let _alone = MEASURING.lock().await;
    let (app, _streams) = app(10, Duration::from_secs(20), |layer| {
        layer.tenant_weight(|tenant| if tenant == "gold" { 3 } else { 1 })
    })
    .await;
    let results = contend(&app, &[("gold", 8), ("basic", 8)], Duration::from_secs(3)).await;
    let gold = results["gold"].0;
    eprintln!("gold's share {gold:.3}");
    assert!((gold - 0.75).abs() <= 0.07, "gold's share: {gold:.3}");
}

/// Holds the whole upstream with one streaming request until the test ends its stream.
async fn fill_upstream(app: &App) -> (hyper::Response<hyper::body::Incoming>, HttpClient) {
    let client = client();
    let request = metered(&app.server, "/hold", "holder", UPSTREAM);
    let response = send(&client, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    (response, client)
}

#[tokio::test]
async fn critical_requests_are_admitted_before_every_waiting_standard_one() {
    let _alone = MEASURING.lock().await;
    let (app, mut streams) = app(0, Duration::from_secs(10), |layer| layer).await;
    let (holding, _client) = fill_upstream(&app).await;
    let chunks = streams.next().await;

    let mut waiting = Vec::new();
    for tenant in ["a", "b", "a"] {
        waiting.push(spawn_request(&app.server, tenant, 600, "standard"));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    waiting.push(spawn_request(&app.server, "c", 600, "critical"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        app.admitted.lock().unwrap().is_empty(),
        "all wait for the upstream"
    );

    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    for request in waiting {
        assert_eq!(
            within("a waiting request", request).await.unwrap().status,
            StatusCode::OK
        );
    }
    let order: Vec<String> = app
        .admitted
        .lock()
        .unwrap()
        .iter()
        .map(|(t, _)| t.clone())
        .collect();
    assert_eq!(order[0], "c", "the critical request first: {order:?}");
    assert_eq!(order.len(), 4);
    wait_for_in_flight(&app.upstream, "upstream", 0).await;
}

#[tokio::test]
async fn sheddable_requests_are_refused_at_once_while_others_wait_and_none_waits_past_its_deadline()
{
    let (app, mut streams) = app(0, Duration::from_millis(400), |layer| layer).await;
    let (holding, _client) = fill_upstream(&app).await;
    let chunks = streams.next().await;

    let started = Instant::now();
    let standard = spawn_request(&app.server, "a", 600, "standard");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let shed = within(
        "the shed request",
        spawn_request(&app.server, "b", 100, "sheddable"),
    )
    .await
    .unwrap();
    assert_eq!(shed.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(shed.error_code(), "shed");
    assert!(shed.header("retry-after").is_some());
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "refused at once"
    );

    let timed_out = within("the waiting request", standard).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(timed_out.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(timed_out.error_code(), "budget_exceeded");
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_millis(1_000),
        "answered after {waited:?}, its deadline was 400 ms"
    );
    assert!(app.admitted.lock().unwrap().is_empty());

    let bad = spawn_request(&app.server, "a", 1, "urgent");
    let bad = within("the bad request", bad).await.unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.error_code(), "invalid_priority");

    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    wait_for_in_flight(&app.upstream, "upstream", 0).await;
    // Nothing left queued: a request fits at once.
    let after = within(
        "a request after",
        spawn_request(&app.server, "b", 1_000, "sheddable"),
    )
    .await
    .unwrap();
    assert_eq!(after.status, StatusCode::OK);
}
