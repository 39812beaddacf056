//! Asking streamed chat completions for their usage
//! (`TenantTokenLayer::ask_stream_usage`), over real HTTP against an upstream that answers
//! as OpenAI does: the reservation settles on the reported usage, and the client receives
//! exactly the stream it would have received without the option.
#![cfg(feature = "openai")]

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use tower_tenant_tokens::{OpenAiEstimator, TenantTokenLayer, TenantTokenTracker};

/// The request bodies the upstream received.
type Seen = Arc<Mutex<Vec<Bytes>>>;

const WORDS: [&str; 3] = ["Hel", "lo", " there"];
const REPORTED_TOTAL: u64 = 705;

/// One chunk of the answer, as OpenAI sends it: with `"usage":null` when usage was asked.
fn chunk(choices: &str, asked: bool) -> String {
    let usage = if asked { ",\"usage\":null" } else { "" };
    format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\
         \"model\":\"m\",\"choices\":[{choices}]{usage}}}\n\n"
    )
}

/// The upstream's answer to a streamed request, frame by frame; the usage chunk (when
/// asked) comes split across two frames.
fn answer(asked: bool) -> Vec<Bytes> {
    let mut frames: Vec<String> = WORDS
        .iter()
        .map(|word| {
            let delta = format!(
                "{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}},\"finish_reason\":null}}"
            );
            chunk(&delta, asked)
        })
        .collect();
    frames.push(chunk(
        "{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}",
        asked,
    ));
    if asked {
        let usage = format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\
             \"model\":\"m\",\"choices\":[],\"usage\":{{\"prompt_tokens\":5,\
             \"completion_tokens\":700,\"total_tokens\":{REPORTED_TOTAL}}}}}\n\n"
        );
        let (first, second) = usage.split_at(40);
        frames.push(first.to_owned());
        frames.push(second.to_owned());
    }
    frames.push("data: [DONE]\n\n".to_owned());
    frames.into_iter().map(Bytes::from).collect()
}

/// An app whose `/v1/chat/completions` answers as OpenAI does, behind `layer`.
async fn app(layer: TenantTokenLayer) -> (TestServer, Seen) {
    let seen = Seen::default();
    let record = seen.clone();
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(move |body: Bytes| {
                record.lock().unwrap().push(body.clone());
                async move {
                    let request: serde_json::Value = match serde_json::from_slice(&body) {
                        Ok(request) => request,
                        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
                    };
                    if request["stream"] != true {
                        return ([(CONTENT_TYPE, "application/json")], "{\"usage\":{}}")
                            .into_response();
                    }
                    let asked = request["stream_options"]["include_usage"] == true;
                    let frames = answer(asked).into_iter().map(Ok::<_, std::io::Error>);
                    let body = Body::from_stream(futures_util::stream::iter(frames));
                    ([(CONTENT_TYPE, "text/event-stream")], body).into_response()
                }
            }),
        )
        .layer(layer);
    (serve(app).await, seen)
}

fn chat(server: &TestServer, body: &'static str) -> Request<ReqBody> {
    Request::post(server.url("/v1/chat/completions"))
        .header("x-tenant-id", "acme")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(full(body))
        .unwrap()
}

fn layer(tracker: &Arc<TenantTokenTracker>) -> TenantTokenLayer {
    TenantTokenLayer::new(tracker.clone()).estimator(OpenAiEstimator::new())
}

const STREAM: &str =
    r#"{"model":"m","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn asked_usage_settles_the_reservation_and_the_client_gets_the_stream_unasked() {
    let client = client();

    let plain_tracker = Arc::new(TenantTokenTracker::new(10_000));
    let (plain, plain_seen) = app(layer(&plain_tracker).read_usage(true)).await;
    let unasked = call(&client, chat(&plain, STREAM)).await;
    assert_eq!(unasked.status, StatusCode::OK);
    assert_eq!(plain_seen.lock().unwrap()[0], STREAM.as_bytes());
    let estimate = plain_tracker.tenant_state("acme").unwrap().high_water;
    assert!(estimate < 100, "{estimate}");

    let tracker = Arc::new(TenantTokenTracker::new(10_000));
    let (server, seen) = app(layer(&tracker).ask_stream_usage(true)).await;
    let asked = call(&client, chat(&server, STREAM)).await;
    assert_eq!(asked.status, StatusCode::OK);

    // The upstream was asked (and could read the longer body: its length was made to match).
    let forwarded: serde_json::Value = serde_json::from_slice(&seen.lock().unwrap()[0]).unwrap();
    assert_eq!(forwarded["stream_options"]["include_usage"], true);
    assert_eq!(forwarded["messages"][0]["content"], "hi");
    // The client got byte for byte what it gets from a layer that does not ask.
    assert_eq!(asked.text(), unasked.text());
    assert!(!asked.text().contains("usage"), "{}", asked.text());
    assert_eq!(asked.text().matches("data: ").count(), WORDS.len() + 2);
    // The reservation followed the reported usage, and was released.
    let state = tracker.tenant_state("acme").unwrap();
    assert_eq!((state.in_flight, state.high_water), (0, REPORTED_TOTAL));
}

#[tokio::test]
async fn a_client_that_chose_is_forwarded_as_it_came_and_gets_its_usage() {
    let tracker = Arc::new(TenantTokenTracker::new(10_000));
    let (server, seen) = app(layer(&tracker).ask_stream_usage(true)).await;
    let client = client();

    let wants = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":10,"messages":[]}"#;
    let reply = call(&client, chat(&server, wants)).await;
    assert_eq!(seen.lock().unwrap()[0], wants.as_bytes());
    assert_eq!(
        reply.body,
        answer(true).concat(),
        "its usage chunk reaches it"
    );
    assert_eq!(
        tracker.tenant_state("acme").unwrap().high_water,
        REPORTED_TOTAL
    );

    for body in [
        r#"{"model":"m","stream":true,"stream_options":{"include_usage":false},"messages":[]}"#,
        r#"{"model":"m","stream":false,"messages":[]}"#,
        r#"{"model":"m","messages":[]}"#,
    ] {
        let reply = call(&client, chat(&server, body)).await;
        assert_eq!(reply.status, StatusCode::OK, "{body}");
        assert_eq!(seen.lock().unwrap().last().unwrap(), body.as_bytes());
        if body.contains("\"stream\":true") {
            assert_eq!(reply.body, answer(false).concat(), "{body}");
        }
    }
    assert_eq!(tracker.in_flight("acme"), 0);
}
