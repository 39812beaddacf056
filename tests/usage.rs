//! Reading reported usage from responses (`TenantTokenLayer::read_usage`), over real HTTP:
//! bytes pass unchanged, the reservation grows with what a stream has produced, and ends
//! on the reported total.
#![cfg(feature = "openai")]

mod common;

use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use tower_tenant_tokens::{OpenAiEstimator, TenantTokenLayer, TenantTokenTracker};

/// An app whose `/stream` answers server-sent events the test drives, and whose `/json`
/// answers `body` as JSON.
async fn app(layer: TenantTokenLayer, body: &'static str) -> (TestServer, Streams) {
    let (source, streams) = streams();
    let app = Router::new()
        .route(
            "/stream",
            post(move || {
                let body = source.body();
                async move { ([(CONTENT_TYPE, "text/event-stream")], body).into_response() }
            }),
        )
        .route(
            "/json",
            post(move || async move { ([(CONTENT_TYPE, "application/json")], body) }),
        )
        .layer(layer);
    (serve(app).await, streams)
}

fn chunk(content: &str) -> Bytes {
    let event = serde_json::json!({"choices": [{"index": 0, "delta": {"content": content}}]});
    Bytes::from(format!("data: {event}\n\n"))
}

const USAGE_CHUNK: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\
                           \"completion_tokens\":700,\"total_tokens\":710}}\n\n";

#[tokio::test]
async fn a_stream_that_outruns_its_estimate_grows_the_reservation_as_it_passes() {
    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let layer = TenantTokenLayer::new(tracker.clone()).read_usage(true);
    let (server, mut streams) = app(layer, "").await;
    let client = client();

    let response = send(&client, metered(&server, "/stream", "acme", 100)).await;
    let chunks = streams.next().await;
    let mut body = response.into_body();
    assert_eq!(tracker.in_flight("acme"), 100);

    // 200 bytes of content: 50 tokens, under the estimate.
    let small = chunk(&"a".repeat(200));
    chunks.send(small.clone()).unwrap();
    assert_eq!(next_data(&mut body).await, Some(small));
    assert_eq!(tracker.in_flight("acme"), 100);
    // 2,000 bytes in all, split mid-event: 500 tokens produced, held as it passes.
    let big = chunk(&"é".repeat(900)); // 1,800 bytes decoded
    let (first, second) = big.split_at(700);
    chunks.send(Bytes::copy_from_slice(first)).unwrap();
    assert_eq!(next_data(&mut body).await.as_deref(), Some(first));
    assert_eq!(tracker.in_flight("acme"), 100, "the event is not finished");
    chunks.send(Bytes::copy_from_slice(second)).unwrap();
    assert_eq!(next_data(&mut body).await.as_deref(), Some(second));
    assert_eq!(tracker.in_flight("acme"), 500);
    // Reported usage counts over the text counted.
    chunks
        .send(Bytes::from_static(USAGE_CHUNK.as_bytes()))
        .unwrap();
    assert_eq!(
        next_data(&mut body).await.as_deref(),
        Some(USAGE_CHUNK.as_bytes())
    );
    assert_eq!(tracker.in_flight("acme"), 710);
    let state = tracker.tenant_state("acme").unwrap();
    assert_eq!((state.high_water, state.overcommits), (710, 0));

    drop(chunks);
    assert_eq!(next_data(&mut body).await, None);
    assert_eq!(tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn growth_past_the_cap_is_allowed_and_counted_as_overcommit() {
    let tracker = Arc::new(TenantTokenTracker::new(300));
    let layer = TenantTokenLayer::new(tracker.clone()).read_usage(true);
    let (server, mut streams) = app(layer, "").await;
    let client = client();

    let response = send(&client, metered(&server, "/stream", "acme", 200)).await;
    let chunks = streams.next().await;
    let mut body = response.into_body();
    chunks.send(chunk(&"x".repeat(2_000))).unwrap();
    next_data(&mut body).await.unwrap();
    assert_eq!(
        tracker.in_flight("acme"),
        500,
        "admitted work is never refused"
    );
    assert_eq!(tracker.tenant_state("acme").unwrap().overcommits, 1);
    // Growing further past the cap is the same request: still one.
    for _ in 0..5 {
        chunks.send(chunk(&"x".repeat(400))).unwrap();
        next_data(&mut body).await.unwrap();
    }
    assert_eq!(tracker.in_flight("acme"), 1_000);
    assert_eq!(tracker.tenant_state("acme").unwrap().overcommits, 1);
    // Over the cap now: the next request waits its turn.
    let refused = call(&client, metered(&server, "/json", "acme", 1)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);

    drop(chunks);
    assert_eq!(next_data(&mut body).await, None);
    assert_eq!(tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn the_prompt_part_of_an_openai_estimate_counts_before_any_output() {
    let tracker = Arc::new(TenantTokenTracker::new(10_000));
    let layer = TenantTokenLayer::new(tracker.clone())
        .estimator(OpenAiEstimator::new())
        .read_usage(true);
    let (server, mut streams) = app(layer, "").await;
    let client = client();

    // Prompt: "user" + 396 bytes = 400 bytes, 100 tokens; output allowance 5.
    let request = serde_json::json!({
        "model": "m", "max_tokens": 5, "stream": true,
        "messages": [{"role": "user", "content": "p".repeat(396)}],
    });
    let request = Request::post(server.url("/stream"))
        .header("x-tenant-id", "acme")
        .body(full(request.to_string()))
        .unwrap();
    let response = send(&client, request).await;
    let chunks = streams.next().await;
    let mut body = response.into_body();
    assert_eq!(tracker.in_flight("acme"), 105);
    // 40 bytes: 10 tokens of output, past the allowance of 5.
    chunks.send(chunk(&"o".repeat(40))).unwrap();
    next_data(&mut body).await.unwrap();
    assert_eq!(tracker.in_flight("acme"), 110);
    drop(chunks);
    assert_eq!(next_data(&mut body).await, None);
    assert_eq!(tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn bytes_pass_through_unchanged_and_garbage_usage_is_ignored() {
    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let layer = TenantTokenLayer::new(tracker.clone()).read_usage(true);
    let garbage = r#"{"usage":{"prompt_tokens":-1,"completion_tokens":"x"},"usage":[1,2"#;
    let (server, mut streams) = app(layer, garbage).await;
    let client = client();

    let reply = call(&client, metered(&server, "/json", "acme", 100)).await;
    assert_eq!((reply.status, reply.text()), (StatusCode::OK, garbage));
    assert_eq!(tracker.in_flight("acme"), 0);
    assert_eq!(tracker.tenant_state("acme").unwrap().high_water, 100);

    let response = send(&client, metered(&server, "/stream", "acme", 100)).await;
    let chunks = streams.next().await;
    let sent: Vec<Bytes> = [
        "data: {\"choices\":[{\"delta\":{\"content\":",
        "\"hi\"}}]}\r\n\r\ndata: {garbage\n\n",
        "data: {\"usage\":{\"input_tokens\":1e99}}\n\ndata: [DONE]\n\n",
    ]
    .into_iter()
    .map(Bytes::from)
    .collect();
    for piece in &sent {
        chunks.send(piece.clone()).unwrap();
    }
    drop(chunks);
    let reply = read(response).await;
    assert_eq!(reply.body, sent.concat());
    assert_eq!(tracker.in_flight("acme"), 0);
    assert_eq!(tracker.tenant_state("acme").unwrap().overcommits, 0);
}

#[tokio::test]
async fn a_json_answer_reporting_more_than_the_estimate_is_settled_on_it() {
    let tracker = Arc::new(TenantTokenTracker::new(10_000));
    let layer = TenantTokenLayer::new(tracker.clone()).read_usage(true);
    let answer =
        r#"{"id":"r","usage":{"input_tokens":300,"output_tokens":450,"total_tokens":750}}"#;
    let (server, _streams) = app(layer, answer).await;
    let reply = call(&client(), metered(&server, "/json", "acme", 100)).await;
    assert_eq!(reply.text(), answer);
    let state = tracker.tenant_state("acme").unwrap();
    assert_eq!((state.in_flight, state.high_water), (0, 750));
}

#[tokio::test]
async fn a_layer_that_does_not_read_usage_leaves_the_reservation_alone() {
    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let layer = TenantTokenLayer::new(tracker.clone());
    let (server, mut streams) = app(layer, "").await;
    let client = client();
    let response = send(&client, metered(&server, "/stream", "acme", 100)).await;
    let chunks = streams.next().await;
    let mut body = response.into_body();
    chunks
        .send(Bytes::from_static(USAGE_CHUNK.as_bytes()))
        .unwrap();
    next_data(&mut body).await.unwrap();
    assert_eq!(tracker.in_flight("acme"), 100);
    drop(chunks);
    assert_eq!(next_data(&mut body).await, None);
    assert_eq!(tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn a_client_gone_mid_stream_releases_everything_grown() {
    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let layer = TenantTokenLayer::new(tracker.clone()).read_usage(true);
    let (server, mut streams) = app(layer, "").await;
    let client = client();
    let response = send(&client, metered(&server, "/stream", "acme", 100)).await;
    let chunks = streams.next().await;
    let mut body = response.into_body();
    chunks.send(chunk(&"x".repeat(1_200))).unwrap();
    next_data(&mut body).await.unwrap();
    assert_eq!(tracker.in_flight("acme"), 300);
    drop(body);
    // The server finds out when it next writes.
    let _ = chunks.send(chunk("more"));
    wait_for_in_flight(&tracker, "acme", 0).await;
}
