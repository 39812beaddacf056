//! Helpers shared by the HTTP integration tests: servers on 127.0.0.1, a client, raw
//! sockets, streamed responses the test drives chunk by chunk, and bounded waits.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;
use http::header::HeaderMap;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tower_tenant_tokens::{BoxError, TenantTokenTracker};

pub mod fair;
pub mod redis_server;

/// The longest any single step of a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);
/// How often bounded waits look again.
pub const POLL: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------

/// A server on 127.0.0.1; aborted (no new connections) when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TestServer {
    /// `http://127.0.0.1:port/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops accepting connections.
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves an axum app with `axum::serve` on an ephemeral port.
pub async fn serve(app: Router) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("axum::serve");
    });
    TestServer { addr, task }
}

/// Serves a tower service with plain hyper (HTTP/1) through `TowerToHyperService`.
pub async fn serve_tower<S, B>(service: S) -> TestServer
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    TestServer { addr, task }
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

/// The request body the test client sends.
pub type ReqBody = BoxBody<Bytes, Infallible>;
/// hyper-util's legacy client over plain TCP.
pub type HttpClient = Client<HttpConnector, ReqBody>;

/// A client that opens a fresh connection per request, so a connection the server
/// closed (after a refusal, a panic) is never reused by a later request.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

/// A client that keeps connections alive between requests.
pub fn pooled_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn empty() -> ReqBody {
    Empty::<Bytes>::new().boxed()
}

/// A body sent with `Content-Length`.
pub fn full(data: impl Into<Bytes>) -> ReqBody {
    Full::new(data.into()).boxed()
}

/// A body sent chunked, without `Content-Length`, one chunk per item.
pub fn chunked<I>(chunks: I) -> ReqBody
where
    I: IntoIterator,
    I::Item: Into<Bytes>,
{
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
        .into_iter()
        .map(|chunk| Ok(Frame::data(chunk.into())))
        .collect();
    BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

/// A POST to `path` charged to `tenant` with a header estimate of `tokens`.
pub fn metered(server: &TestServer, path: &str, tenant: &str, tokens: u64) -> Request<ReqBody> {
    Request::post(server.url(path))
        .header("x-tenant-id", tenant)
        .header("x-token-estimate", tokens.to_string())
        .body(empty())
        .expect("request")
}

/// Sends `request` and returns the response head (the body still streaming).
pub async fn send(client: &HttpClient, request: Request<ReqBody>) -> Response<Incoming> {
    within("the response head", client.request(request))
        .await
        .expect("the request failed")
}

/// A response read to its end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|value| value.to_str().expect("visible ASCII header"))
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// The `code` of the OpenAI-shaped error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error.code in {}", self.text()))
            .to_owned()
    }
}

/// Reads a response to its end.
pub async fn read(response: Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = within("the response body", body.collect())
        .await
        .expect("the response body failed")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends `request` and reads the response to its end.
pub async fn call(client: &HttpClient, request: Request<ReqBody>) -> Reply {
    read(send(client, request).await).await
}

/// The next data frame of a response body; `None` at its end.
pub async fn next_data(body: &mut Incoming) -> Option<Bytes> {
    loop {
        match within("the next body frame", body.frame()).await {
            None => return None,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Some(data);
                }
            }
            Some(Err(error)) => panic!("the response body failed: {error}"),
        }
    }
}

/// Checks that a refusal has the default OpenAI-shaped JSON body, and returns its code.
pub fn assert_openai_error(reply: &Reply, status: StatusCode) -> String {
    assert_eq!(reply.status, status, "body: {}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let json = reply.json();
    let error = json["error"]
        .as_object()
        .unwrap_or_else(|| panic!("no error object in {json}"));
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{json}"
    );
    assert!(error["type"].is_string(), "{json}");
    error["code"].as_str().expect("error.code").to_owned()
}

// ---------------------------------------------------------------------------------------
// Raw sockets
// ---------------------------------------------------------------------------------------

/// Connects and writes `request` verbatim.
pub async fn raw_send(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    within("write the request", stream.write_all(request))
        .await
        .expect("write the request");
    stream
}

/// Reads from `stream` into `buf` until `needle` appears in it.
pub async fn raw_read_until(stream: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) {
    within("raw read", async {
        while !contains(buf, needle) {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("raw read");
            assert!(
                n > 0,
                "connection closed before {:?} arrived; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
}

/// Sends a raw request (which should say `connection: close`) and returns the status
/// code of the response and everything the server sent.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = raw_send(addr, request).await;
    let mut buf = Vec::new();
    within("raw response", stream.read_to_end(&mut buf))
        .await
        .expect("raw read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 response: {text:?}"));
    (status, text)
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// Streamed responses driven by the test
// ---------------------------------------------------------------------------------------

/// Handed to handlers: each call to [`body`](Self::body) makes a streamed response body
/// whose chunks the test sends through [`Streams::next`].
#[derive(Clone)]
pub struct StreamSource {
    senders: mpsc::UnboundedSender<mpsc::UnboundedSender<Bytes>>,
}

/// The test's side: one chunk sender per streamed response, in the order handlers made
/// them. Dropping a sender ends that response.
pub struct Streams {
    senders: mpsc::UnboundedReceiver<mpsc::UnboundedSender<Bytes>>,
}

pub fn streams() -> (StreamSource, Streams) {
    let (senders, receiver) = mpsc::unbounded_channel();
    (StreamSource { senders }, Streams { senders: receiver })
}

impl StreamSource {
    /// A response body that yields what the test sends and ends when it drops the sender.
    pub fn body(&self) -> Body {
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        let _ = self.senders.send(tx);
        Body::from_stream(
            futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(Ok::<_, Infallible>),
        )
    }
}

impl Streams {
    /// The chunk sender of the next streamed response a handler started.
    pub async fn next(&mut self) -> mpsc::UnboundedSender<Bytes> {
        within("a handler to start streaming", self.senders.recv())
            .await
            .expect("no handler left to start streaming")
    }
}

/// Counts calls that reach the inner service.
#[derive(Clone, Default)]
pub struct Calls(Arc<AtomicUsize>);

impl Calls {
    pub fn hit(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------
// Windows over time
// ---------------------------------------------------------------------------------------

/// Sends 200 requests of `tokens` for `tenant` at once, spread over `servers` in turn,
/// and checks that a window of `limit` tokens per minute (full at the start) admitted
/// what it held and what refilled while they ran, no more, every other refused with
/// `window_exceeded`. Returns how many were admitted.
pub async fn burst_against_a_window(
    servers: &[&TestServer],
    tenant: &str,
    tokens: u64,
    limit: u64,
) -> u64 {
    let client = pooled_client();
    let started = Instant::now();
    let requests = (0..200).map(|n| {
        let client = client.clone();
        let request = metered(servers[n % servers.len()], "/ok", tenant, tokens);
        tokio::spawn(async move { call(&client, request).await })
    });
    let replies = futures_util::future::join_all(requests).await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut admitted = 0;
    for reply in replies {
        let reply = reply.unwrap();
        match reply.status {
            StatusCode::OK => admitted += 1,
            _ => assert_eq!(
                assert_openai_error(&reply, StatusCode::TOO_MANY_REQUESTS),
                "window_exceeded"
            ),
        }
    }
    let (limit, tokens) = (limit as f64, tokens as f64);
    let allowed = ((limit + elapsed * limit / 60.0) / tokens).floor();
    assert!(
        admitted as f64 >= (limit / tokens).floor(),
        "{admitted} admitted"
    );
    assert!(
        admitted as f64 <= allowed,
        "{admitted} admitted by {} server(s), {allowed} allowed in {elapsed:.2}s",
        servers.len()
    );
    admitted
}

// ---------------------------------------------------------------------------------------
// Bounded waits
// ---------------------------------------------------------------------------------------

/// Awaits `future`, failing the test if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(WAIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Polls until `condition` holds, failing the test after [`WAIT`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `tracker.in_flight(tenant)` until it equals `expected`, failing the test after
/// [`WAIT`]. For releases that happen on the server after the client has gone.
pub async fn wait_for_in_flight(tracker: &TenantTokenTracker, tenant: &str, expected: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = tracker.in_flight(tenant);
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "in_flight({tenant:?}) is {now}, expected {expected} within {WAIT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A proptest runner with `cases` cases (or `PROPTEST_CASES`), writing no failure files
/// (the panic message shows the smallest failing input).
pub fn runner(cases: u32) -> proptest::test_runner::TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })
}

/// Reserves `tokens` on `tracker` until a reservation is drawn from its headroom (the
/// first ask Redis while the headroom is made in the background), and returns it.
#[cfg(feature = "redis")]
pub async fn drawn(
    tracker: &tower_tenant_tokens::redis::RedisTokenTracker,
    tenant: &str,
    tokens: u64,
) -> tower_tenant_tokens::redis::RedisReservation {
    let deadline = Instant::now() + WAIT;
    loop {
        let reservation = tracker.reserve(tenant, tokens).await.expect("admitted");
        if reservation.is_drawn_from_headroom() {
            return reservation;
        }
        drop(reservation);
        assert!(Instant::now() < deadline, "nothing drawn from headroom");
        tokio::time::sleep(POLL).await;
    }
}
