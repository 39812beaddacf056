//! The layer's `Service` contract, tested as tower tests its own middleware: around
//! `tower_test`'s mock service, driven one poll at a time, so each promise is checked at
//! the step where it must hold. Readiness is the inner service's; nothing is reserved
//! before `call`; the reservation lives exactly as long as the request (its future, then
//! its response body) whichever way it ends; inner errors pass through untouched; and a
//! refused request never reaches the inner service.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{empty, full, ReqBody};
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::mpsc;
use tokio_test::{assert_pending, assert_ready, assert_ready_err, assert_ready_ok, task};
use tower::limit::ConcurrencyLimitLayer;
use tower::Layer;
use tower_tenant_tokens::body::{RequestBody, ResponseBody};
use tower_tenant_tokens::{Estimator, TenantTokenLayer, TenantTokenService, TenantTokenTracker};
use tower_test::mock;

/// What the inner (mock) service receives: the client's request with its body wrapped.
type Inner = Request<RequestBody<ReqBody>>;
type Handle = mock::Handle<Inner, Response<Frames>>;
type Layered = mock::Spawn<TenantTokenService<mock::Mock<Inner, Response<Frames>>>>;

fn tracker(cap: u64) -> Arc<TenantTokenTracker> {
    Arc::new(TenantTokenTracker::new(cap))
}

/// `layer` around a mock service, with the handle that drives the mock.
fn layered(layer: TenantTokenLayer) -> (Layered, Handle) {
    mock::spawn_layer(layer)
}

/// A request charged to `tenant` with a header estimate of `tokens` and an empty body.
fn request(tenant: &str, tokens: u64) -> Request<ReqBody> {
    request_with(tenant, tokens, empty())
}

fn request_with(tenant: &str, tokens: u64, body: ReqBody) -> Request<ReqBody> {
    Request::post("/v1/chat/completions")
        .header("x-tenant-id", tenant)
        .header("x-token-estimate", tokens)
        .body(body)
        .unwrap()
}

/// Tokens in flight and live reservations, summed over every tenant the tracker knows.
fn held(tracker: &TenantTokenTracker) -> (u64, u64) {
    tracker
        .snapshot()
        .iter()
        .fold((0, 0), |(tokens, reservations), (_, state)| {
            (tokens + state.in_flight, reservations + state.reservations)
        })
}

/// A request body that arrives as the test sends it, and ends when the sender is dropped.
fn trickle() -> (mpsc::UnboundedSender<Bytes>, ReqBody) {
    let (chunks, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let frames = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
        .map(|data| Ok::<_, Infallible>(Frame::data(data)));
    (chunks, BodyExt::boxed(StreamBody::new(frames)))
}

/// A response body of several frames, read one poll at a time. A `sized` one reports its
/// end along with its last frame, as a body of known length does; a `stream` only when
/// polled once more, as a chunked stream does.
#[derive(Debug)]
struct Frames {
    left: VecDeque<Bytes>,
    sized: bool,
}

impl Frames {
    fn sized(frames: &[&'static str]) -> Response<Self> {
        Self::response(frames, true)
    }

    fn stream(frames: &[&'static str]) -> Response<Self> {
        Self::response(frames, false)
    }

    fn response(frames: &[&'static str], sized: bool) -> Response<Self> {
        let left = frames.iter().map(|f| Bytes::from_static(f.as_bytes()));
        Response::new(Self {
            left: left.collect(),
            sized,
        })
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.left.pop_front().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.sized && self.left.is_empty()
    }
}

/// The next data frame of a response body, as text; `None` at its end.
async fn next(body: &mut ResponseBody<Frames>) -> Option<String> {
    let frame = body.frame().await?.unwrap();
    let data = frame.into_data().expect("only data frames");
    Some(String::from_utf8(data.to_vec()).unwrap())
}

/// An error of the inner service's own, to tell it apart from anything the layer makes.
#[derive(Debug, PartialEq)]
struct Upstream(&'static str);

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "upstream: {}", self.0)
    }
}

impl std::error::Error for Upstream {}

#[tokio::test]
async fn poll_ready_is_the_inner_services_readiness_and_its_error_passes_through_unchanged() {
    let (mut service, mut handle) = layered(TenantTokenLayer::new(tracker(1_000)));

    handle.allow(0);
    assert_pending!(service.poll_ready(), "the inner service is not ready");
    assert_pending!(service.poll_ready());
    assert!(!service.is_woken());
    handle.allow(1);
    assert!(
        service.is_woken(),
        "the inner service's wake-up reaches the caller"
    );
    assert_ready_ok!(service.poll_ready());

    handle.send_error(Upstream("connection pool closed"));
    let error = assert_ready_err!(service.poll_ready());
    assert_eq!(
        error.downcast_ref::<Upstream>(),
        Some(&Upstream("connection pool closed")),
        "the inner error itself, not a wrapper: {error}"
    );
}

#[tokio::test]
async fn nothing_is_reserved_before_call_and_the_estimate_is_held_from_call_on() {
    let tracker = tracker(1_000);
    let (mut service, mut handle) = layered(TenantTokenLayer::new(tracker.clone()));

    assert_ready_ok!(service.poll_ready());
    assert_ready_ok!(service.poll_ready());
    assert_eq!(held(&tracker), (0, 0), "readiness reserves nothing");

    let mut response = task::spawn(service.call(request_with("acme", 300, full("the prompt"))));
    assert_eq!(
        tracker.in_flight("acme"),
        300,
        "reserved in call, before the future is polled"
    );
    assert_pending!(response.poll());
    assert_eq!(tracker.in_flight("acme"), 300, "held while the call runs");

    // The inner service gets the request as it came.
    let (inner, send) = handle.next_request().await.expect("a request");
    assert_eq!(inner.method(), Method::POST);
    assert_eq!(inner.uri(), "/v1/chat/completions");
    assert_eq!(inner.headers()["x-tenant-id"], "acme");
    assert_eq!(inner.headers()["x-token-estimate"], "300");
    let body = inner.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "the prompt");
    assert_eq!(tracker.in_flight("acme"), 300);

    send.send_response(Frames::sized(&["answer"]));
    assert!(response.is_woken());
    let response = assert_ready_ok!(response.poll());
    drop(response);
    assert_eq!(held(&tracker), (0, 0));
}

#[tokio::test]
async fn dropping_the_response_future_while_the_inner_call_is_pending_releases() {
    let tracker = tracker(1_000);
    let (mut service, mut handle) = layered(TenantTokenLayer::new(tracker.clone()));

    assert_ready_ok!(service.poll_ready());
    let mut response = task::spawn(service.call(request("acme", 600)));
    assert_pending!(response.poll());
    let (_, send) = handle.next_request().await.expect("a request");
    assert_eq!(held(&tracker), (600, 1));

    drop(response); // the client went away
    assert_eq!(held(&tracker), (0, 0));
    send.send_response(Frames::stream(&["too late"]));
    assert_eq!(held(&tracker), (0, 0), "a late answer changes nothing");

    // The whole cap is free again.
    assert_ready_ok!(service.poll_ready());
    let _whole = service.call(request("acme", 1_000));
    assert_eq!(tracker.in_flight("acme"), 1_000);
}

#[tokio::test]
async fn dropping_the_response_future_while_a_body_estimator_reads_reserves_and_calls_nothing() {
    let tracker = tracker(1_000);
    let bytes = Estimator::from_body_fn(1_024, |_, body| Ok(body.len() as u64));
    let layer = TenantTokenLayer::new(tracker.clone()).estimator(bytes);
    let (mut service, mut handle) = layered(layer);

    let (chunks, body) = trickle();
    chunks.send(Bytes::from_static(b"half a prom")).unwrap();
    assert_ready_ok!(service.poll_ready());
    let mut response = task::spawn(service.call(request_with("acme", 1, body)));
    assert_pending!(response.poll(), "reading the body");
    assert_eq!(
        held(&tracker),
        (0, 0),
        "nothing reserved before the body is in"
    );
    assert_pending!(
        handle.poll_request(),
        "nothing called before the body is in"
    );

    drop(response); // the client went away mid-upload
    assert!(chunks.is_closed(), "the request body was dropped with it");
    assert_eq!(held(&tracker), (0, 0));
    assert_pending!(
        handle.poll_request(),
        "the inner service never sees the request"
    );

    // The same service, given a whole body, reserves what the estimator says and calls.
    assert_ready_ok!(service.poll_ready());
    let mut response = task::spawn(service.call(request_with("acme", 1, full("a whole prompt"))));
    assert_pending!(response.poll());
    assert_eq!(held(&tracker), (14, 1));
    let (inner, _send) = handle.next_request().await.expect("a request");
    let body = inner.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "a whole prompt");
}

#[tokio::test]
async fn dropping_the_response_future_while_waiting_for_capacity_leaves_nothing_behind() {
    let tracker = tracker(100);
    let layer = TenantTokenLayer::new(tracker.clone()).wait_for_capacity(Duration::from_secs(60));
    let (mut service, mut handle) = layered(layer);

    assert_ready_ok!(service.poll_ready());
    let mut first = task::spawn(service.call(request("acme", 80)));
    assert_pending!(first.poll());
    let (_, _first_send) = handle.next_request().await.expect("a request");

    assert_ready_ok!(service.poll_ready());
    let mut waiting = task::spawn(service.call(request("acme", 50)));
    assert_pending!(waiting.poll(), "over the cap: it waits");
    assert_eq!(
        held(&tracker),
        (80, 1),
        "a waiting request reserves nothing"
    );
    assert_pending!(handle.poll_request(), "nor reaches the inner service");
    drop(waiting); // the client gave up
    assert_eq!(held(&tracker), (80, 1));

    // A later request waits too, and is the next in line now.
    assert_ready_ok!(service.poll_ready());
    let mut later = task::spawn(service.call(request("acme", 50)));
    assert_pending!(later.poll());
    assert_eq!(held(&tracker), (80, 1));
    assert!(!later.is_woken());

    drop(first); // its 80 tokens come back
    assert!(
        later.is_woken(),
        "the release wakes the request now first in line"
    );
    assert_pending!(later.poll(), "admitted, the inner call pending");
    assert_eq!(held(&tracker), (50, 1));
    let (inner, _send) = assert_ready!(handle.poll_request()).expect("a request");
    assert_eq!(inner.headers()["x-token-estimate"], "50");
}

#[tokio::test]
async fn the_reservation_is_held_across_the_response_until_its_last_frame() {
    let tracker = tracker(1_000);
    let (mut service, mut handle) = layered(TenantTokenLayer::new(tracker.clone()));

    // A body of known length: released with its last frame, before its end is polled.
    assert_ready_ok!(service.poll_ready());
    let response = service.call(request("acme", 400));
    let (_, send) = handle.next_request().await.expect("a request");
    send.send_response(Frames::sized(&["one", "two", "three"]));
    let mut body = response.await.unwrap().into_body();
    assert_eq!(
        held(&tracker),
        (400, 1),
        "held once the response has arrived"
    );
    for frame in ["one", "two"] {
        assert_eq!(next(&mut body).await.as_deref(), Some(frame));
        assert_eq!(held(&tracker), (400, 1), "held after {frame:?}");
    }
    assert_eq!(next(&mut body).await.as_deref(), Some("three"));
    assert_eq!(held(&tracker), (0, 0), "released with the last frame");
    assert_eq!(next(&mut body).await, None);

    // A stream: held after its last data frame, released when it reports its end.
    assert_ready_ok!(service.poll_ready());
    let response = service.call(request("acme", 700));
    let (_, send) = handle.next_request().await.expect("a request");
    send.send_response(Frames::stream(&["one", "two"]));
    let mut body = response.await.unwrap().into_body();
    assert_eq!(held(&tracker), (700, 1));
    for frame in ["one", "two"] {
        assert_eq!(next(&mut body).await.as_deref(), Some(frame));
        assert_eq!(held(&tracker), (700, 1), "held after {frame:?}");
    }
    assert_eq!(next(&mut body).await, None);
    assert_eq!(held(&tracker), (0, 0), "released at the end of the stream");
}

#[tokio::test]
async fn dropping_the_response_body_early_releases() {
    let tracker = tracker(1_000);
    let (mut service, mut handle) = layered(TenantTokenLayer::new(tracker.clone()));

    // Dropped after its first frame.
    assert_ready_ok!(service.poll_ready());
    let response = service.call(request("acme", 400));
    let (_, send) = handle.next_request().await.expect("a request");
    send.send_response(Frames::sized(&["one", "two", "three"]));
    let mut body = response.await.unwrap().into_body();
    assert_eq!(next(&mut body).await.as_deref(), Some("one"));
    assert_eq!(held(&tracker), (400, 1));
    drop(body);
    assert_eq!(held(&tracker), (0, 0));

    // Dropped unread.
    assert_ready_ok!(service.poll_ready());
    let response = service.call(request("acme", 1_000));
    let (_, send) = handle.next_request().await.expect("a request");
    send.send_response(Frames::stream(&["one", "two"]));
    let response = response.await.unwrap();
    assert_eq!(held(&tracker), (1_000, 1));
    drop(response);
    assert_eq!(held(&tracker), (0, 0));
}

#[tokio::test]
async fn an_inner_error_releases_the_reservation_and_passes_through_unchanged() {
    let tracker = tracker(1_000);
    let (mut service, mut handle) = layered(TenantTokenLayer::new(tracker.clone()));

    assert_ready_ok!(service.poll_ready());
    let mut response = task::spawn(service.call(request("acme", 500)));
    let (_, send) = handle.next_request().await.expect("a request");
    assert_eq!(held(&tracker), (500, 1));
    send.send_error(Upstream("model overloaded"));
    let error = assert_ready_err!(response.poll());
    assert_eq!(
        error.downcast_ref::<Upstream>(),
        Some(&Upstream("model overloaded")),
        "the inner error itself, not a wrapper: {error}"
    );
    assert_eq!(error.to_string(), "upstream: model overloaded");
    // Released as the error comes out, not later when the finished future is dropped.
    assert_eq!(held(&tracker), (0, 0));
    drop(response);

    // An inner service that abandons the call fails it with its own error, released too.
    assert_ready_ok!(service.poll_ready());
    let mut response = task::spawn(service.call(request("acme", 500)));
    let (_, send) = handle.next_request().await.expect("a request");
    drop(send);
    let error = assert_ready_err!(response.poll());
    assert!(error.is::<mock::error::Closed>(), "{error}");
    assert_eq!(held(&tracker), (0, 0));
}

#[tokio::test]
async fn a_request_over_the_cap_gets_429_at_once_and_never_reaches_the_inner_service() {
    let tracker = tracker(1_000);
    let (mut service, mut handle) = layered(TenantTokenLayer::new(tracker.clone()));

    assert_ready_ok!(service.poll_ready());
    let _admitted = service.call(request("acme", 800));
    let (_, _send) = handle.next_request().await.expect("a request");

    assert_ready_ok!(service.poll_ready());
    let mut refused = task::spawn(service.call(request("acme", 201)));
    let response = assert_ready_ok!(refused.poll(), "answered at once");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_pending!(handle.poll_request(), "the inner service never sees it");
    assert_eq!(held(&tracker), (800, 1), "it reserves nothing");
    drop(response);
    assert_eq!(held(&tracker), (800, 1));

    // What is left of the cap still fits: the refusal was the cap's.
    assert_ready_ok!(service.poll_ready());
    let _fits = service.call(request("acme", 200));
    let (inner, _send) = assert_ready!(handle.poll_request()).expect("a request");
    assert_eq!(inner.headers()["x-token-estimate"], "200");
    assert_eq!(held(&tracker), (1_000, 2));
}

#[tokio::test]
async fn a_request_without_a_tenant_gets_400_at_once_and_never_reaches_the_inner_service() {
    let tracker = tracker(1_000);
    let (mut service, mut handle) = layered(TenantTokenLayer::new(tracker.clone()));

    assert_ready_ok!(service.poll_ready());
    let request = Request::post("/v1/chat/completions")
        .header("x-token-estimate", 100)
        .body(empty())
        .unwrap();
    let mut refused = task::spawn(service.call(request));
    let response = assert_ready_ok!(refused.poll(), "answered at once");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_pending!(handle.poll_request(), "the inner service never sees it");
    assert!(tracker.snapshot().is_empty(), "no tenant is even tracked");
}

#[tokio::test]
async fn a_request_waiting_for_capacity_leaves_the_inner_services_readiness_to_others() {
    let tracker = tracker(100);
    let (mock, mut handle) = mock::pair::<Inner, Response<Frames>>();
    let layer = TenantTokenLayer::new(tracker.clone()).wait_for_capacity(Duration::from_secs(60));
    let mut service = mock::Spawn::new(layer.layer(ConcurrencyLimitLayer::new(2).layer(mock)));

    // Tenant acme takes one of the inner service's two slots and all of its cap...
    assert_ready_ok!(service.poll_ready());
    let _first = service.call(request("acme", 100));
    let (_, _send) = handle.next_request().await.expect("a request");
    // ...and its next request waits for acme's capacity, not for the inner service's.
    assert_ready_ok!(service.poll_ready());
    let mut waiting = task::spawn(service.call(request("acme", 1)));
    assert_pending!(waiting.poll());

    // One slot is free and tenant globex is under its cap: it must not wait for acme.
    assert_ready_ok!(
        service.poll_ready(),
        "the free slot is held by acme's waiting request"
    );
    let _other = service.call(request("globex", 10));
    let (inner, _send) = assert_ready!(handle.poll_request()).expect("a request");
    assert_eq!(inner.headers()["x-tenant-id"], "globex");
}
