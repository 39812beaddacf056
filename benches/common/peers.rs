//! The peers every bench measures against, and the driver that runs one request.
//!
//! Shared by several bench targets, each of which uses only some of it.
// Built with the development toolchain; the declared MSRV is the library's.
#![allow(clippy::incompatible_msrv)]
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Empty;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

pub const TENANT: HeaderName = HeaderName::from_static("x-tenant-id");
pub const ESTIMATE: HeaderName = HeaderName::from_static("x-token-estimate");

/// The response every variant's innermost service gives.
pub type Reply = Response<axum::body::Body>;

/// The bare service: what each variant's overhead is measured over.
pub async fn bare<B>(_request: Request<B>) -> Result<Reply, Infallible> {
    Ok(Response::new(axum::body::Body::empty()))
}

/// A request with the tenant and estimate headers, as every variant reads them.
pub fn request(tenant: &str, tokens: u64) -> Request<Empty<Bytes>> {
    Request::post("/v1/chat/completions")
        .header(TENANT, tenant)
        .header(ESTIMATE, tokens)
        .body(Empty::new())
        .expect("valid request")
}

/// The headers an OpenAI SDK sends with a chat request (besides the tenant and the
/// estimate): what a gateway's requests look like, rather than the bare minimum.
pub const SDK_HEADERS: [(&str, &str); 17] = [
    ("host", "gateway.internal:8080"),
    ("accept-encoding", "gzip, deflate"),
    ("connection", "keep-alive"),
    ("accept", "application/json"),
    ("content-type", "application/json"),
    ("user-agent", "OpenAI/Python 1.109.1"),
    ("x-stainless-lang", "python"),
    ("x-stainless-package-version", "1.109.1"),
    ("x-stainless-os", "Linux"),
    ("x-stainless-arch", "x64"),
    ("x-stainless-runtime", "CPython"),
    ("x-stainless-runtime-version", "3.11.7"),
    ("authorization", "Bearer sk-test-0123456789abcdef"),
    ("x-stainless-async", "false"),
    ("x-stainless-retry-count", "0"),
    ("x-stainless-read-timeout", "600"),
    ("content-length", "173"),
];

/// [`request`] with the [`SDK_HEADERS`] before the tenant and the estimate.
pub fn sdk_request(tenant: &str, tokens: u64) -> Request<Empty<Bytes>> {
    let mut builder = Request::post("/v1/chat/completions");
    for (name, value) in SDK_HEADERS {
        builder = builder.header(name, value);
    }
    builder
        .header(TENANT, tenant)
        .header(ESTIMATE, tokens)
        .body(Empty::new())
        .expect("valid request")
}

/// Runs one request through `service` to the end: ready, call, response, body dropped
/// (which is where a body-held reservation is released). Every future involved completes
/// on its first poll, so no runtime is needed.
pub fn run_one<S, B>(service: &mut S, request: Request<B>)
where
    S: Service<Request<B>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("service not ready"),
    }
    let future = pin!(service.call(request));
    match future.poll(&mut cx) {
        Poll::Ready(Ok(response)) => drop(std::hint::black_box(response)),
        _ => panic!("response not ready"),
    }
}

// ---------------------------------------------------------------------------------------
// The naive tracker: one RwLock<HashMap<String, _>>, a write lock and two String
// allocations per reservation (the design this crate replaces).

#[derive(Default)]
struct NaiveState {
    in_flight: u64,
}

/// The naive tracker.
pub struct NaiveTracker {
    states: RwLock<HashMap<String, NaiveState>>,
    cap: u64,
}

/// The naive tracker's RAII reservation.
pub struct NaiveReservation {
    tracker: Arc<NaiveTracker>,
    tenant: String,
    tokens: u64,
}

impl NaiveTracker {
    pub fn new(cap: u64) -> Arc<Self> {
        Arc::new(Self {
            states: RwLock::new(HashMap::new()),
            cap,
        })
    }

    pub fn reserve(self: &Arc<Self>, tenant: &str, tokens: u64) -> Option<NaiveReservation> {
        let tenant = tenant.to_owned();
        let mut states = self.states.write().unwrap_or_else(PoisonError::into_inner);
        let state = states.entry(tenant.clone()).or_default();
        if state.in_flight.saturating_add(tokens) > self.cap {
            return None;
        }
        state.in_flight += tokens;
        Some(NaiveReservation {
            tracker: Arc::clone(self),
            tenant,
            tokens,
        })
    }
}

impl Drop for NaiveReservation {
    fn drop(&mut self) {
        let mut states = self
            .tracker
            .states
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = states.get_mut(&self.tenant) {
            state.in_flight = state.in_flight.saturating_sub(self.tokens);
        }
    }
}

/// The naive tracker as a layer: same header sources, reservation held in the body.
#[derive(Clone)]
pub struct NaiveLayer(pub Arc<NaiveTracker>);

impl<S> Layer<S> for NaiveLayer {
    type Service = NaiveService<S>;

    fn layer(&self, inner: S) -> NaiveService<S> {
        NaiveService {
            inner,
            tracker: Arc::clone(&self.0),
        }
    }
}

#[derive(Clone)]
pub struct NaiveService<S> {
    inner: S,
    tracker: Arc<NaiveTracker>,
}

impl<S, B, RB> Service<Request<B>> for NaiveService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<NaiveBody<RB>>;
    type Error = S::Error;
    type Future = NaiveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let tenant = request.headers().get(TENANT).and_then(|v| v.to_str().ok());
        let tokens = request
            .headers()
            .get(ESTIMATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let reservation = match (tenant, tokens) {
            (Some(tenant), Some(tokens)) => self.tracker.reserve(tenant, tokens),
            _ => None,
        };
        match reservation {
            Some(reservation) => NaiveFuture::Inner {
                future: self.inner.call(request),
                reservation: Some(reservation),
            },
            None => NaiveFuture::Refused,
        }
    }
}

pin_project! {
    #[project = NaiveFutureProj]
    pub enum NaiveFuture<F> {
        Inner { #[pin] future: F, reservation: Option<NaiveReservation> },
        Refused,
    }
}

impl<F, RB, E> Future for NaiveFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<NaiveBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            NaiveFutureProj::Inner {
                future,
                reservation,
            } => {
                let response = std::task::ready!(future.poll(cx))?;
                let reservation = reservation.take();
                Poll::Ready(Ok(response.map(|body| NaiveBody { body, reservation })))
            }
            NaiveFutureProj::Refused => panic!(
                "the benches never refuse: {}",
                StatusCode::TOO_MANY_REQUESTS
            ),
        }
    }
}

pin_project! {
    /// The inner body with the reservation riding along until it is dropped.
    pub struct NaiveBody<B> {
        #[pin]
        body: B,
        reservation: Option<NaiveReservation>,
    }
}

impl<B: Body> Body for NaiveBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

// ---------------------------------------------------------------------------------------
// tower_governor, keyed on the same header, configured never to limit.

/// Keys governor's GCRA on the tenant header, as a user would (an owned `String` key).
#[derive(Clone)]
pub struct TenantKey;

impl tower_governor::key_extractor::KeyExtractor for TenantKey {
    type Key = String;

    fn extract<T>(&self, request: &Request<T>) -> Result<String, tower_governor::GovernorError> {
        request
            .headers()
            .get(TENANT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(tower_governor::GovernorError::UnableToExtractKey)
    }
}

/// The governor layer as the benches configure it.
pub type GovernorLayerType = tower_governor::GovernorLayer<
    TenantKey,
    governor::middleware::NoOpMiddleware<governor::clock::QuantaInstant>,
    axum::body::Body,
>;

/// A governor layer that replenishes a cell every nanosecond with a huge burst: it
/// checks every request and refuses none.
pub fn governor_layer() -> GovernorLayerType {
    let config = tower_governor::governor::GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .key_extractor(TenantKey)
        .finish()
        .expect("valid governor config");
    tower_governor::GovernorLayer::new(config)
}
