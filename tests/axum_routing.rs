//! The layer inside real apps: tenants from an auth middleware, per-route configuration
//! with `route_layer`, shared and separate trackers, routes without the layer, plain
//! hyper, tenant isolation, and what clones share.

mod common;

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request as AxumRequest;
use axum::middleware::{self, Next};
use axum::response::Response as AxumResponse;
use axum::routing::{get, post, Route};
use axum::{Extension, Router};
use bytes::Bytes;
use common::*;
use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tower::{Layer, ServiceExt};
use tower_tenant_tokens::body::{RequestBody, ResponseBody};
use tower_tenant_tokens::future::ResponseFuture;
use tower_tenant_tokens::{
    Estimator, MissingTenant, OpenAiEstimator, ReservationHandle, TenantScope, TenantTokenLayer,
    TenantTokenService, TenantTokenTracker,
};

fn tracker(cap: u64) -> Arc<TenantTokenTracker> {
    Arc::new(TenantTokenTracker::new(cap))
}

// ---------------------------------------------------------------------------------------
// Tenant from an auth middleware
// ---------------------------------------------------------------------------------------

/// Maps bearer keys to tenants. Unknown keys are refused; a missing key is refused too
/// when `strict`, and otherwise passed on without a tenant.
async fn authenticate(strict: bool, mut request: AxumRequest, next: Next) -> AxumResponse {
    let key = request
        .headers()
        .get(AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or("").to_owned());
    let scope = match key.as_deref() {
        Some("Bearer key-acme") => Some(TenantScope::new("acme").with_user("alice")),
        Some("Bearer key-globex") => Some(TenantScope::new("globex").with_user("bob")),
        None if !strict => None,
        _ => {
            let mut refused = AxumResponse::new(Body::from("who are you?"));
            *refused.status_mut() = StatusCode::UNAUTHORIZED;
            return refused;
        }
    };
    if let Some(scope) = scope {
        request.extensions_mut().insert(scope);
    }
    next.run(request).await
}

async fn auth_app(
    strict: bool,
    missing: MissingTenant,
) -> (TestServer, Arc<TenantTokenTracker>, Calls) {
    let tracker = tracker(1_000);
    let calls = Calls::default();
    let handler = {
        let calls = calls.clone();
        move |Extension(handle): Extension<ReservationHandle>,
              Extension(scope): Extension<TenantScope>| {
            calls.hit();
            async move {
                format!(
                    "{} {} {}",
                    handle.tenant_id(),
                    scope.user_id.unwrap_or_default(),
                    handle.tokens()
                )
            }
        }
    };
    let app = Router::new()
        .route("/v1/chat", post(handler))
        .layer(
            TenantTokenLayer::new(tracker.clone())
                .reservation_handle(true)
                .tenant_from_extension()
                .on_missing_tenant(missing),
        )
        .layer(middleware::from_fn(move |request, next| {
            authenticate(strict, request, next)
        }));
    (serve(app).await, tracker, calls)
}

fn keyed(server: &TestServer, key: Option<&str>, tokens: u64) -> Request<ReqBody> {
    let mut builder = Request::post(server.url("/v1/chat")).header("x-token-estimate", tokens);
    if let Some(key) = key {
        builder = builder.header(AUTHORIZATION, format!("Bearer {key}"));
    }
    builder.body(empty()).unwrap()
}

#[tokio::test]
async fn tenant_scope_from_auth_middleware_is_charged_and_headers_cannot_spoof_it() {
    let (server, tracker, calls) = auth_app(true, MissingTenant::Reject).await;
    let reply = call(&client(), keyed(&server, Some("key-acme"), 300)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "acme alice 300");
    assert_eq!(tracker.tenant_state("acme").unwrap().high_water, 300);

    // A tenant header means nothing when the tenant comes from authentication.
    let mut request = keyed(&server, Some("key-globex"), 200);
    request
        .headers_mut()
        .insert("x-tenant-id", "acme".parse().unwrap());
    let reply = call(&client(), request).await;
    assert_eq!(reply.text(), "globex bob 200");
    assert_eq!(tracker.tenant_state("globex").unwrap().high_water, 200);
    assert_eq!(tracker.tenant_state("acme").unwrap().high_water, 300);

    // The authenticated tenant's cap applies.
    let reply = call(&client(), keyed(&server, Some("key-acme"), 1_001)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(calls.get(), 2);
    assert_eq!(tracker.in_flight("acme"), 0);
    assert_eq!(tracker.in_flight("globex"), 0);
}

#[tokio::test]
async fn strict_auth_answers_401_itself_before_the_layer() {
    let (server, tracker, calls) = auth_app(true, MissingTenant::Reject).await;
    for key in [None, Some("key-nobody")] {
        let reply = call(&client(), keyed(&server, key, 10)).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(reply.text(), "who are you?", "the auth middleware's answer");
    }
    assert_eq!(calls.get(), 0);
    assert_eq!(tracker.tracked_tenants(), 0);
}

#[tokio::test]
async fn optional_auth_leaves_a_missing_tenant_to_the_layer_400_or_401_as_configured() {
    let (server, tracker, calls) = auth_app(false, MissingTenant::Reject).await;
    let reply = call(&client(), keyed(&server, None, 10)).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::BAD_REQUEST),
        "missing_tenant"
    );
    assert_eq!(tracker.tracked_tenants(), 0);
    assert_eq!(calls.get(), 0);

    let (server, tracker, calls) = auth_app(false, MissingTenant::Unauthorized).await;
    let reply = call(&client(), keyed(&server, None, 10)).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::UNAUTHORIZED),
        "missing_tenant"
    );
    assert_eq!(reply.json()["error"]["type"], "authentication_error");
    assert_eq!(tracker.tracked_tenants(), 0);
    assert_eq!(calls.get(), 0);

    // With a key, the same app charges the tenant.
    let reply = call(&client(), keyed(&server, Some("key-acme"), 10)).await;
    assert_eq!(reply.text(), "acme alice 10");
}

// ---------------------------------------------------------------------------------------
// Per-route configuration
// ---------------------------------------------------------------------------------------

fn streaming(source: StreamSource) -> axum::routing::MethodRouter {
    post(move || {
        let source = source.clone();
        async move { source.body() }
    })
}

#[tokio::test]
async fn routes_with_different_estimators_on_one_tracker_count_against_the_same_tenant() {
    let shared = tracker(1_000);
    let (chat_source, mut chat_streams) = streams();
    let (embed_source, mut embed_streams) = streams();
    let chat = Router::new()
        .route("/v1/chat/completions", streaming(chat_source))
        .route_layer(TenantTokenLayer::new(shared.clone()).estimator(OpenAiEstimator::new()));
    let embeddings = Router::new()
        .route("/v1/embeddings", streaming(embed_source))
        .route_layer(TenantTokenLayer::new(shared.clone()).estimator(Estimator::fixed(300)));
    let app = chat
        .merge(embeddings)
        .route("/health", get(|| async { "healthy" }));
    let server = serve(app).await;
    let client = client();

    let body = br#"{"max_tokens":597,"messages":[{"role":"user","content":"hi there"}]}"#;
    let chat_estimate = OpenAiEstimator::new().estimate(body).unwrap();
    assert_eq!(chat_estimate, 600);
    let request = |path: &str, body: ReqBody| {
        Request::post(server.url(path))
            .header("x-tenant-id", "acme")
            .body(body)
            .unwrap()
    };

    let chat_response = send(&client, request("/v1/chat/completions", full(&body[..]))).await;
    assert_eq!(chat_response.status(), StatusCode::OK);
    let chat_chunks = chat_streams.next().await;
    assert_eq!(shared.in_flight("acme"), 600);

    let embed_response = send(&client, request("/v1/embeddings", empty())).await;
    assert_eq!(embed_response.status(), StatusCode::OK);
    let embed_chunks = embed_streams.next().await;
    assert_eq!(
        shared.in_flight("acme"),
        900,
        "both routes charge one ledger"
    );

    // Either route alone would fit, but not next to the other's reservation.
    let reply = call(&client, request("/v1/embeddings", empty())).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("x-ratelimit-remaining-tokens"), Some("100"));

    // A route without the layer needs no tenant, and a path no route matches is a 404.
    let reply = call(
        &client,
        Request::get(server.url("/health")).body(empty()).unwrap(),
    )
    .await;
    assert_eq!((reply.status, reply.text()), (StatusCode::OK, "healthy"));
    let reply = call(
        &client,
        Request::post(server.url("/nowhere")).body(empty()).unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);

    drop(chat_chunks);
    read(chat_response).await;
    assert_eq!(shared.in_flight("acme"), 300);
    drop(embed_chunks);
    read(embed_response).await;
    assert_eq!(shared.in_flight("acme"), 0);
}

#[tokio::test]
async fn routes_with_separate_trackers_are_isolated() {
    let big = tracker(1_000);
    let small = tracker(100);
    let (source, mut streams) = streams();
    let app = Router::new()
        .route(
            "/big",
            streaming(source.clone()).layer(TenantTokenLayer::new(big.clone())),
        )
        .route(
            "/small",
            streaming(source).layer(TenantTokenLayer::new(small.clone())),
        );
    let server = serve(app).await;
    let client = client();

    let big_response = send(&client, metered(&server, "/big", "acme", 950)).await;
    let big_chunks = streams.next().await;
    let small_response = send(&client, metered(&server, "/small", "acme", 100)).await;
    assert_eq!(
        small_response.status(),
        StatusCode::OK,
        "its own cap, untouched"
    );
    let small_chunks = streams.next().await;
    assert_eq!((big.in_flight("acme"), small.in_flight("acme")), (950, 100));

    let reply = call(&client, metered(&server, "/small", "acme", 1)).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("100"));
    let reply = call(&client, metered(&server, "/small", "acme", 101)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    let reply = call(&client, metered(&server, "/big", "acme", 51)).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!((big.in_flight("acme"), small.in_flight("acme")), (950, 100));

    drop((big_chunks, small_chunks));
    read(big_response).await;
    read(small_response).await;
    assert_eq!((big.in_flight("acme"), small.in_flight("acme")), (0, 0));
}

#[tokio::test]
async fn two_tenants_are_isolated_over_http() {
    let tracker = tracker(1_000);
    let (source, mut streams) = streams();
    let app = Router::new()
        .route("/stream", streaming(source))
        .layer(TenantTokenLayer::new(tracker.clone()));
    let server = serve(app).await;
    let client = client();

    let acme = send(&client, metered(&server, "/stream", "acme", 900)).await;
    let acme_chunks = streams.next().await;
    let globex = send(&client, metered(&server, "/stream", "globex", 1_000)).await;
    assert_eq!(
        globex.status(),
        StatusCode::OK,
        "acme's load is not globex's"
    );
    let globex_chunks = streams.next().await;

    let reply = call(&client, metered(&server, "/stream", "acme", 200)).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("x-ratelimit-remaining-tokens"), Some("100"));
    let reply = call(&client, metered(&server, "/stream", "globex", 1)).await;
    assert_eq!(reply.header("x-ratelimit-remaining-tokens"), Some("0"));

    drop(acme_chunks);
    read(acme).await;
    assert_eq!(tracker.in_flight("acme"), 0);
    assert_eq!(tracker.in_flight("globex"), 1_000, "globex still streams");
    drop(globex_chunks);
    read(globex).await;
    assert_eq!(tracker.in_flight("globex"), 0);
}

// ---------------------------------------------------------------------------------------
// Plain hyper
// ---------------------------------------------------------------------------------------

/// A plain hyper service: `/stream` streams a body the test drives, anything else echoes
/// the request body with the tokens held in `x-reserved`.
fn hyper_service(
    layer: TenantTokenLayer,
    source: StreamSource,
) -> TenantTokenService<
    impl tower::Service<
            Request<RequestBody<Incoming>>,
            Response = Response<Body>,
            Error = hyper::Error,
            Future = impl Send,
        > + Clone
        + Send,
> {
    layer.layer(tower::service_fn(
        move |request: Request<RequestBody<Incoming>>| {
            let source = source.clone();
            async move {
                if request.uri().path() == "/stream" {
                    return Ok(Response::new(source.body()));
                }
                let reserved = request
                    .extensions()
                    .get::<ReservationHandle>()
                    .map_or(0, ReservationHandle::tokens);
                let body = request.into_body().collect().await?.to_bytes();
                let mut response = Response::new(Body::from(body));
                response.headers_mut().insert("x-reserved", reserved.into());
                Ok(response)
            }
        },
    ))
}

#[tokio::test]
async fn plain_hyper_service_holds_until_the_stream_ends_and_refuses_over_the_cap() {
    let tracker = tracker(1_000);
    let (source, mut streams) = streams();
    let server = serve_tower(hyper_service(
        TenantTokenLayer::new(tracker.clone()).reservation_handle(true),
        source,
    ))
    .await;
    let client = client();

    let response = send(&client, metered(&server, "/stream", "acme", 800)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let chunks = streams.next().await;
    let mut body = response.into_body();
    chunks.send(Bytes::from_static(b"token")).unwrap();
    assert_eq!(next_data(&mut body).await.as_deref(), Some(&b"token"[..]));
    assert_eq!(tracker.in_flight("acme"), 800);

    let reply = call(&client, metered(&server, "/echo", "acme", 300)).await;
    let code = assert_openai_error(&reply, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(code, "rate_limit_exceeded");
    let reply = call(&client, metered(&server, "/echo", "acme", 200)).await;
    assert_eq!(reply.header("x-reserved"), Some("200"));

    drop(chunks);
    assert_eq!(next_data(&mut body).await, None);
    assert_eq!(tracker.in_flight("acme"), 0);

    // A client that goes away mid-stream releases too.
    let response = send(&client, metered(&server, "/stream", "acme", 500)).await;
    let chunks = streams.next().await;
    assert_eq!(tracker.in_flight("acme"), 500);
    drop(response);
    wait_for_in_flight(&tracker, "acme", 0).await;
    drop(chunks);
}

#[tokio::test]
async fn plain_hyper_head_request_releases_once_hyper_drops_the_unsent_body() {
    let tracker = tracker(1_000);
    let (source, mut streams) = streams();
    let server = serve_tower(hyper_service(
        TenantTokenLayer::new(tracker.clone()),
        source,
    ))
    .await;

    let mut request = metered(&server, "/stream", "acme", 600);
    *request.method_mut() = http::Method::HEAD;
    let response = send(&client(), request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let chunks = streams.next().await;
    // hyper sends no body for HEAD and drops it right after the head, on its own task.
    within("hyper to drop the body", chunks.closed()).await;
    wait_for_in_flight(&tracker, "acme", 0).await;
    assert_eq!(tracker.tenant_state("acme").unwrap().high_water, 600);
    drop(response);
}

#[tokio::test]
async fn plain_hyper_service_with_the_openai_estimator_gets_the_body_intact() {
    let tracker = tracker(100_000);
    let layer = TenantTokenLayer::new(tracker.clone())
        .reservation_handle(true)
        .estimator(OpenAiEstimator::new());
    let server = serve_tower(hyper_service(layer, streams().0)).await;
    let body =
        br#"{"model":"m","max_tokens":42,"messages":[{"role":"user","content":"echo me back"}]}"#;
    let expected = OpenAiEstimator::new().estimate(body).unwrap();

    for request_body in [full(&body[..]), chunked([&body[..20], &body[20..]])] {
        let request = Request::post(server.url("/echo"))
            .header("x-tenant-id", "acme")
            .body(request_body)
            .unwrap();
        let reply = call(&client(), request).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, &body[..]);
        assert_eq!(
            reply.header("x-reserved"),
            Some(expected.to_string().as_str())
        );
    }
    let request = Request::post(server.url("/echo"))
        .header("x-tenant-id", "acme")
        .body(full("{oops"))
        .unwrap();
    let reply = call(&client(), request).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::BAD_REQUEST),
        "invalid_json"
    );
    assert_eq!(tracker.in_flight("acme"), 0);
}

// ---------------------------------------------------------------------------------------
// Clones
// ---------------------------------------------------------------------------------------

fn assert_clone_send_sync<T: Clone + Send + Sync + 'static>() {}
fn assert_send<T: Send + 'static>() {}
fn assert_send_sync<T: Send + Sync + 'static>() {}

// Compile-time: the layer, its service (around an axum route or router) and the handle can
// be cloned and shared across threads; futures and bodies can move between threads.
const _: fn() = || {
    assert_clone_send_sync::<TenantTokenLayer>();
    assert_clone_send_sync::<TenantTokenService<Route>>();
    assert_clone_send_sync::<TenantTokenService<Router>>();
    assert_clone_send_sync::<ReservationHandle>();
    assert_send::<ResponseFuture<Route, Body>>();
    assert_send::<ResponseFuture<Route, Incoming>>();
    assert_send::<ResponseBody<Body>>();
    assert_send_sync::<TenantTokenTracker>();
};

#[tokio::test]
async fn clones_of_a_layer_and_of_its_service_share_one_ledger() {
    let tracker = tracker(1_000);
    let layer = TenantTokenLayer::new(tracker.clone());
    let fixed = layer.clone().estimator(Estimator::fixed(300));
    assert!(Arc::ptr_eq(
        layer.tracker().expect("in memory"),
        fixed.tracker().expect("in memory")
    ));

    let inner = tower::service_fn(|_: Request<RequestBody<Body>>| async {
        Ok::<_, Infallible>(Response::new(Body::from("streamed answer")))
    });
    let service = layer.layer(inner);
    let clone = service.clone();
    let other = fixed.layer(inner);
    let request = |tokens: Option<u64>| {
        let mut builder = Request::post("/").header("x-tenant-id", "acme");
        if let Some(tokens) = tokens {
            builder = builder.header("x-token-estimate", tokens);
        }
        builder.body(Body::empty()).unwrap()
    };

    let first = service.clone().oneshot(request(Some(600))).await.unwrap();
    let second = other.clone().oneshot(request(None)).await.unwrap();
    assert_eq!(tracker.in_flight("acme"), 900);
    let refused = clone.clone().oneshot(request(Some(200))).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let refused = other.clone().oneshot(request(None)).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);

    // Reconfiguring a clone did not change the original: it still wants a header.
    let missing = service.clone().oneshot(request(None)).await.unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);

    first.into_body().collect().await.unwrap();
    assert_eq!(tracker.in_flight("acme"), 300);
    drop(second);
    assert_eq!(tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn one_layer_on_two_servers_keeps_one_ledger() {
    let tracker = tracker(1_000);
    let layer = TenantTokenLayer::new(tracker.clone());
    let (source, mut streams) = streams();
    let first = serve(
        Router::new()
            .route("/stream", streaming(source.clone()))
            .layer(layer.clone()),
    )
    .await;
    let second = serve(
        Router::new()
            .route("/stream", streaming(source))
            .layer(layer),
    )
    .await;
    let client = client();

    let held = send(&client, metered(&first, "/stream", "acme", 700)).await;
    let chunks = streams.next().await;
    let reply = call(&client, metered(&second, "/stream", "acme", 301)).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("x-ratelimit-remaining-tokens"), Some("300"));

    drop(chunks);
    read(held).await;
    let held = send(&client, metered(&second, "/stream", "acme", 1_000)).await;
    assert_eq!(held.status(), StatusCode::OK);
    drop(streams.next().await);
    read(held).await;
    assert_eq!(tracker.in_flight("acme"), 0);
}
