//! Estimators over HTTP: the OpenAI body estimator inside an axum router, and the
//! `Content-Length`, closure and body-closure estimators.

mod common;

use std::sync::Arc;

use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use tower_tenant_tokens::{
    EstimateError, Estimator, MissingEstimate, OpenAiEstimator, ReservationHandle,
    TenantTokenLayer, TenantTokenTracker,
};

/// A server whose handler echoes the request body and reports the tokens it holds in
/// `x-reserved`; every call that reaches it is counted.
struct Echo {
    server: TestServer,
    tracker: Arc<TenantTokenTracker>,
    calls: Calls,
}

async fn echo(cap: u64, estimator: impl Into<Estimator>) -> Echo {
    echo_with(cap, move |layer| layer.estimator(estimator)).await
}

async fn echo_with(cap: u64, configure: impl FnOnce(TenantTokenLayer) -> TenantTokenLayer) -> Echo {
    let tracker = Arc::new(TenantTokenTracker::new(cap));
    let calls = Calls::default();
    let handler = {
        let calls = calls.clone();
        move |Extension(handle): Extension<ReservationHandle>, body: Bytes| {
            calls.hit();
            async move { ([("x-reserved", handle.tokens().to_string())], body) }
        }
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(handler))
        .layer(configure(
            TenantTokenLayer::new(tracker.clone()).reservation_handle(true),
        ));
    Echo {
        server: serve(app).await,
        tracker,
        calls,
    }
}

impl Echo {
    fn request(&self, body: ReqBody) -> Request<ReqBody> {
        Request::post(self.server.url("/v1/chat/completions"))
            .header("x-tenant-id", "acme")
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    }

    async fn send(&self, body: ReqBody) -> Reply {
        call(&client(), self.request(body)).await
    }

    /// Sends `body` with `Content-Length`, then chunked in three pieces without it, and
    /// returns the tokens reserved, checking the handler got the very same bytes.
    async fn reserved_for(&self, body: &[u8]) -> u64 {
        let third = body.len() / 3;
        let pieces = vec![
            Bytes::copy_from_slice(&body[..third]),
            Bytes::copy_from_slice(&body[third..2 * third]),
            Bytes::copy_from_slice(&body[2 * third..]),
        ];
        let mut reserved = Vec::new();
        for request_body in [full(body.to_vec()), chunked(pieces)] {
            let reply = self.send(request_body).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(reply.body, body, "the handler gets the identical bytes");
            reserved.push(reply.header("x-reserved").unwrap().parse::<u64>().unwrap());
        }
        assert_eq!(
            reserved[0], reserved[1],
            "framing does not change the estimate"
        );
        assert_eq!(self.tracker.in_flight("acme"), 0);
        reserved[0]
    }

    async fn assert_still_serving(&self) {
        let body = br#"{"max_tokens":1,"messages":[]}"#;
        let reply = self.send(full(&body[..])).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, &body[..]);
        assert_eq!(self.tracker.in_flight("acme"), 0);
    }
}

const CHAT_BODIES: &[&str] = &[
    r#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"Hello there, model!"}]}"#,
    r#"{"model":"gpt-4o","messages":[{"role":"system","content":"Réponds en français, s'il te plaît. 日本語も"},{"role":"user","content":"Bonjour"}]}"#,
    r#"{"model":"gpt-4o","n":3,"max_completion_tokens":50,"messages":[{"role":"user","content":"pick"}],"tools":[{"type":"function","function":{"name":"lookup","description":"Look a word up","parameters":{"type":"object","properties":{"word":{"type":"string"}}}}}]}"#,
    r#"{"model":"davinci","prompt":[1,2,3,4,5,6,7,8,9,10],"max_tokens":20}"#,
    r#"{"model":"gpt-4o","max_tokens":10,"messages":[{"role":"user","content":[{"type":"text","text":"what is this?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"}}]}]}"#,
    r#"{"model":"o4","instructions":"Be brief.","input":"Summarise the plot of Hamlet.","max_output_tokens":300,"metadata":{"deep":{"er":[1,2,{"x":"y"}]}},"stream":true}"#,
    "{ \"max_tokens\" : 7 ,\n  \"messages\" : [ { \"role\" : \"user\" , \"content\" : \"spaced out\" } ] }\n",
];

#[tokio::test]
async fn openai_estimate_over_http_equals_the_estimator_and_the_body_arrives_intact() {
    let app = echo(1_000_000, OpenAiEstimator::new()).await;
    let estimator = OpenAiEstimator::new();
    for body in CHAT_BODIES {
        let expected = estimator.estimate(body.as_bytes()).unwrap();
        assert_eq!(app.reserved_for(body.as_bytes()).await, expected, "{body}");
    }
    // One worked by hand: "user" + "Hello there, model!" = 23 bytes = 6 tokens, plus 100.
    assert_eq!(app.reserved_for(CHAT_BODIES[0].as_bytes()).await, 106);
    assert_eq!(app.calls.get(), 2 * CHAT_BODIES.len() + 2);
}

#[tokio::test]
async fn openai_estimator_settings_apply_over_http() {
    let estimator = OpenAiEstimator::new()
        .default_output_tokens(10)
        .bytes_per_token(1);
    let app = echo(1_000_000, estimator.clone()).await;
    let body = br#"{"messages":[{"role":"user","content":"abcdef"}]}"#;
    // "user" + "abcdef" = 10 bytes at 1 byte a token, plus the default 10 output tokens.
    assert_eq!(estimator.estimate(body).unwrap(), 20);
    assert_eq!(app.reserved_for(body).await, 20);
}

#[tokio::test]
async fn openai_malformed_json_is_400_invalid_json_and_never_reaches_the_handler() {
    let app = echo(100_000, OpenAiEstimator::new()).await;
    for body in [
        "not json",
        "",
        "{",
        "[1,2]",
        "null",
        "\"a string\"",
        r#"{"messages":[}"#,
        r#"{"max_tokens":1} trailing"#,
        r#"{"messages":"unterminated}"#,
    ] {
        let reply = app.send(full(body)).await;
        let code = assert_openai_error(&reply, StatusCode::BAD_REQUEST);
        assert_eq!(code, "invalid_json", "body {body:?}: {}", reply.text());
    }
    assert_eq!(app.calls.get(), 0);
    assert_eq!(app.tracker.tracked_tenants(), 0);
    app.assert_still_serving().await;
}

/// A JSON body of exactly `len` bytes.
fn json_of_len(len: usize) -> Vec<u8> {
    let mut body = br#"{"max_tokens":5,"messages":[]}"#.to_vec();
    assert!(body.len() <= len);
    body.resize(len, b' '); // trailing whitespace is still valid JSON
    body
}

#[tokio::test]
async fn openai_body_over_the_limit_is_413_with_or_without_content_length() {
    let app = echo(100_000, OpenAiEstimator::new().body_limit(256)).await;

    let exact = json_of_len(256);
    assert_eq!(
        app.reserved_for(&exact).await,
        5,
        "a body at the limit is read"
    );

    let over = json_of_len(257);
    let reply = app.send(full(over.clone())).await;
    let code = assert_openai_error(&reply, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(code, "body_too_large");
    assert_eq!(reply.header("retry-after"), None);

    // Chunked: no Content-Length to go by, so the limit is found while reading.
    let pieces: Vec<Bytes> = over.chunks(40).map(Bytes::copy_from_slice).collect();
    let reply = app.send(chunked(pieces)).await;
    let code = assert_openai_error(&reply, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(code, "body_too_large");

    // Far over the limit, in one chunk.
    let reply = app.send(chunked([json_of_len(2_000)])).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);

    assert_eq!(
        app.calls.get(),
        2,
        "only the two bodies at the limit got through"
    );
    assert_eq!(app.tracker.in_flight("acme"), 0);
    app.assert_still_serving().await;
}

#[tokio::test]
async fn a_content_length_over_the_limit_is_refused_before_the_body_is_sent() {
    let app = echo(100_000, OpenAiEstimator::new().body_limit(256)).await;
    // The head announces 1,000 bytes and none follow: the answer cannot wait for them.
    let mut socket = raw_send(
        app.server.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\nx-tenant-id: acme\r\n\
          content-length: 1000\r\n\r\n",
    )
    .await;
    let mut answer = Vec::new();
    raw_read_until(&mut socket, &mut answer, b"body_too_large").await;
    assert!(answer.starts_with(b"HTTP/1.1 413 "));
    drop(socket);
    assert_eq!(app.calls.get(), 0);
    assert_eq!(app.tracker.tracked_tenants(), 0);
    app.assert_still_serving().await;
}

#[tokio::test]
async fn openai_unusable_max_tokens_is_400_invalid_token_estimate() {
    let app = echo(100_000, OpenAiEstimator::new()).await;
    for field in [
        r#""max_tokens":-1"#,
        r#""max_tokens":1.5"#,
        r#""max_tokens":"100""#,
        r#""max_tokens":1e30"#,
        r#""max_tokens":18446744073709551616"#,
        r#""max_tokens":true"#,
        r#""max_tokens":[100]"#,
        r#""max_tokens":{"value":100}"#,
        r#""max_completion_tokens":-5"#,
        r#""max_output_tokens":"lots""#,
        r#""n":-1"#,
        r#""n":2.5"#,
    ] {
        let body = format!(r#"{{"model":"m",{field},"messages":[]}}"#);
        let reply = app.send(full(body.clone())).await;
        let code = assert_openai_error(&reply, StatusCode::BAD_REQUEST);
        assert_eq!(code, "invalid_token_estimate", "{body}: {}", reply.text());
    }
    assert_eq!(app.calls.get(), 0);
    assert_eq!(app.tracker.tracked_tenants(), 0);

    // `null` means "not given": the default output allowance applies.
    let body = br#"{"max_tokens":null,"messages":[]}"#;
    assert_eq!(app.reserved_for(body).await, 1024);
}

#[tokio::test]
async fn openai_estimate_over_the_cap_is_413_request_too_large() {
    let app = echo(2_000, OpenAiEstimator::new()).await;
    let body = br#"{"max_tokens":5000,"messages":[{"role":"user","content":"hi"}]}"#;
    let reply = app.send(full(&body[..])).await;
    let code = assert_openai_error(&reply, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(code, "request_too_large");
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("2000"));
    assert_eq!(reply.header("retry-after"), None);

    // n multiplies the output allowance, saturating rather than wrapping.
    let body = format!(r#"{{"max_tokens":{},"n":4,"messages":[]}}"#, u64::MAX / 2);
    let reply = app.send(full(body)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);

    assert_eq!(app.calls.get(), 0);
    assert_eq!(app.tracker.tracked_tenants(), 0);
    app.assert_still_serving().await;
}

#[tokio::test]
async fn openai_deeply_nested_json_is_400_and_does_not_crash_the_server() {
    let app = echo(100_000, OpenAiEstimator::new()).await;
    let depth = 10_000;
    let nested_arrays = format!(
        r#"{{"max_tokens":1,"messages":{}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let nested_objects = format!(
        r#"{{"max_tokens":1,"messages":[{}"text"{}]}}"#,
        r#"{"content":"#.repeat(depth),
        "}".repeat(depth)
    );
    let nested_in_input = format!(
        r#"{{"input":{}"text"{}}}"#,
        r#"[{"content":"#.repeat(depth),
        "}]".repeat(depth)
    );
    for body in [nested_arrays, nested_objects, nested_in_input] {
        let reply = app.send(full(body)).await;
        let code = assert_openai_error(&reply, StatusCode::BAD_REQUEST);
        assert_eq!(code, "invalid_json", "{}", reply.text());
    }
    assert_eq!(app.calls.get(), 0);
    assert_eq!(app.tracker.tracked_tenants(), 0);
    app.assert_still_serving().await;

    // Ordinary nesting is fine.
    let body = format!(
        r#"{{"max_tokens":1,"messages":{}"abcd"{}}}"#,
        "[".repeat(20),
        "]".repeat(20)
    );
    assert_eq!(app.reserved_for(body.as_bytes()).await, 2);
}

#[tokio::test]
async fn openai_deep_nesting_in_a_skipped_field_is_forwarded_untouched() {
    // Fields the estimate does not read are skipped without recursion, so depth there is
    // harmless to the layer: the request is estimated and passed on as it came.
    let app = echo(100_000, OpenAiEstimator::new()).await;
    let depth = 10_000;
    let body = format!(
        r#"{{"max_tokens":3,"metadata":{}1{},"messages":[{{"role":"user","content":"hi"}}]}}"#,
        r#"{"a":"#.repeat(depth),
        "}".repeat(depth)
    );
    let expected = OpenAiEstimator::new().estimate(body.as_bytes()).unwrap();
    assert_eq!(
        expected,
        3 + 2,
        "\"user\" + \"hi\" = 6 bytes = 2 tokens, plus 3"
    );
    let reply = app.send(full(body.clone())).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-reserved"), Some("5"));
    assert!(reply.body == body.as_bytes(), "the body arrives intact");
    assert_eq!(app.tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn content_length_estimator_charges_a_token_per_four_bytes_rounded_up() {
    let app = echo(1_000, Estimator::content_length(4)).await;
    assert_eq!(
        app.send(full("0123456789")).await.header("x-reserved"),
        Some("3")
    );
    assert_eq!(
        app.send(full("01234567")).await.header("x-reserved"),
        Some("2")
    );
    let reply = app.send(full("x".repeat(4_000))).await;
    assert_eq!(reply.header("x-reserved"), Some("1000"));
    assert_eq!(
        reply.body.len(),
        4_000,
        "the body streams through untouched"
    );
    let reply = app.send(full("x".repeat(4_001))).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("1000"));

    // A chunked upload has no Content-Length, so no estimate.
    let reply = app.send(chunked(["0123", "4567"])).await;
    let code = assert_openai_error(&reply, StatusCode::BAD_REQUEST);
    assert_eq!(code, "missing_token_estimate");
    assert_eq!(app.calls.get(), 3);
    assert_eq!(app.tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn content_length_estimator_with_a_default_for_chunked_uploads() {
    let app = echo_with(1_000, |layer| {
        layer
            .estimator(Estimator::content_length(4))
            .on_missing_estimate(MissingEstimate::Default(7))
    })
    .await;
    let reply = app.send(chunked(["0123", "4567"])).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-reserved"), Some("7"));
    assert_eq!(reply.body, "01234567");
    assert_eq!(
        app.send(full("0123456789")).await.header("x-reserved"),
        Some("3")
    );
}

#[tokio::test]
async fn estimator_from_fn_prices_requests_from_their_head() {
    let app = echo(
        1_000,
        Estimator::from_fn(
            |parts| match parts.headers.get("x-model").map(|v| v.as_bytes()) {
                None => Ok(None),
                Some(b"small") => Ok(Some(100)),
                Some(b"large") => Ok(Some(900)),
                Some(b"huge") => Ok(Some(5_000)),
                Some(_) => Err(EstimateError::invalid("unknown model")),
            },
        ),
    )
    .await;
    let with_model = |model: &str| {
        let mut request = app.request(full("payload"));
        request
            .headers_mut()
            .insert("x-model", model.parse().unwrap());
        request
    };

    let reply = call(&client(), with_model("small")).await;
    assert_eq!(reply.header("x-reserved"), Some("100"));
    assert_eq!(reply.body, "payload");
    let reply = call(&client(), with_model("large")).await;
    assert_eq!(reply.header("x-reserved"), Some("900"));

    let reply = call(&client(), with_model("medium")).await;
    let code = assert_openai_error(&reply, StatusCode::BAD_REQUEST);
    assert_eq!(code, "invalid_token_estimate");
    assert!(reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown model"));

    let reply = call(&client(), with_model("huge")).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);

    let reply = app.send(full("payload")).await;
    let code = assert_openai_error(&reply, StatusCode::BAD_REQUEST);
    assert_eq!(code, "missing_token_estimate");

    assert_eq!(app.calls.get(), 2);
    assert_eq!(app.tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn estimator_from_body_fn_sees_the_whole_body_and_the_handler_gets_it_too() {
    let app = echo(
        1_000,
        Estimator::from_body_fn(1_024, |parts, body| {
            assert_eq!(parts.uri.path(), "/v1/chat/completions");
            match std::str::from_utf8(body) {
                Ok(text) => Ok(text.lines().count() as u64 * 10),
                Err(_) => Err(EstimateError::malformed("not UTF-8")),
            }
        }),
    )
    .await;
    let body = b"one\ntwo\nthree\nfour";
    assert_eq!(app.reserved_for(body).await, 40);

    let reply = app.send(full(&b"\xff\xfe"[..])).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::BAD_REQUEST),
        "invalid_json"
    );
    assert_eq!(app.calls.get(), 2);
}

#[tokio::test]
async fn fixed_estimator_charges_every_request_the_same() {
    let app = echo(1_000, Estimator::fixed(333)).await;
    assert_eq!(app.reserved_for(b"anything at all").await, 333);
    let reply = app.send(empty()).await;
    assert_eq!(reply.header("x-reserved"), Some("333"));
}

#[tokio::test]
async fn a_client_aborting_its_upload_mid_body_reserves_nothing() {
    let app = echo(100_000, OpenAiEstimator::new()).await;
    let mut socket = raw_send(
        app.server.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\nx-tenant-id: acme\r\n\
          content-length: 100\r\n\r\n{\"max_tokens\":",
    )
    .await;
    // The body stops at 14 of its 100 bytes: the client gives up on sending the rest.
    tokio::io::AsyncWriteExt::shutdown(&mut socket)
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = within(
        "the server to finish with the connection",
        tokio::io::AsyncReadExt::read_to_end(&mut socket, &mut answer),
    )
    .await;
    if !answer.is_empty() {
        assert!(
            answer.starts_with(b"HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(app.calls.get(), 0);
    assert_eq!(app.tracker.tracked_tenants(), 0);
    app.assert_still_serving().await;
}

#[tokio::test]
async fn refused_body_estimates_give_the_inner_services_readiness_back() {
    // A concurrency limit of one right inside the layer (no router in between to hide its
    // readiness): the body estimator keeps the ready, permit-holding inner service while it
    // reads, so a refusal must give the permit back or every later request waits forever.
    use http_body_util::Full;
    use tower::{Service, ServiceBuilder, ServiceExt};
    use tower_tenant_tokens::body::RequestBody;

    let tracker = Arc::new(TenantTokenTracker::new(100_000));
    let calls = Calls::default();
    let mut service = ServiceBuilder::new()
        .layer(
            TenantTokenLayer::new(tracker.clone()).estimator(OpenAiEstimator::new().body_limit(64)),
        )
        .concurrency_limit(1)
        .service_fn({
            let calls = calls.clone();
            move |request: Request<RequestBody<Full<Bytes>>>| {
                calls.hit();
                async move {
                    let body = http_body_util::BodyExt::collect(request.into_body()).await?;
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        body.to_bytes(),
                    )))
                }
            }
        });
    let request = |body: &str| {
        Request::post("/v1/chat/completions")
            .header("x-tenant-id", "acme")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap()
    };
    let too_long = String::from_utf8(json_of_len(65)).unwrap();
    for (body, status) in [
        ("{oops", StatusCode::BAD_REQUEST),
        (r#"{"max_tokens":-1}"#, StatusCode::BAD_REQUEST),
        (too_long.as_str(), StatusCode::PAYLOAD_TOO_LARGE),
        (r#"{"max_tokens":1000000}"#, StatusCode::PAYLOAD_TOO_LARGE),
        (r#"{"max_tokens":1}"#, StatusCode::OK),
        (r#"{"max_tokens":2}"#, StatusCode::OK),
    ] {
        let ready = within("the inner service to be ready", service.ready())
            .await
            .unwrap();
        let response = within("the response", ready.call(request(body)))
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{body}");
        let echoed = within(
            "the body",
            http_body_util::BodyExt::collect(response.into_body()),
        )
        .await
        .unwrap()
        .to_bytes();
        if status == StatusCode::OK {
            assert_eq!(echoed, body.as_bytes());
        }
    }
    assert_eq!(calls.get(), 2);
    assert_eq!(tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn a_body_read_for_its_estimate_reaches_the_inner_service_with_its_exact_length() {
    // A proxy forwards `Content-Length` from the body's size hint: a body the estimator
    // read must say exactly how long it is, and an empty one that it has ended.
    use http_body::Body;
    use tower::{Layer, Service, ServiceExt};
    use tower_tenant_tokens::body::RequestBody;

    let tracker = Arc::new(TenantTokenTracker::new(100_000));
    let estimator = Estimator::from_body_fn(1_024, |_, body| Ok(body.len() as u64 + 1));
    let mut service = TenantTokenLayer::new(tracker.clone())
        .estimator(estimator)
        .layer(tower::service_fn(
            |request: Request<RequestBody<ReqBody>>| async move {
                let body = request.into_body();
                let (hint, ended) = (body.size_hint().exact(), body.is_end_stream());
                let data = http_body_util::BodyExt::collect(body).await?.to_bytes();
                let seen = format!("{hint:?} {ended} {data:?}");
                Ok::<_, std::convert::Infallible>(http::Response::new(seen))
            },
        ));
    let sent: [(&[u8], ReqBody); 3] = [
        (b"hello, model", full(&b"hello, model"[..])),
        (b"in three parts", chunked(["in ", "three ", "parts"])),
        (b"", empty()),
    ];
    for (bytes, body) in sent {
        let request = Request::post("/v1/chat/completions")
            .header("x-tenant-id", "acme")
            .body(body)
            .unwrap();
        let response = within("the response", service.ready().await.unwrap().call(request))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let expected = format!(
            "{:?} {} {:?}",
            Some(bytes.len() as u64),
            bytes.is_empty(),
            Bytes::copy_from_slice(bytes)
        );
        let seen = http_body_util::BodyExt::collect(response.into_body());
        assert_eq!(seen.await.unwrap().to_bytes(), expected);
    }
    assert_eq!(tracker.in_flight("acme"), 0);
}
