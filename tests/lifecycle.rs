//! When a reservation is released: at the end of a streamed body, when the client goes
//! away, when the request is cancelled, when the handler panics or fails, and at once for
//! responses without a body. Also reconciliation through the `ReservationHandle`.

mod common;

use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Extension, Router};
use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt};
use tower_tenant_tokens::body::RequestBody;
use tower_tenant_tokens::{
    OpenAiEstimator, ReservationHandle, TenantTokenLayer, TenantTokenTracker,
};

fn tracker(cap: u64) -> Arc<TenantTokenTracker> {
    Arc::new(TenantTokenTracker::new(cap))
}

/// An app whose `/stream` handler streams a body the test drives.
async fn streaming_server(tracker: &Arc<TenantTokenTracker>) -> (TestServer, Streams) {
    let (source, streams) = streams();
    let app = Router::new()
        .route(
            "/stream",
            post(move || {
                let source = source.clone();
                async move { source.body() }
            }),
        )
        .layer(TenantTokenLayer::new(tracker.clone()));
    (serve(app).await, streams)
}

#[tokio::test]
async fn streaming_response_holds_reservation_until_last_chunk() {
    let tracker = tracker(1_000);
    let (server, mut streams) = streaming_server(&tracker).await;
    let client = client();

    let response = send(&client, metered(&server, "/stream", "acme", 400)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(tracker.in_flight("acme"), 400, "held once the head is out");
    let chunks = streams.next().await;
    let mut body = response.into_body();

    chunks.send(Bytes::from_static(b"first")).unwrap();
    assert_eq!(next_data(&mut body).await.as_deref(), Some(&b"first"[..]));
    assert_eq!(tracker.in_flight("acme"), 400, "held after the first chunk");
    chunks.send(Bytes::from_static(b"second")).unwrap();
    assert_eq!(next_data(&mut body).await.as_deref(), Some(&b"second"[..]));
    assert_eq!(
        tracker.in_flight("acme"),
        400,
        "held after the second chunk"
    );

    // The reservation is real: what is left of the cap is all another request can get.
    let refused = call(&client, metered(&server, "/stream", "acme", 601)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(tracker.in_flight("acme"), 400);

    drop(chunks); // the last chunk has gone: the stream ends
    assert_eq!(next_data(&mut body).await, None);
    // Released before the end of the stream is written, so already visible here.
    assert_eq!(tracker.in_flight("acme"), 0);
    assert_eq!(tracker.tenant_state("acme").unwrap().reservations, 0);
}

#[tokio::test]
async fn a_fixed_length_body_is_released_by_the_time_it_has_been_read() {
    let tracker = tracker(1_000);
    let app = Router::new()
        .route("/", post(|| async { "x".repeat(100_000) }))
        .layer(TenantTokenLayer::new(tracker.clone()));
    let server = serve(app).await;

    let reply = call(&client(), metered(&server, "/", "acme", 250)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-length"), Some("100000"));
    assert_eq!(reply.body.len(), 100_000);
    assert_eq!(tracker.in_flight("acme"), 0);
    let state = tracker.tenant_state("acme").unwrap();
    assert_eq!((state.high_water, state.reservations), (250, 0));
}

#[tokio::test]
async fn client_disconnecting_mid_stream_releases_the_reservation() {
    let tracker = tracker(1_000);
    let (server, mut streams) = streaming_server(&tracker).await;

    let mut socket = raw_send(
        server.addr,
        b"POST /stream HTTP/1.1\r\nhost: test\r\nx-tenant-id: acme\r\n\
          x-token-estimate: 700\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    let chunks = streams.next().await;
    chunks.send(Bytes::from_static(b"first-chunk")).unwrap();
    let mut received = Vec::new();
    raw_read_until(&mut socket, &mut received, b"first-chunk").await;
    assert!(received.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert_eq!(tracker.in_flight("acme"), 700, "held while streaming");

    drop(socket); // the client goes away mid-stream; the server never sends another chunk
    wait_for_in_flight(&tracker, "acme", 0).await;
    within("the server to drop the response body", chunks.closed()).await;
    assert_eq!(tracker.tenant_state("acme").unwrap().reservations, 0);

    // The whole cap is available again.
    let response = send(&client(), metered(&server, "/stream", "acme", 1_000)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(tracker.in_flight("acme"), 1_000);
    drop(streams.next().await);
    assert!(read(response).await.body.is_empty());
    assert_eq!(tracker.in_flight("acme"), 0);
}

/// A handler that reports that it started (with the tokens it holds) and then waits
/// forever; dropping its future is reported too.
fn never_completing_app(tracker: &Arc<TenantTokenTracker>) -> (Router, WaitingHandler) {
    let (started_tx, started) = mpsc::unbounded_channel::<u64>();
    let (dropped_tx, dropped) = mpsc::unbounded_channel::<()>();
    let app = Router::new()
        .route(
            "/wait",
            post(move |Extension(handle): Extension<ReservationHandle>| {
                let started_tx = started_tx.clone();
                let dropped_tx = dropped_tx.clone();
                async move {
                    let _on_drop = OnDrop(Some(move || {
                        let _ = dropped_tx.send(());
                    }));
                    let _ = started_tx.send(handle.tokens());
                    std::future::pending::<()>().await;
                    "unreachable"
                }
            }),
        )
        .layer(TenantTokenLayer::new(tracker.clone()).reservation_handle(true));
    (app, WaitingHandler { started, dropped })
}

struct WaitingHandler {
    started: mpsc::UnboundedReceiver<u64>,
    dropped: mpsc::UnboundedReceiver<()>,
}

struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

#[tokio::test]
async fn client_closing_the_connection_before_the_response_cancels_and_releases() {
    let tracker = tracker(1_000);
    let (app, mut handler) = never_completing_app(&tracker);
    let server = serve(app).await;

    let socket = raw_send(
        server.addr,
        b"POST /wait HTTP/1.1\r\nhost: test\r\nx-tenant-id: acme\r\n\
          x-token-estimate: 600\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    let held = within("the handler to start", handler.started.recv()).await;
    assert_eq!(held, Some(600));
    assert_eq!(tracker.in_flight("acme"), 600);

    drop(socket);
    within("the handler future to be dropped", handler.dropped.recv()).await;
    wait_for_in_flight(&tracker, "acme", 0).await;
}

#[tokio::test]
async fn client_giving_up_on_a_slow_response_releases_the_reservation() {
    let tracker = tracker(1_000);
    let (app, mut handler) = never_completing_app(&tracker);
    let server = serve(app).await;
    let client = client();

    for tokens in [900, 1_000] {
        let mut request = Box::pin(client.request(metered(&server, "/wait", "acme", tokens)));
        // Wait (with the request in flight) until the handler runs, then give up on it.
        tokio::select! {
            response = &mut request => panic!("no response can arrive: {response:?}"),
            held = within("the handler to start", handler.started.recv()) => {
                assert_eq!(held, Some(tokens));
            }
        }
        assert_eq!(tracker.in_flight("acme"), tokens);
        drop(request); // the client gives up

        within("the handler future to be dropped", handler.dropped.recv()).await;
        // Released: the next round is admitted with the whole cap.
        wait_for_in_flight(&tracker, "acme", 0).await;
    }
}

type TestBody = Full<Bytes>;
type Pending = std::future::Pending<Result<Response<TestBody>, Infallible>>;

/// An inner service whose calls never complete.
fn pending_inner<B>(
    calls: Calls,
) -> impl Service<
    Request<RequestBody<B>>,
    Response = Response<TestBody>,
    Error = Infallible,
    Future = Pending,
> + Clone {
    tower::service_fn(move |_: Request<RequestBody<B>>| {
        calls.hit();
        std::future::pending()
    })
}

fn ok_body(text: &'static str) -> Response<TestBody> {
    Response::new(Full::new(Bytes::from_static(text.as_bytes())))
}

fn header_request(tenant: &str, tokens: u64) -> Request<TestBody> {
    Request::post("/")
        .header("x-tenant-id", tenant)
        .header("x-token-estimate", tokens.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn dropping_the_response_future_before_completion_releases() {
    let tracker = tracker(1_000);
    let calls = Calls::default();
    let mut service = TenantTokenLayer::new(tracker.clone()).layer(pending_inner(calls.clone()));

    let future = service
        .ready()
        .await
        .unwrap()
        .call(header_request("acme", 300));
    let mut future = Box::pin(future);
    assert!(futures_util::poll!(future.as_mut()).is_pending());
    assert_eq!(calls.get(), 1);
    assert_eq!(tracker.in_flight("acme"), 300, "held while the call runs");

    drop(future);
    assert_eq!(tracker.in_flight("acme"), 0);
    assert_eq!(tracker.tenant_state("acme").unwrap().reservations, 0);
}

#[tokio::test]
async fn dropping_the_future_while_a_body_estimator_reads_reserves_nothing() {
    let tracker = tracker(10_000);
    let calls = Calls::default();
    let mut service = TenantTokenLayer::new(tracker.clone())
        .estimator(OpenAiEstimator::new())
        .layer(pending_inner(calls.clone()));

    // A body that never finishes arriving.
    let (body_tx, body_rx) = mpsc::unbounded_channel::<Result<Frame<Bytes>, Infallible>>();
    body_tx
        .send(Ok(Frame::data(Bytes::from_static(b"{\"max_tokens\":"))))
        .unwrap();
    let body = StreamBody::new(futures_util::stream::poll_fn({
        let mut body_rx = body_rx;
        move |cx| body_rx.poll_recv(cx)
    }));
    let request = Request::post("/")
        .header("x-tenant-id", "acme")
        .body(body)
        .unwrap();
    let mut future = Box::pin(service.ready().await.unwrap().call(request));
    assert!(futures_util::poll!(future.as_mut()).is_pending());
    assert_eq!(
        tracker.in_flight("acme"),
        0,
        "nothing reserved before the body"
    );
    drop(future);
    assert_eq!(calls.get(), 0);
    assert_eq!(tracker.in_flight("acme"), 0);
    assert!(body_tx.is_closed(), "the request body was dropped");

    // Once the body is in, the estimate is reserved, and dropping the call releases it.
    let body = br#"{"max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let expected = OpenAiEstimator::new().estimate(body).unwrap();
    let request = Request::post("/")
        .header("x-tenant-id", "acme")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    let mut service = TenantTokenLayer::new(tracker.clone())
        .estimator(OpenAiEstimator::new())
        .layer(pending_inner(calls.clone()));
    let mut future = Box::pin(service.ready().await.unwrap().call(request));
    assert!(futures_util::poll!(future.as_mut()).is_pending());
    assert_eq!(tracker.in_flight("acme"), expected);
    assert_eq!(calls.get(), 1);
    drop(future);
    assert_eq!(tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn inner_service_error_releases_at_once() {
    let tracker = tracker(1_000);
    let service = TenantTokenLayer::new(tracker.clone()).layer(tower::service_fn(
        |_: Request<RequestBody<TestBody>>| async {
            Err::<Response<TestBody>, _>(io::Error::other("upstream down"))
        },
    ));
    let error = service
        .oneshot(header_request("acme", 500))
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "upstream down");
    assert_eq!(tracker.in_flight("acme"), 0);
    let state = tracker.tenant_state("acme").unwrap();
    assert_eq!((state.high_water, state.reservations), (500, 0));
}

#[tokio::test]
async fn a_response_dropped_unread_releases_and_one_read_to_the_end_releases_too() {
    let tracker = tracker(1_000);
    let service = TenantTokenLayer::new(tracker.clone()).layer(tower::service_fn(
        |_: Request<RequestBody<TestBody>>| async { Ok::<_, Infallible>(ok_body("answer")) },
    ));

    let response = service
        .clone()
        .oneshot(header_request("acme", 400))
        .await
        .unwrap();
    assert_eq!(tracker.in_flight("acme"), 400, "the body has not been sent");
    drop(response);
    assert_eq!(tracker.in_flight("acme"), 0);

    let response = service.oneshot(header_request("acme", 400)).await.unwrap();
    assert_eq!(tracker.in_flight("acme"), 400);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "answer");
    assert_eq!(tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn the_body_releases_at_its_last_frame_even_while_still_held() {
    let tracker = tracker(1_000);
    // A fixed-length body: a consumer that knows the length stops polling after the last
    // data frame, so the release must not wait for a final `None`.
    let service = TenantTokenLayer::new(tracker.clone()).layer(tower::service_fn(
        |_: Request<RequestBody<TestBody>>| async { Ok::<_, Infallible>(ok_body("answer")) },
    ));
    let mut body = service
        .oneshot(header_request("acme", 400))
        .await
        .unwrap()
        .into_body();
    assert_eq!(tracker.in_flight("acme"), 400);
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "answer");
    assert_eq!(tracker.in_flight("acme"), 0, "released with the last frame");

    // A streamed body of unknown length: released when it reports its end.
    let (chunks, rx) = mpsc::unbounded_channel::<Bytes>();
    let rx = Arc::new(Mutex::new(Some(rx)));
    let service = TenantTokenLayer::new(tracker.clone()).layer(tower::service_fn(
        move |_: Request<RequestBody<TestBody>>| {
            let mut rx = rx.lock().unwrap().take().expect("one call");
            async move {
                let frames = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
                    .map(|data| Ok::<_, Infallible>(Frame::data(data)));
                Ok::<_, Infallible>(Response::new(StreamBody::new(frames)))
            }
        },
    ));
    let mut body = service
        .oneshot(header_request("acme", 700))
        .await
        .unwrap()
        .into_body();
    chunks.send(Bytes::from_static(b"one")).unwrap();
    assert!(body.frame().await.unwrap().is_ok());
    assert_eq!(tracker.in_flight("acme"), 700, "held between chunks");
    drop(chunks);
    assert!(body.frame().await.is_none());
    assert_eq!(
        tracker.in_flight("acme"),
        0,
        "released at the end, body still held"
    );
    drop(body);
    assert_eq!(tracker.tenant_state("acme").unwrap().reservations, 0);
}

#[tokio::test]
async fn a_response_without_a_body_releases_as_soon_as_the_future_resolves() {
    let tracker = tracker(1_000);
    let service = TenantTokenLayer::new(tracker.clone()).layer(tower::service_fn(
        |_: Request<RequestBody<TestBody>>| async {
            let mut response = Response::new(TestBody::default());
            *response.status_mut() = StatusCode::NO_CONTENT;
            Ok::<_, Infallible>(response)
        },
    ));
    let response = service.oneshot(header_request("acme", 900)).await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    // The response (and its empty body) is still held, never polled.
    assert_eq!(tracker.in_flight("acme"), 0);
    assert_eq!(tracker.tenant_state("acme").unwrap().high_water, 900);
    drop(response);
}

#[tokio::test]
async fn panicking_handler_releases_and_the_server_keeps_serving() {
    let tracker = tracker(1_000);
    let seen = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route(
            "/",
            post({
                let seen = seen.clone();
                move |Extension(handle): Extension<ReservationHandle>, headers: HeaderMap| async move {
                    seen.store(handle.tokens(), Ordering::SeqCst);
                    if headers.contains_key("x-explode") {
                        panic!("handler exploded (expected by the test)");
                    }
                    "fine"
                }
            }),
        )
        .layer(TenantTokenLayer::new(tracker.clone()).reservation_handle(true));
    let server = serve(app).await;
    let client = client();

    let mut request = metered(&server, "/", "acme", 800);
    request
        .headers_mut()
        .insert("x-explode", "1".parse().unwrap());
    let failed = within("the panicking request", client.request(request)).await;
    assert!(failed.is_err(), "the connection fails: {failed:?}");
    assert_eq!(seen.load(Ordering::SeqCst), 800, "it was admitted first");
    wait_for_in_flight(&tracker, "acme", 0).await;

    let reply = call(&client, metered(&server, "/", "acme", 1_000)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "fine");
    assert_eq!(tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn a_body_error_mid_stream_releases_the_reservation() {
    let tracker = tracker(1_000);
    type Chunks = mpsc::UnboundedReceiver<Result<Bytes, io::Error>>;
    let slot: Arc<Mutex<Option<Chunks>>> = Arc::default();
    let app = Router::new()
        .route(
            "/",
            post({
                let slot = slot.clone();
                move || async move {
                    let mut rx = slot.lock().unwrap().take().expect("one request");
                    Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
                }
            }),
        )
        .layer(TenantTokenLayer::new(tracker.clone()));
    let server = serve(app).await;
    let (chunks, rx) = mpsc::unbounded_channel();
    *slot.lock().unwrap() = Some(rx);

    let response = send(&client(), metered(&server, "/", "acme", 300)).await;
    let mut body = response.into_body();
    chunks.send(Ok(Bytes::from_static(b"partial"))).unwrap();
    assert_eq!(next_data(&mut body).await.as_deref(), Some(&b"partial"[..]));
    assert_eq!(tracker.in_flight("acme"), 300);

    chunks
        .send(Err(io::Error::other("upstream broke")))
        .unwrap();
    let end = within("the broken body", body.frame()).await;
    assert!(
        matches!(end, Some(Err(_))),
        "the client sees a broken body, got {end:?}"
    );
    wait_for_in_flight(&tracker, "acme", 0).await;
}

/// An app whose handlers report the tokens they hold in `x-reserved`.
fn bodiless_app(tracker: &Arc<TenantTokenTracker>, source: StreamSource) -> Router {
    let reserved = |handle: &ReservationHandle| [("x-reserved", handle.tokens().to_string())];
    Router::new()
        .route(
            "/stream",
            get(move |Extension(handle): Extension<ReservationHandle>| {
                let source = source.clone();
                async move { (reserved(&handle), source.body()) }
            }),
        )
        .route(
            "/no-content",
            post(
                move |Extension(handle): Extension<ReservationHandle>| async move {
                    (StatusCode::NO_CONTENT, reserved(&handle))
                },
            ),
        )
        .route(
            "/empty",
            post(
                move |Extension(handle): Extension<ReservationHandle>| async move {
                    (reserved(&handle), ())
                },
            ),
        )
        .layer(TenantTokenLayer::new(tracker.clone()).reservation_handle(true))
}

#[tokio::test]
async fn head_request_releases_as_soon_as_the_head_arrives() {
    let tracker = tracker(1_000);
    let (source, mut streams) = streams();
    let server = serve(bodiless_app(&tracker, source)).await;

    let mut request = metered(&server, "/stream", "acme", 700);
    *request.method_mut() = Method::HEAD;
    let response = send(&client(), request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-reserved"], "700", "it was admitted");
    assert_eq!(
        tracker.in_flight("acme"),
        0,
        "no body will be sent for HEAD"
    );
    let chunks = streams.next().await;
    assert!(chunks.is_closed(), "the streamed body was dropped unsent");
    assert!(read(response).await.body.is_empty());

    // A GET of the same resource holds until its stream ends.
    let mut request = metered(&server, "/stream", "acme", 700);
    *request.method_mut() = Method::GET;
    let response = send(&client(), request).await;
    assert_eq!(tracker.in_flight("acme"), 700);
    drop(streams.next().await);
    assert!(read(response).await.body.is_empty());
    assert_eq!(tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn no_content_response_releases_as_soon_as_the_head_arrives() {
    let tracker = tracker(1_000);
    let server = serve(bodiless_app(&tracker, streams().0)).await;

    let response = send(&client(), metered(&server, "/no-content", "acme", 900)).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(response.headers()["x-reserved"], "900");
    assert_eq!(tracker.in_flight("acme"), 0);
    assert_eq!(tracker.tenant_state("acme").unwrap().reservations, 0);
    drop(response);
}

#[tokio::test]
async fn empty_body_response_releases_as_soon_as_the_head_arrives() {
    let tracker = tracker(1_000);
    let server = serve(bodiless_app(&tracker, streams().0)).await;

    let response = send(&client(), metered(&server, "/empty", "acme", 900)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-reserved"], "900");
    assert_eq!(tracker.in_flight("acme"), 0, "before the body is read");
    assert!(read(response).await.body.is_empty());
}

/// A handler that shrinks its reservation, then grows it past the cap, reporting what the
/// tracker said after each step, and streams a body the test drives.
fn reconciling_app(
    tracker: &Arc<TenantTokenTracker>,
    source: StreamSource,
    kept: Arc<Mutex<Option<ReservationHandle>>>,
) -> Router {
    let ledger = tracker.clone();
    Router::new()
        .route(
            "/",
            post(move |Extension(handle): Extension<ReservationHandle>| {
                let (ledger, source, kept) = (ledger.clone(), source.clone(), kept.clone());
                async move {
                    let tenant = handle.tenant_id().to_owned();
                    let estimated = handle.tokens();
                    let shrunk = handle.resize(200);
                    let after_shrink = ledger.in_flight(&tenant);
                    let grown = handle.resize(1_500);
                    let after_grow = ledger.in_flight(&tenant);
                    *kept.lock().unwrap() = Some(handle);
                    let headers = [
                        ("x-tenant", tenant),
                        ("x-estimated", estimated.to_string()),
                        ("x-shrunk", format!("{shrunk}/{after_shrink}")),
                        ("x-grown", format!("{grown}/{after_grow}")),
                    ];
                    (headers, source.body())
                }
            }),
        )
        .layer(TenantTokenLayer::new(tracker.clone()).reservation_handle(true))
}

#[tokio::test]
async fn handler_reconciles_through_the_reservation_handle_and_release_is_exact() {
    let tracker = tracker(1_000);
    let (source, mut streams) = streams();
    let kept = Arc::new(Mutex::new(None));
    let server = serve(reconciling_app(&tracker, source, kept.clone())).await;
    let client = client();

    let response = send(&client, metered(&server, "/", "acme", 500)).await;
    let headers = response.headers().clone();
    assert_eq!(headers["x-tenant"], "acme");
    assert_eq!(headers["x-estimated"], "500");
    assert_eq!(
        headers["x-shrunk"], "200/200",
        "shrinking returns tokens at once"
    );
    assert_eq!(
        headers["x-grown"], "1500/1500",
        "growth past the cap is allowed"
    );
    let chunks = streams.next().await;

    let state = tracker.tenant_state("acme").unwrap();
    assert_eq!(state.in_flight, 1_500);
    assert_eq!(state.overcommits, 1, "the overshoot is visible");
    assert_eq!(state.reservations, 1);

    // Over the cap: even one more token is refused, and nothing is left.
    let refused = call(&client, metered(&server, "/", "acme", 1)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), Some("0"));
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("1000"));

    let handle = kept.lock().unwrap().clone().unwrap();
    assert_eq!(handle.tokens(), 1_500);
    assert!(!handle.is_released());
    assert!(
        handle.try_resize(1_600).is_err(),
        "try_resize grows only within the cap"
    );
    assert_eq!(
        tracker.in_flight("acme"),
        1_500,
        "a refused try_resize changes nothing"
    );

    drop(chunks);
    assert_eq!(read(response).await.status, StatusCode::OK);
    assert_eq!(
        tracker.in_flight("acme"),
        0,
        "exactly what was held is returned"
    );
    assert!(handle.is_released());
    assert_eq!(handle.tokens(), 0);
    assert_eq!(handle.resize(50), 0, "a released handle changes nothing");
    assert!(handle.try_resize(50).is_ok());
    assert_eq!(tracker.in_flight("acme"), 0, "no drift after the response");
    let state = tracker.tenant_state("acme").unwrap();
    assert_eq!((state.reservations, state.overcommits), (0, 1));
}
