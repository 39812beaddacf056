//! Bounded waiting for capacity over real HTTP: a request over the cap waits, first come
//! first served per tenant, until capacity returns or its time is up; a cancelled wait
//! leaves nothing behind.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::{Extension, Router};
use common::*;
use http::StatusCode;
use tower::{Layer, ServiceExt};
use tower_tenant_tokens::body::RequestBody;
use tower_tenant_tokens::{ReservationHandle, TenantTokenLayer, TenantTokenTracker};

struct App {
    server: TestServer,
    tracker: Arc<TenantTokenTracker>,
    streams: Streams,
    /// The reservations `/ok` saw, in the order they were admitted.
    admitted: Arc<Mutex<Vec<u64>>>,
}

async fn app(cap: u64, max_wait: Duration) -> App {
    let tracker = Arc::new(TenantTokenTracker::new(cap));
    let (source, streams) = streams();
    let admitted = Arc::new(Mutex::new(Vec::new()));
    let seen = admitted.clone();
    let router = Router::new()
        .route(
            "/ok",
            post(move |Extension(handle): Extension<ReservationHandle>| {
                seen.lock().unwrap().push(handle.tokens());
                async { "ok" }
            }),
        )
        .route(
            "/hold",
            post(move || {
                let body = source.body();
                async move { body }
            }),
        )
        .layer(
            TenantTokenLayer::new(tracker.clone())
                .reservation_handle(true)
                .wait_for_capacity(max_wait),
        );
    App {
        server: serve(router).await,
        tracker,
        streams,
        admitted,
    }
}

/// Sends `request` in the background; the handle answers with the reply.
fn spawn_call(request: http::Request<ReqBody>) -> tokio::task::JoinHandle<Reply> {
    tokio::spawn(async move { call(&client(), request).await })
}

#[tokio::test]
async fn a_request_over_the_cap_waits_and_gets_in_when_capacity_returns() {
    let mut app = app(1_000, Duration::from_secs(10)).await;
    let client = client();
    let holding = send(&client, metered(&app.server, "/hold", "acme", 800)).await;
    let chunks = app.streams.next().await;

    let waiting = spawn_call(metered(&app.server, "/ok", "acme", 500));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "it fits only once the stream ends");
    assert_eq!(
        app.tracker.in_flight("acme"),
        800,
        "waiting reserves nothing"
    );

    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    let reply = within("the waiting request", waiting).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(*app.admitted.lock().unwrap(), [500]);
    wait_for_in_flight(&app.tracker, "acme", 0).await;
}

#[tokio::test]
async fn first_come_first_served_so_a_large_request_is_not_starved() {
    let mut app = app(1_000, Duration::from_secs(10)).await;
    let client = client();
    let first = send(&client, metered(&app.server, "/hold", "acme", 600)).await;
    let first_chunks = app.streams.next().await;
    let second = send(&client, metered(&app.server, "/hold", "acme", 300)).await;
    let second_chunks = app.streams.next().await;

    // 800 waits for 700 to be released.
    let large = spawn_call(metered(&app.server, "/ok", "acme", 800));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // 100 would fit right now (900 + 100), but the large request is first in line.
    let small = spawn_call(metered(&app.server, "/ok", "acme", 100));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        app.admitted.lock().unwrap().is_empty(),
        "nobody overtakes the first in line"
    );

    drop(first_chunks); // 300 left in flight: 800 still does not fit, 100 would
    assert_eq!(read(first).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        app.admitted.lock().unwrap().is_empty(),
        "still waiting behind the large one"
    );

    drop(second_chunks);
    assert_eq!(read(second).await.status, StatusCode::OK);
    assert_eq!(within("large", large).await.unwrap().status, StatusCode::OK);
    assert_eq!(within("small", small).await.unwrap().status, StatusCode::OK);
    assert_eq!(
        *app.admitted.lock().unwrap(),
        [800, 100],
        "served in arrival order"
    );
    wait_for_in_flight(&app.tracker, "acme", 0).await;
}

#[tokio::test]
async fn a_wait_ends_at_its_deadline_with_the_usual_429_and_never_for_413() {
    let mut app = app(1_000, Duration::from_millis(300)).await;
    let client = client();
    let holding = send(&client, metered(&app.server, "/hold", "acme", 1_000)).await;
    let chunks = app.streams.next().await;

    let started = Instant::now();
    let refused = call(&client, metered(&app.server, "/ok", "acme", 100)).await;
    let waited = started.elapsed();
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "rate_limit_exceeded");
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), Some("0"));
    assert!(
        waited >= Duration::from_millis(250),
        "answered after {waited:?}, before the deadline"
    );

    // Larger than the cap: waiting cannot help, so it is answered at once.
    let too_large = call(&client, metered(&app.server, "/ok", "acme", 1_001)).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);

    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    // Nobody is left in the queue: the next request goes straight in.
    let admitted = call(&client, metered(&app.server, "/ok", "acme", 1_000)).await;
    assert_eq!(admitted.status, StatusCode::OK);
    assert!(app.admitted.lock().unwrap().contains(&1_000));
}

#[tokio::test]
async fn a_cancelled_wait_leaves_nothing_behind() {
    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let layer = TenantTokenLayer::new(tracker.clone()).wait_for_capacity(Duration::from_secs(30));
    let service = layer.layer(tower::service_fn(
        |_: http::Request<RequestBody<String>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("served")))
        },
    ));
    let request = |tokens: u64| {
        http::Request::post("/v1/chat/completions")
            .header("x-tenant-id", "acme")
            .header("x-token-estimate", tokens.to_string())
            .body(String::new())
            .unwrap()
    };
    let held = tracker.reserve_id("acme", 1_000).unwrap();

    // Two requests wait; the client gives up on both (their futures are dropped).
    for tokens in [700, 300] {
        let waiting = tokio::time::timeout(
            Duration::from_millis(100),
            service.clone().oneshot(request(tokens)),
        );
        assert!(waiting.await.is_err(), "should still have been waiting");
    }
    assert_eq!(tracker.in_flight("acme"), 1_000);
    drop(held);

    // No ghost is first in line: a new request is served at once, not after 30 s.
    let served = within(
        "a request after the cancelled ones",
        service.clone().oneshot(request(1_000)),
    );
    assert_eq!(served.await.unwrap().status(), StatusCode::OK);
    assert_eq!(tracker.in_flight("acme"), 0);
}

/// Hundreds of requests from three tenants, over their caps and a shared budget, some
/// giving up while they wait and some waiting past the deadline: no cap is ever passed,
/// and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_waiters_with_cancels_never_pass_a_cap_and_leave_nothing() {
    use tower_tenant_tokens::SharedBudget;

    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let upstream = Arc::new(TenantTokenTracker::new(2_000));
    let layer = TenantTokenLayer::new(tracker.clone())
        .shared_budget(SharedBudget::new("upstream", upstream.clone()))
        .wait_for_capacity(Duration::from_millis(150));
    let service = layer.layer(tower::service_fn(
        |request: http::Request<RequestBody<String>>| async move {
            let hold: u64 = request.headers()["x-hold-ms"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            tokio::time::sleep(Duration::from_millis(hold)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("served")))
        },
    ));
    // A small deterministic generator, so a failure replays.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    let mut tasks = Vec::new();
    for i in 0..300 {
        let tenant = ["acme", "globex", "initech"][i % 3];
        let (tokens, hold, patience) = (50 + next(550), next(20), 5 + next(400));
        let request = http::Request::post("/v1/chat/completions")
            .header("x-tenant-id", tenant)
            .header("x-token-estimate", tokens.to_string())
            .header("x-hold-ms", hold.to_string())
            .body(String::new())
            .unwrap();
        let call = service.clone().oneshot(request);
        tasks.push(tokio::spawn(async move {
            // Some clients give up while waiting: their futures are dropped.
            match tokio::time::timeout(Duration::from_millis(patience), call).await {
                Ok(response) => Some(response.unwrap().status()),
                Err(_) => None,
            }
        }));
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let (mut served, mut refused, mut gave_up) = (0, 0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Some(StatusCode::OK) => served += 1,
            Some(StatusCode::TOO_MANY_REQUESTS) => refused += 1,
            Some(other) => panic!("unexpected status {other}"),
            None => gave_up += 1,
        }
    }
    eprintln!("served {served}, refused {refused}, gave up {gave_up}");
    assert!(
        served > 0 && refused > 0 && gave_up > 0,
        "served {served}, refused {refused}, gave up {gave_up}"
    );
    for tenant in ["acme", "globex", "initech"] {
        let state = tracker.tenant_state(tenant).unwrap();
        assert!(
            state.high_water <= 1_000,
            "{tenant} passed its cap: {state:?}"
        );
        wait_for_in_flight(&tracker, tenant, 0).await;
    }
    let budget = upstream.tenant_state("upstream").unwrap();
    assert!(
        budget.high_water <= 2_000,
        "the budget was passed: {budget:?}"
    );
    assert_eq!(upstream.in_flight("upstream"), 0);
    // No ghost is left first in line: a request of the whole cap goes straight in.
    for tenant in ["acme", "globex", "initech"] {
        let request = http::Request::post("/v1/chat/completions")
            .header("x-tenant-id", tenant)
            .header("x-token-estimate", "1000")
            .header("x-hold-ms", "0")
            .body(String::new())
            .unwrap();
        let response = within("a request after the run", service.clone().oneshot(request));
        assert_eq!(response.await.unwrap().status(), StatusCode::OK);
    }
}
