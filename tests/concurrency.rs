//! Many requests at once: caps hold at every instant, everything is released at the end,
//! and floods of distinct tenant ids leave no more idle tenants than the tracker's bound.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{Layer, ServiceExt};
use tower_tenant_tokens::body::RequestBody;
use tower_tenant_tokens::{TenantTokenLayer, TenantTokenTracker};

const TENANTS: usize = 5;
const REQUESTS: usize = 300;

fn tenant_cap(tenant: usize) -> u64 {
    400 + 200 * tenant as u64 // 400, 600, 800, 1000, 1200
}

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Streams `x-chunks` chunks, a couple of milliseconds apart.
async fn chunked_answer(headers: HeaderMap) -> Body {
    let chunks: usize = headers["x-chunks"].to_str().unwrap().parse().unwrap();
    let pause = Duration::from_millis(headers["x-pause-ms"].to_str().unwrap().parse().unwrap());
    let stream = futures_util::stream::iter(0..chunks).then(move |i| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, Infallible>(Bytes::from(format!("chunk-{i};")))
    });
    Body::from_stream(stream)
}

enum Outcome {
    Streamed {
        chunks: usize,
        body: Bytes,
    },
    Abandoned,
    Refused {
        tenant: usize,
        limit: Option<String>,
    },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_never_exceed_any_cap_and_all_end_at_zero() {
    let tracker = Arc::new(
        TenantTokenTracker::builder(0)
            .cap_fn(|tenant| {
                let index: usize = tenant.strip_prefix("tenant-")?.parse().ok()?;
                Some(tenant_cap(index))
            })
            .build(),
    );
    let app = Router::new()
        .route("/stream", post(chunked_answer))
        .layer(TenantTokenLayer::new(tracker.clone()));
    let server = serve(app).await;

    // Samples every tenant's in-flight total about every millisecond, on its own thread.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (tracker, stop) = (tracker.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut violations = Vec::new();
            let mut samples = 0usize;
            let mut busiest = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for (tenant, state) in tracker.snapshot() {
                    if state.in_flight > state.cap {
                        violations.push((tenant, state.in_flight, state.cap));
                    }
                    busiest = busiest.max(state.in_flight);
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            (violations, samples, busiest)
        })
    };

    let client = client();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut tasks = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS {
        let tenant = i % TENANTS;
        let tokens = 50 + rng.below(200);
        let chunks = 1 + rng.below(8) as usize;
        let pause = 1 + rng.below(4);
        let abandon = rng.below(10) == 0;
        let request = Request::post(server.url("/stream"))
            .header("x-tenant-id", format!("tenant-{tenant}"))
            .header("x-token-estimate", tokens)
            .header("x-chunks", chunks)
            .header("x-pause-ms", pause)
            .body(empty())
            .unwrap();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let response = within("a response head", client.request(request))
                .await
                .expect("request");
            match response.status() {
                StatusCode::OK if abandon => {
                    let mut body = response.into_body();
                    let _ = within("the first chunk", body.frame()).await;
                    Outcome::Abandoned // dropping the body cuts the connection
                }
                StatusCode::OK => Outcome::Streamed {
                    chunks,
                    body: read(response).await.body,
                },
                StatusCode::TOO_MANY_REQUESTS => Outcome::Refused {
                    tenant,
                    limit: read(response)
                        .await
                        .header("x-ratelimit-limit-tokens")
                        .map(str::to_owned),
                },
                other => panic!("unexpected status {other}"),
            }
        }));
    }

    let (mut streamed, mut abandoned, mut refused) = (0, 0, 0);
    for task in tasks {
        match task.await.expect("request task") {
            Outcome::Streamed { chunks, body } => {
                let expected: String = (0..chunks).map(|i| format!("chunk-{i};")).collect();
                assert_eq!(body, expected.as_bytes(), "every chunk arrives, in order");
                streamed += 1;
            }
            Outcome::Abandoned => abandoned += 1,
            Outcome::Refused { tenant, limit } => {
                assert_eq!(limit, Some(tenant_cap(tenant).to_string()));
                refused += 1;
            }
        }
    }
    for tenant in 0..TENANTS {
        wait_for_in_flight(&tracker, &format!("tenant-{tenant}"), 0).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (violations, samples, busiest) = sampler.join().expect("sampler");

    assert!(violations.is_empty(), "caps exceeded: {violations:?}");
    assert!(samples > 0 && busiest > 0, "the sampler saw the traffic");
    assert!(streamed > 0, "some requests were served");
    assert!(refused > 0, "some requests were refused with 429");
    assert_eq!(streamed + abandoned + refused, REQUESTS);
    let snapshot: HashMap<String, _> = tracker.snapshot().into_iter().collect();
    assert_eq!(snapshot.len(), TENANTS);
    for tenant in 0..TENANTS {
        let state = &snapshot[&format!("tenant-{tenant}")];
        assert_eq!(state.in_flight, 0);
        assert_eq!(state.reservations, 0);
        assert_eq!(state.cap, tenant_cap(tenant));
        assert!(state.high_water <= state.cap, "{tenant}: {state:?}");
        assert!(state.high_water > 0);
    }
}

type TestBody = http_body_util::Full<Bytes>;

/// The layer around a trivial service, called without HTTP: for floods of tenant ids.
fn direct_service(
    tracker: &Arc<TenantTokenTracker>,
) -> impl tower::Service<
    Request<TestBody>,
    Response = Response<tower_tenant_tokens::body::ResponseBody<TestBody>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    TenantTokenLayer::new(tracker.clone()).layer(tower::service_fn(
        |_: Request<RequestBody<TestBody>>| async {
            Ok::<_, Infallible>(Response::new(TestBody::from("ok")))
        },
    ))
}

fn one_token(tenant: &str) -> Request<TestBody> {
    Request::post("/")
        .header("x-tenant-id", tenant)
        .header("x-token-estimate", "1")
        .body(TestBody::default())
        .unwrap()
}

fn total_in_flight(tracker: &TenantTokenTracker) -> u64 {
    tracker.snapshot().iter().map(|(_, s)| s.in_flight).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_100k_distinct_tenants_leaves_no_more_than_the_idle_bound() {
    let tracker = Arc::new(TenantTokenTracker::new(10));
    let service = direct_service(&tracker);
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let service = service.clone();
            tokio::spawn(async move {
                for i in 0..25_000 {
                    let tenant = format!("spray-{worker}-{i}");
                    let response = service.clone().oneshot(one_token(&tenant)).await.unwrap();
                    assert_eq!(response.status(), StatusCode::OK);
                    response.into_body().collect().await.unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(
        tracker.max_idle_tenants(),
        TenantTokenTracker::DEFAULT_MAX_IDLE_TENANTS
    );
    let tracked = tracker.tracked_tenants();
    assert!(
        tracked <= tracker.max_idle_tenants(),
        "{tracked} tenants tracked after 100,000 one-off ids"
    );
    assert_eq!(total_in_flight(&tracker), 0);
}

#[tokio::test]
async fn a_spray_of_10k_ids_leaves_at_most_a_configured_bound_of_100() {
    let tracker = Arc::new(
        TenantTokenTracker::builder(10)
            .max_idle_tenants(100)
            .build(),
    );
    let service = direct_service(&tracker);
    for i in 0..10_000 {
        let response = service
            .clone()
            .oneshot(one_token(&format!("id-{i}")))
            .await
            .unwrap();
        drop(response); // an unread body releases too
    }
    assert_eq!(tracker.max_idle_tenants(), 100);
    let tracked = tracker.tracked_tenants();
    assert!(tracked <= 100, "{tracked} tenants tracked");
    assert_eq!(total_in_flight(&tracker), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_burst_of_distinct_tenants_leaves_at_most_the_bound() {
    let tracker = Arc::new(
        TenantTokenTracker::builder(10)
            .max_idle_tenants(100)
            .build(),
    );
    let app = Router::new()
        .route("/", post(|| async { "ok" }))
        .layer(TenantTokenLayer::new(tracker.clone()));
    let server = serve(app).await;
    let client = pooled_client();
    let ok = Arc::new(AtomicUsize::new(0));
    futures_util::stream::iter(0..1_000)
        .for_each_concurrent(16, |i| {
            let (client, ok) = (client.clone(), ok.clone());
            let request = metered(&server, "/", &format!("http-{i}"), 5);
            async move {
                let reply = call(&client, request).await;
                assert_eq!(reply.status, StatusCode::OK);
                ok.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await;
    assert_eq!(ok.load(Ordering::SeqCst), 1_000);
    wait_until("every reservation to end", || {
        total_in_flight(&tracker) == 0
    })
    .await;
    let tracked = tracker.tracked_tenants();
    assert!(tracked <= 100, "{tracked} tenants tracked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_reservations_held_at_once_are_trimmed_to_the_bound_when_released() {
    let tracker = Arc::new(
        TenantTokenTracker::builder(10)
            .max_idle_tenants(100)
            .build(),
    );
    let service = direct_service(&tracker);
    let mut held = Vec::with_capacity(5_000);
    for i in 0..5_000 {
        let response = service
            .clone()
            .oneshot(one_token(&format!("held-{i}")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        held.push(response);
    }
    assert_eq!(
        tracker.tracked_tenants(),
        5_000,
        "tenants with work in flight are never evicted"
    );
    assert_eq!(total_in_flight(&tracker), 5_000);

    // Release from four tasks at once, half by reading the body to its end, half by dropping.
    let shares: Vec<Vec<_>> = {
        let mut shares: Vec<Vec<_>> = (0..4).map(|_| Vec::new()).collect();
        for (i, response) in held.into_iter().enumerate() {
            shares[i % 4].push(response);
        }
        shares
    };
    let released = Arc::new(Mutex::new(0usize));
    let tasks: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(task, share)| {
            let released = released.clone();
            tokio::spawn(async move {
                let count = share.len();
                for response in share {
                    if task % 2 == 0 {
                        response.into_body().collect().await.unwrap();
                    } else {
                        drop(response);
                    }
                }
                *released.lock().unwrap() += count;
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(*released.lock().unwrap(), 5_000);
    assert_eq!(total_in_flight(&tracker), 0);
    let tracked = tracker.tracked_tenants();
    assert!(tracked <= 100, "{tracked} tenants tracked after release");
}

#[tokio::test]
async fn steady_tenants_survive_a_spray_of_one_off_ids_through_the_layer() {
    // The tracker documents that idle tenants "not seen again since they were first
    // tracked" are forgotten first, so a spray of one-off ids evicts itself rather than the
    // steady tenants. Eight steady tenants, each seen again every 40 one-off ids, fit the
    // bound of 100 many times over; none of them may be evicted.
    let tracker = Arc::new(
        TenantTokenTracker::builder(1_000)
            .max_idle_tenants(100)
            .build(),
    );
    let service = direct_service(&tracker);
    let steady: Vec<String> = (0..8).map(|i| format!("steady-{i}")).collect();
    let mut held = Vec::new();
    for tenant in &steady {
        let mut request = one_token(tenant);
        request
            .headers_mut()
            .insert("x-token-estimate", "500".parse().unwrap());
        held.push(service.clone().oneshot(request).await.unwrap());
    }
    drop(held); // each steady tenant's high-water mark is now 500
    for i in 0..10_000 {
        drop(
            service
                .clone()
                .oneshot(one_token(&format!("one-off-{i}")))
                .await
                .unwrap(),
        );
        if i % 5 == 0 {
            let tenant = &steady[(i / 5) % steady.len()];
            drop(service.clone().oneshot(one_token(tenant)).await.unwrap());
        }
    }
    assert!(tracker.tracked_tenants() <= 100);
    // An evicted and re-created entry would have forgotten its high-water mark.
    let forgotten: Vec<_> = steady
        .iter()
        .filter(|tenant| tracker.tenant_state(tenant).map(|s| s.high_water) != Some(500))
        .collect();
    assert!(
        forgotten.is_empty(),
        "steady tenants evicted by a spray of one-off ids: {forgotten:?}"
    );
}
