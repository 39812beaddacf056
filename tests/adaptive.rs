//! Learned output allowances (`TenantTokenLayer::adaptive_output`), over real HTTP: requests
//! without `max_tokens` reserve what their tenant's requests to that model really produce,
//! the allowance follows a change, and a stream past its allowance is counted as it runs.
#![cfg(feature = "openai")]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use tower_tenant_tokens::{AdaptiveOutput, OpenAiEstimator, TenantTokenLayer, TenantTokenTracker};

/// The prompt of every request: "user" + "Say hello." = 14 bytes, 4 tokens.
const PROMPT: u64 = 4;

/// A mock upstream: non-streamed answers report `output` completion tokens; streamed ones
/// carry what the test sends.
async fn app(layer: TenantTokenLayer, output: Arc<AtomicU64>) -> (TestServer, Streams) {
    let (source, streams) = streams();
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(move |body: Bytes| {
                let stream = serde_json::from_slice::<serde_json::Value>(&body)
                    .is_ok_and(|request| request["stream"] == true);
                let body = stream.then(|| source.body());
                let output = output.load(Ordering::Relaxed);
                async move {
                    match body {
                        Some(body) => ([(CONTENT_TYPE, "text/event-stream")], body).into_response(),
                        None => {
                            let answer = serde_json::json!({
                                "object": "chat.completion",
                                "choices": [{"index": 0, "message": {"role": "assistant",
                                    "content": "..."}, "finish_reason": "stop"}],
                                "usage": {"prompt_tokens": PROMPT, "completion_tokens": output,
                                    "total_tokens": PROMPT + output},
                            });
                            axum::Json(answer).into_response()
                        }
                    }
                }
            }),
        )
        .layer(layer);
    (serve(app).await, streams)
}

fn chat(server: &TestServer, tenant: &str, stream: bool) -> Request<ReqBody> {
    limited_chat(server, tenant, stream, None)
}

/// A request by `tenant`, with an explicit `max_tokens` of `limit` if given.
fn limited_chat(
    server: &TestServer,
    tenant: &str,
    stream: bool,
    limit: Option<u64>,
) -> Request<ReqBody> {
    let mut body = serde_json::json!({
        "model": "m", "stream": stream,
        "messages": [{"role": "user", "content": "Say hello."}],
    });
    if let Some(limit) = limit {
        body["max_tokens"] = limit.into();
    }
    Request::post(server.url("/v1/chat/completions"))
        .header("x-tenant-id", tenant)
        .header(CONTENT_TYPE, "application/json")
        .body(full(body.to_string()))
        .expect("request")
}

fn chunk(content: &str) -> Bytes {
    let event = serde_json::json!({"choices": [{"index": 0, "delta": {"content": content}}]});
    Bytes::from(format!("data: {event}\n\n"))
}

fn layer(tracker: &Arc<TenantTokenTracker>, learned: &Arc<AdaptiveOutput>) -> TenantTokenLayer {
    TenantTokenLayer::new(tracker.clone())
        .estimator(OpenAiEstimator::new())
        .adaptive_output(learned.clone())
}

/// Sends `n` non-streamed requests, each producing what the upstream is set to.
async fn answers(client: &HttpClient, server: &TestServer, tenant: &str, n: usize) {
    for _ in 0..n {
        let reply = call(client, chat(server, tenant, false)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
}

/// How many streams `tenant` holds at once before a 429, each held open; then ends them
/// all.
async fn streams_held(
    client: &HttpClient,
    server: &TestServer,
    streams: &mut Streams,
    tenant: &str,
) -> usize {
    let mut held = Vec::new();
    loop {
        let response = send(client, chat(server, tenant, true)).await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        assert_eq!(response.status(), StatusCode::OK);
        held.push((response, streams.next().await));
        assert!(held.len() < 1_000, "the cap holds no limit");
    }
    let count = held.len();
    for (response, sender) in held {
        drop(sender);
        assert_eq!(next_data(&mut response.into_body()).await, None);
    }
    count
}

/// What one stream by `tenant` (nothing else in flight) holds while it runs; then ends it.
async fn held_by_a_stream(
    client: &HttpClient,
    server: &TestServer,
    streams: &mut Streams,
    tracker: &TenantTokenTracker,
    tenant: &str,
) -> u64 {
    let response = send(client, chat(server, tenant, true)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let sender = streams.next().await;
    let held = tracker.in_flight(tenant);
    drop(sender);
    assert_eq!(next_data(&mut response.into_body()).await, None);
    assert_eq!(tracker.in_flight(tenant), 0);
    held
}

/// Waits for `tenant` to have nothing in flight.
async fn settled(tracker: &TenantTokenTracker, tenant: &str) {
    for _ in 0..500 {
        if tracker.in_flight(tenant) == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{tenant} still has {} in flight", tracker.in_flight(tenant));
}

#[tokio::test]
async fn a_tenants_allowance_is_learned_from_its_outputs_and_follows_them() {
    let tracker = Arc::new(TenantTokenTracker::new(4_096));
    let learned = Arc::new(AdaptiveOutput::new());
    let output = Arc::new(AtomicU64::new(16));
    let (server, mut streams) = app(layer(&tracker, &learned), output.clone()).await;
    let client = client();

    // Before anything is learned: the fixed default, 3 streams under a 4,096 cap.
    let held = held_by_a_stream(&client, &server, &mut streams, &tracker, "acme").await;
    assert_eq!(held, PROMPT + 1_024);
    assert_eq!(
        streams_held(&client, &server, &mut streams, "fresh").await,
        3
    );
    settled(&tracker, "fresh").await;

    // 50 answers of 16 tokens: a held stream reserves at most 110.
    answers(&client, &server, "acme", 50).await;
    let response = send(&client, chat(&server, "acme", true)).await;
    let sender = streams.next().await;
    let held = tracker.in_flight("acme");
    assert!(
        held <= 110,
        "a stream after 50 answers of 16 tokens holds {held}"
    );
    drop(sender);
    assert_eq!(next_data(&mut response.into_body()).await, None);
    let at_once = streams_held(&client, &server, &mut streams, "acme").await;
    assert!(
        at_once >= 30,
        "the cap holds {at_once} such streams at once"
    );
    println!("learned: one stream holds {held} tokens; a 4,096 cap holds {at_once} at once");
    settled(&tracker, "acme").await;

    // The answers grow to 2,000 tokens: the allowance follows within 50 requests.
    output.store(2_000, Ordering::Relaxed);
    let mut followed = None;
    for i in 1..=50 {
        answers(&client, &server, "acme", 1).await;
        if learned
            .allowance("acme", "m")
            .is_some_and(|tokens| tokens >= 2_000)
        {
            followed = Some(i);
            break;
        }
    }
    let followed = followed.expect("the allowance followed within 50 requests");
    println!("the allowance followed 2,000-token answers after {followed} requests");
    let snapshot = learned.snapshot();
    let acme = snapshot.iter().find(|l| l.tenant == "acme").unwrap();
    assert_eq!((acme.model.as_str(), acme.samples), ("m", 50 + followed));
    assert!(acme.allowance.is_some_and(|tokens| tokens >= 2_000));
}

#[tokio::test]
async fn in_flight_is_never_below_what_a_stream_has_produced() {
    let tracker = Arc::new(TenantTokenTracker::new(100_000));
    let learned = Arc::new(AdaptiveOutput::new());
    let (server, mut streams) = app(layer(&tracker, &learned), Arc::new(16.into())).await;
    let client = client();
    answers(&client, &server, "acme", 10).await;
    let allowance = learned.allowance("acme", "m").expect("learned");
    assert!(allowance < 100);

    // A stream of 2,000 tokens (40 bytes of text, 10 tokens, a chunk) against that.
    let response = send(&client, chat(&server, "acme", true)).await;
    let sender = streams.next().await;
    let mut body = response.into_body();
    assert_eq!(tracker.in_flight("acme"), PROMPT + allowance);
    for produced in (10..=2_000).step_by(10) {
        let data = chunk(&"abcd".repeat(10));
        sender.send(data.clone()).unwrap();
        assert_eq!(next_data(&mut body).await, Some(data));
        let in_flight = tracker.in_flight("acme");
        assert!(
            in_flight >= produced,
            "{in_flight} in flight after {produced} tokens streamed"
        );
    }
    let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\
                 \"completion_tokens\":2000,\"total_tokens\":2004}}\n\n";
    sender.send(Bytes::from_static(usage.as_bytes())).unwrap();
    assert!(next_data(&mut body).await.is_some());
    drop(sender);
    assert_eq!(next_data(&mut body).await, None);
    assert_eq!(tracker.in_flight("acme"), 0);
    // The stream ran to its end: it is learned from (the largest of 11 counts, plus a
    // quarter).
    assert_eq!(learned.allowance("acme", "m"), Some(2_500));
    // A client gone mid-stream teaches nothing.
    let response = send(&client, chat(&server, "acme", true)).await;
    let sender = streams.next().await;
    sender.send(chunk(&"abcd".repeat(1_000))).unwrap();
    drop(response);
    settled(&tracker, "acme").await;
    assert_eq!(learned.snapshot()[0].samples, 11);
}

#[tokio::test]
async fn explicit_limits_are_capped_at_the_learned_allowance_only_when_asked() {
    for cap in [false, true] {
        let tracker = Arc::new(TenantTokenTracker::new(100_000));
        let learned = Arc::new(AdaptiveOutput::new().cap_explicit_limits(cap));
        let output = Arc::new(AtomicU64::new(16));
        let (server, mut streams) = app(layer(&tracker, &learned), output).await;
        let client = client();

        // Ten answers of 16 tokens to requests that allow 4,000.
        for _ in 0..10 {
            let reply = call(&client, limited_chat(&server, "acme", false, Some(4_000))).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        }
        let response = send(&client, limited_chat(&server, "acme", true, Some(4_000))).await;
        let sender = streams.next().await;
        let held = tracker.in_flight("acme");
        if cap {
            assert!(held <= 110, "a capped stream holds {held}");
        } else {
            assert_eq!(held, PROMPT + 4_000);
            assert!(
                learned.snapshot().is_empty(),
                "limited requests are not learned from"
            );
        }
        // A stream that produces more than its capped reservation is grown as it goes.
        let mut body = response.into_body();
        sender.send(chunk(&"a".repeat(2_000))).unwrap();
        assert!(next_data(&mut body).await.is_some());
        assert!(tracker.in_flight("acme") >= PROMPT + 500);
        drop(sender);
        assert_eq!(next_data(&mut body).await, None);
        settled(&tracker, "acme").await;
    }
}

#[tokio::test]
async fn a_guessed_allowance_never_locks_a_tenant_out() {
    // A cap smaller than the estimator's default output allowance (1,024).
    let tracker = Arc::new(TenantTokenTracker::new(600));
    let learned = Arc::new(AdaptiveOutput::new());
    let output = Arc::new(AtomicU64::new(3_000));
    let (server, mut streams) = app(layer(&tracker, &learned), output.clone()).await;
    let client = client();

    // Nothing learned yet: the default is cut to the cap, and the request admitted.
    let held = held_by_a_stream(&client, &server, &mut streams, &tracker, "acme").await;
    assert_eq!(held, 600);
    // An explicit limit that can never fit is still the client's to fix.
    let reply = call(&client, limited_chat(&server, "acme", false, Some(1_000))).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );

    // Ten long answers teach an allowance far above the cap; every request is admitted.
    answers(&client, &server, "acme", 10).await;
    let allowance = learned.allowance("acme", "m").expect("learned");
    assert!(allowance > 600, "allowance {allowance}");
    let held = held_by_a_stream(&client, &server, &mut streams, &tracker, "acme").await;
    assert_eq!(held, 600);

    // The answers shorten: still admitted, so the allowance comes down.
    output.store(20, Ordering::Relaxed);
    let mut came_down = None;
    for i in 1..=40 {
        answers(&client, &server, "acme", 1).await;
        if learned.allowance("acme", "m") == Some(64) {
            came_down = Some(i);
            break;
        }
    }
    let came_down = came_down.expect("the allowance came down within 40 answers");
    println!("an allowance of {allowance} came down to 64 after {came_down} short answers");
    assert!(streams_held(&client, &server, &mut streams, "acme").await >= 8);
    settled(&tracker, "acme").await;
}

#[tokio::test]
async fn a_guess_is_cut_to_the_smallest_budget_too() {
    let tracker = Arc::new(TenantTokenTracker::new(10_000));
    let upstream = Arc::new(TenantTokenTracker::new(300));
    let learned = Arc::new(AdaptiveOutput::new());
    let layer = layer(&tracker, &learned).shared_budget(tower_tenant_tokens::SharedBudget::new(
        "upstream",
        upstream.clone(),
    ));
    let (server, mut streams) = app(layer, Arc::new(16.into())).await;
    let client = client();
    let response = send(&client, chat(&server, "acme", true)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let sender = streams.next().await;
    assert_eq!(tracker.in_flight("acme"), 300);
    assert_eq!(upstream.in_flight("upstream"), 300);
    drop(sender);
    assert_eq!(next_data(&mut response.into_body()).await, None);
    assert_eq!(upstream.in_flight("upstream"), 0);
    let reply = call(&client, limited_chat(&server, "acme", false, Some(400))).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    settled(&tracker, "acme").await;
}

#[tokio::test]
async fn a_stream_read_to_its_end_marker_teaches_though_the_client_hangs_up() {
    let tracker = Arc::new(TenantTokenTracker::new(100_000));
    let learned = Arc::new(AdaptiveOutput::new());
    let (server, mut streams) = app(layer(&tracker, &learned), Arc::new(16.into())).await;
    let client = client();
    // As an SDK does: read up to `[DONE]`, then close the connection without waiting for
    // the end of the body. The upstream has not ended it yet.
    let ends = [
        "data: [DONE]\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\": \"stop\"}]}\n\n",
    ];
    let mut senders = Vec::new();
    for i in 0..10 {
        let response = send(&client, chat(&server, "acme", true)).await;
        let sender = streams.next().await;
        let mut body = response.into_body();
        let data = chunk(&"abcd".repeat(100));
        sender.send(data.clone()).unwrap();
        assert_eq!(next_data(&mut body).await, Some(data));
        let end = Bytes::from_static(ends[i % 2].as_bytes());
        sender.send(end.clone()).unwrap();
        assert_eq!(next_data(&mut body).await, Some(end));
        drop(body);
        settled(&tracker, "acme").await;
        senders.push(sender); // the upstream's side stays open
    }
    let snapshot = learned.snapshot();
    assert_eq!(snapshot[0].samples, 10, "every stream taught: {snapshot:?}");
    assert_eq!(learned.allowance("acme", "m"), Some(125));
}
