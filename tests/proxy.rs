//! The gateway example's proxy mode (`examples/gateway/proxy.rs`) over real HTTP on
//! 127.0.0.1: a fake upstream the test controls, the proxy's routes behind a
//! `TenantTokenLayer` configured as the gateway configures it, and a hyper client.

mod common;
#[path = "../examples/gateway/proxy.rs"]
mod proxy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{HeaderMap, HeaderName, Method, Request, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tower_tenant_tokens::{OpenAiEstimator, TenantTokenLayer, TenantTokenTracker};

const CAP: u64 = 1_000;

/// What the fake upstream answers a non-streamed request with.
const COMPLETION: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
const MODELS: &str = r#"{"object":"list","data":[{"id":"m","object":"model","owned_by":"test"}]}"#;

// ---------------------------------------------------------------------------------------
// The fake upstream
// ---------------------------------------------------------------------------------------

/// A request as the upstream received it.
#[derive(Debug)]
struct Seen {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }
}

/// An upstream on 127.0.0.1. Paths under `/hang` never answer; `/…/models` lists models;
/// a streamed chat completion streams what the test sends through [`Streams`]; everything
/// else gets [`COMPLETION`], with headers of the upstream's own (hop-by-hop ones, rate
/// limits of the gateway's account, one end-to-end header).
struct Upstream {
    server: TestServer,
    seen: mpsc::UnboundedReceiver<Seen>,
    streams: Streams,
}

impl Upstream {
    async fn start() -> Self {
        let (record, seen) = mpsc::unbounded_channel();
        let (source, streams) = streams();
        let app = Router::new().fallback(move |request: Request<Body>| {
            let (record, source) = (record.clone(), source.clone());
            async move { answer(request, record, source).await }
        });
        Upstream {
            server: serve(app).await,
            seen,
            streams,
        }
    }

    /// `http://127.0.0.1:port{path}`: a base URL.
    fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    /// The next request the upstream received.
    async fn request(&mut self) -> Seen {
        within("the upstream to receive a request", self.seen.recv())
            .await
            .expect("the upstream has stopped")
    }

    /// Fails if the upstream received a request the test has not looked at.
    fn assert_no_request(&mut self) {
        if let Ok(seen) = self.seen.try_recv() {
            panic!("the upstream received {} {}", seen.method, seen.uri);
        }
    }
}

async fn answer(
    request: Request<Body>,
    record: mpsc::UnboundedSender<Seen>,
    source: StreamSource,
) -> Response {
    let (head, body) = request.into_parts();
    let body = body.collect().await.expect("request body").to_bytes();
    let stream = serde_json::from_slice::<serde_json::Value>(&body)
        .is_ok_and(|request| request["stream"] == true);
    let path = head.uri.path().to_owned();
    let _ = record.send(Seen {
        method: head.method,
        uri: head.uri,
        version: head.version,
        headers: head.headers,
        body,
    });
    if path.starts_with("/hang") {
        std::future::pending::<()>().await;
    }
    if path.contains("/models") {
        let headers = [("content-type", "application/json")];
        return (headers, MODELS).into_response();
    }
    if stream && path.ends_with("/chat/completions") {
        let headers = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ];
        return (headers, source.body()).into_response();
    }
    let headers = [
        ("content-type", "application/json"),
        ("x-ratelimit-limit-tokens", "999999"),
        ("x-ratelimit-limit-requests", "5000"),
        ("connection", "x-upstream-hop"),
        ("x-upstream-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-authenticate", "Basic"),
        ("x-upstream-end", "kept"),
    ];
    (headers, COMPLETION).into_response()
}

// ---------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------

/// The proxy to `base_url` behind the layer as the gateway builds it: tenant from
/// `x-tenant-id`, estimates from the body, usage read, streams asked for their usage,
/// OpenAI's rate-limit headers on.
async fn gateway(
    base_url: &str,
    key: Option<&str>,
    timeout: Duration,
) -> (TestServer, Arc<TenantTokenTracker>) {
    let tracker = Arc::new(TenantTokenTracker::new(CAP));
    let limits = TenantTokenLayer::new(tracker.clone())
        .tenant_header(HeaderName::from_static("x-tenant-id"))
        .estimator(OpenAiEstimator::new())
        .read_usage(true)
        .openai_ratelimit_headers(true)
        .ask_stream_usage(true);
    let proxy = proxy::Proxy::new(base_url, key, timeout, false).expect("a valid base URL");
    (serve(proxy::router(proxy, limits)).await, tracker)
}

fn estimate(body: &str) -> u64 {
    OpenAiEstimator::new()
        .estimate(body.as_bytes())
        .expect("a valid request")
}

/// A chat request for `tenant` to `path` on `gateway`.
fn chat(gateway: &TestServer, path: &str, tenant: &str, body: &'static str) -> Request<ReqBody> {
    Request::post(gateway.url(path))
        .header("x-tenant-id", tenant)
        .header("content-type", "application/json")
        .body(full(body))
        .expect("request")
}

/// The highest `tenant` ever had in flight: proves a request was admitted and reserved.
fn high_water(tracker: &TenantTokenTracker, tenant: &str) -> u64 {
    tracker
        .tenant_state(tenant)
        .map_or(0, |state| state.high_water)
}

fn sse(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn completion_reaches_the_upstream_with_its_key_and_comes_back_with_the_tenants_limits() {
    let mut upstream = Upstream::start().await;
    let base = upstream.url("/v1");
    let (gateway, tracker) = gateway(&base, Some("upstream-secret"), WAIT).await;
    let body =
        r#"{"model":"m","max_tokens":50,"messages":[{"role":"user","content":"Hello there"}]}"#;
    let request = Request::post(gateway.url("/v1/chat/completions?api-version=1"))
        .header("x-tenant-id", "acme")
        .header("content-type", "application/json")
        .header("authorization", "Bearer client-key")
        .header("x-api-key", "client-key")
        .header("connection", "keep-alive, x-client-hop")
        .header("x-client-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .header("accept-encoding", "gzip, br")
        .header("x-client-end", "kept")
        .body(full(body))
        .expect("request");

    let reply = call(&client(), request).await;

    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), COMPLETION);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    // The tenant's cap and what was left of it with this request admitted, not the
    // upstream's account-wide limits.
    let held = estimate(body);
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("1000"));
    let left = (CAP - held).to_string();
    assert_eq!(reply.header("x-ratelimit-remaining-tokens"), Some(&*left));
    assert_eq!(reply.header("x-ratelimit-limit-requests"), None);
    for hop in ["x-upstream-hop", "keep-alive", "proxy-authenticate"] {
        assert_eq!(reply.header(hop), None, "{hop} came back");
    }
    assert_eq!(reply.header("x-upstream-end"), Some("kept"));

    let seen = upstream.request().await;
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.uri.to_string(), "/v1/chat/completions?api-version=1");
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(
        seen.header("host"),
        Some(&*upstream.server.addr.to_string())
    );
    assert_eq!(seen.header("authorization"), Some("Bearer upstream-secret"));
    assert_eq!(seen.header("x-api-key"), None);
    assert_eq!(seen.header("accept-encoding"), Some("identity"));
    for hop in [
        "x-client-hop",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        assert_eq!(seen.header(hop), None, "{hop} was forwarded");
    }
    assert_eq!(seen.header("connection"), None);
    assert_eq!(seen.header("x-client-end"), Some("kept"));
    assert_eq!(seen.header("x-tenant-id"), Some("acme"));

    assert_eq!(high_water(&tracker, "acme"), held);
    wait_for_in_flight(&tracker, "acme", 0).await;
    upstream.assert_no_request();
}

#[tokio::test]
async fn stream_is_passed_frame_by_frame_and_holds_the_reservation_until_it_ends() {
    let mut upstream = Upstream::start().await;
    let (gateway, tracker) = gateway(&upstream.url("/v1"), None, WAIT).await;
    let client = client();
    let body = r#"{"model":"m","max_tokens":400,"stream":true,"messages":[{"role":"user","content":"Count"}]}"#;
    let held = estimate(body);

    let response = send(
        &client,
        chat(&gateway, "/v1/chat/completions", "acme", body),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let left = (CAP - held).to_string();
    assert_eq!(response.headers()["x-ratelimit-remaining-tokens"], &*left);
    // The layer asked the stream for its usage on the way (its Content-Length made to match).
    let seen = upstream.request().await;
    let forwarded: serde_json::Value = serde_json::from_slice(&seen.body).expect("JSON");
    assert_eq!(forwarded["stream_options"]["include_usage"], true);
    let upstream_stream = upstream.streams.next().await;
    let mut body_in = response.into_body();

    let first = sse(r#"{"id":"c1","choices":[{"index":0,"delta":{"content":"one"}}]}"#);
    upstream_stream.send(first.clone()).expect("stream open");
    assert_eq!(next_data(&mut body_in).await, Some(first));
    assert_eq!(tracker.in_flight("acme"), held);

    // While the stream holds its estimate, a request that does not fit is refused with
    // the tenant's figures, and never reaches the upstream.
    let refused = call(
        &client,
        chat(
            &gateway,
            "/v1/chat/completions",
            "acme",
            r#"{"model":"m","max_tokens":700,"messages":[]}"#,
        ),
    )
    .await;
    assert_eq!(
        assert_openai_error(&refused, StatusCode::TOO_MANY_REQUESTS),
        "rate_limit_exceeded"
    );
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), Some(&*left));
    assert!(refused.header("retry-after").is_some());
    upstream.assert_no_request();

    let second = sse(r#"{"id":"c1","choices":[{"index":0,"delta":{"content":" two"}}]}"#);
    upstream_stream.send(second.clone()).expect("stream open");
    assert_eq!(next_data(&mut body_in).await, Some(second));
    assert_eq!(tracker.in_flight("acme"), held);

    // The usage chunk the layer asked for is taken out; the end passes.
    let usage = r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}"#;
    upstream_stream.send(sse(usage)).expect("stream open");
    upstream_stream.send(sse("[DONE]")).expect("stream open");
    drop(upstream_stream);
    let mut rest = Vec::new();
    while let Some(data) = next_data(&mut body_in).await {
        rest.extend_from_slice(&data);
    }
    assert_eq!(String::from_utf8(rest).unwrap(), "data: [DONE]\n\n");
    wait_for_in_flight(&tracker, "acme", 0).await;
}

#[tokio::test]
async fn unreachable_upstream_is_a_502_and_holds_nothing() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}/v1", closed.local_addr().expect("addr"));
    drop(closed); // nothing listens there now
    let (gateway, tracker) = gateway(&base, None, WAIT).await;
    let body = r#"{"model":"m","max_tokens":10,"messages":[]}"#;

    let reply = call(
        &client(),
        chat(&gateway, "/v1/chat/completions", "acme", body),
    )
    .await;

    let code = assert_openai_error(&reply, StatusCode::BAD_GATEWAY);
    assert_eq!(code, "upstream_unreachable");
    assert_eq!(reply.json()["error"]["type"], "server_error");
    assert!(reply.json()["error"]["param"].is_null());
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(high_water(&tracker, "acme"), estimate(body));
    wait_for_in_flight(&tracker, "acme", 0).await;
}

#[tokio::test]
async fn upstream_that_never_answers_is_a_504_after_the_timeout_and_holds_nothing() {
    let mut upstream = Upstream::start().await;
    let timeout = Duration::from_millis(400);
    let (gateway, tracker) = gateway(&upstream.url("/hang/v1"), None, timeout).await;
    let body = r#"{"model":"m","max_tokens":10,"messages":[]}"#;
    let started = Instant::now();
    let reply = tokio::spawn({
        let request = chat(&gateway, "/v1/chat/completions", "acme", body);
        async move { call(&client(), request).await }
    });

    assert_eq!(
        upstream.request().await.uri.path(),
        "/hang/v1/chat/completions"
    );
    assert_eq!(tracker.in_flight("acme"), estimate(body)); // held while it waits
    let reply = reply.await.expect("the client task");

    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    let code = assert_openai_error(&reply, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(code, "upstream_timeout");
    wait_for_in_flight(&tracker, "acme", 0).await;
}

#[tokio::test]
async fn client_gone_mid_stream_releases_the_reservation_and_the_upstream() {
    let mut upstream = Upstream::start().await;
    let (gateway, tracker) = gateway(&upstream.url("/v1"), None, WAIT).await;
    let body = r#"{"model":"m","max_tokens":300,"stream":true,"messages":[]}"#;
    let response = send(
        &client(),
        chat(&gateway, "/v1/chat/completions", "acme", body),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let upstream_stream = upstream.streams.next().await;
    let chunk = sse(r#"{"id":"c1","choices":[{"index":0,"delta":{"content":"one"}}]}"#);
    upstream_stream.send(chunk.clone()).expect("stream open");
    let mut body_in = response.into_body();
    assert_eq!(next_data(&mut body_in).await, Some(chunk.clone()));
    assert_eq!(tracker.in_flight("acme"), estimate(body));

    drop(body_in); // the client goes away

    wait_for_in_flight(&tracker, "acme", 0).await;
    // The upstream's response is dropped too: its connection was closed, so it stops
    // generating. (Writes show it the closed connection.)
    within("the upstream to see the client gone", async {
        while !upstream_stream.is_closed() {
            let _ = upstream_stream.send(chunk.clone());
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
}

#[tokio::test]
async fn models_pass_unmetered_with_the_clients_own_credentials() {
    let mut upstream = Upstream::start().await;
    let (gateway, tracker) = gateway(&upstream.url("/openai/"), None, WAIT).await;
    let client = client();
    for (path, forwarded) in [
        ("/v1/models", "/openai/models"),
        ("/v1/models/m?verbose=1", "/openai/models/m?verbose=1"),
        ("/v1/models/org/m", "/openai/models/org/m"),
    ] {
        let request = Request::get(gateway.url(path))
            .header("authorization", "Bearer client-key")
            .header("x-api-key", "client-key")
            .body(empty())
            .expect("request");

        let reply = call(&client, request).await;

        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.text(), MODELS);
        assert_eq!(reply.header("x-ratelimit-limit-tokens"), None);
        let seen = upstream.request().await;
        assert_eq!(seen.method, Method::GET);
        assert_eq!(seen.uri.to_string(), forwarded);
        assert_eq!(seen.header("authorization"), Some("Bearer client-key"));
        assert_eq!(seen.header("x-api-key"), Some("client-key"));
    }
    assert!(tracker.snapshot().is_empty(), "{:?}", tracker.snapshot());
}

#[tokio::test]
async fn every_inference_route_is_metered_and_only_chat_streams_are_asked_for_usage() {
    let mut upstream = Upstream::start().await;
    // A base URL without a path: `/v1/x` goes to `/x`.
    let (gateway, tracker) = gateway(&upstream.url(""), None, WAIT).await;
    let client = client();
    let paths = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/messages",
    ];
    for path in paths {
        let request = Request::post(gateway.url(path))
            .body(full(r#"{"model":"m","input":"hi"}"#))
            .expect("request");
        let reply = call(&client, request).await;
        let code = assert_openai_error(&reply, StatusCode::BAD_REQUEST);
        assert_eq!(code, "missing_tenant", "{path}");
    }
    upstream.assert_no_request();

    let body = r#"{"model":"m","max_output_tokens":20,"stream":true,"input":"hi"}"#;
    let reply = call(&client, chat(&gateway, "/v1/responses", "acme", body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = upstream.request().await;
    assert_eq!(seen.uri.path(), "/responses");
    assert_eq!(seen.body, body.as_bytes(), "the request was changed");

    let body = r#"{"model":"m","max_tokens":20,"stream":true,"prompt":"hi"}"#;
    let reply = call(&client, chat(&gateway, "/v1/completions", "acme", body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = upstream.request().await;
    assert_eq!(seen.uri.path(), "/completions");
    let forwarded: serde_json::Value = serde_json::from_slice(&seen.body).expect("JSON");
    assert_eq!(forwarded["stream_options"]["include_usage"], true);
    wait_for_in_flight(&tracker, "acme", 0).await;
}

#[tokio::test]
async fn http2_on_either_side() {
    let mut upstream = Upstream::start().await;
    let request = |gateway: &TestServer| {
        Request::post(gateway.url("/v1/chat/completions"))
            .header("x-tenant-id", "acme")
            .header("x-token-estimate", "40")
            .body(full(r#"{"model":"m","messages":[]}"#))
            .expect("request")
    };
    for upstream_http2 in [false, true] {
        let tracker = Arc::new(TenantTokenTracker::new(CAP));
        let base = upstream.url("/v1");
        let proxy = proxy::Proxy::new(&base, None, WAIT, upstream_http2).expect("base URL");
        let gateway = serve(proxy::router(proxy, TenantTokenLayer::new(tracker.clone()))).await;
        // A client speaking HTTP/2 to the gateway, then one speaking HTTP/1.1.
        let h2_client: HttpClient = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        for client in [h2_client, client()] {
            let reply = call(&client, request(&gateway)).await;

            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(reply.text(), COMPLETION);
            let version = upstream.request().await.version;
            let expected = [Version::HTTP_11, Version::HTTP_2][usize::from(upstream_http2)];
            assert_eq!(version, expected);
        }
        assert_eq!(high_water(&tracker, "acme"), 40);
        wait_for_in_flight(&tracker, "acme", 0).await;
    }
}

#[tokio::test]
async fn https_and_malformed_base_urls_are_refused_up_front() {
    let new = |base: &str| proxy::Proxy::new(base, None, WAIT, false).err();
    let https = new("https://api.example.com/v1").expect("https refused");
    assert!(https.contains("TLS"), "{https}");
    assert!(new("127.0.0.1:8000/v1").is_some());
    assert!(new("http://127.0.0.1:8000/v1?key=1").is_some());
    assert!(new("http://127.0.0.1:8000/v1").is_none());
}
