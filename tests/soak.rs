//! A bounded soak through real HTTP on 127.0.0.1.
//!
//! Hundreds of clients, across steady tenants (some with caps of their own) and a spray of
//! one-off ids, send requests in a loop whose handlers answer at once, stream, panic before
//! answering or mid-stream, hang past a server timeout, or fail mid-stream, while clients
//! disconnect mid-stream or give up before the response. A sampler thread checks every
//! tenant's in-flight total against its cap every millisecond or so. When the clients stop,
//! every reservation must be released, every tenant must be at 0, and the tracker must
//! hold no more than its idle bound plus the tenants with a set cap.
//!
//! It runs 20 s by default; `SOAK_SECS=60 cargo test --test soak -- --nocapture` runs
//! longer (and prints the table), `SOAK_SEED` picks the generators' seed. The timing of the
//! run is never asserted, only invariants of the ledger and of the HTTP exchanges.
// Built with the development toolchain; the declared MSRV is the library's.
#![allow(clippy::incompatible_msrv)]

mod common;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::{contains, empty, pooled_client, serve, HttpClient, ReqBody};
use futures_util::Stream;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tower_tenant_tokens::{ReservationHandle, TenantTokenLayer, TenantTokenTracker};

/// Concurrent client tasks, each sending one request after another.
const CLIENTS: usize = 200;
/// Tenants that come back again and again: `steady-00` to `steady-49`.
const STEADY_TENANTS: u64 = 50;
/// Half the steady traffic goes to the first few: they are contended.
const HOT_TENANTS: u64 = 10;
/// In a tenth of the requests, a tenant id never seen before (and never seen again).
const ONE_OFF_PERCENT: u64 = 10;
/// The cap of every tenant without a cap of its own.
const DEFAULT_CAP: u64 = 1_000;
/// Caps set with `set_cap` for `steady-00`, `steady-01`, ...
const SET_CAPS: [u64; 12] = [
    100, 200, 300, 500, 800, 1_200, 2_000, 3_000, 5_000, 8_000, 400, 600,
];
/// A small idle bound, so the spray of one-off ids makes the tracker sweep all the time.
const MAX_IDLE_TENANTS: usize = 64;
/// How often the sampler looks at every tenant.
const SAMPLE_EVERY: Duration = Duration::from_millis(1);
/// No single exchange may take longer (it is bounded by far shorter delays; this only
/// catches one that hangs).
const GUARD: Duration = Duration::from_secs(30);
/// How long, once the clients have stopped, the server has to release every reservation.
const DRAIN: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(10);
/// The start of every panic message the test injects; the panic hook keeps them quiet.
const INJECTED: &str = "injected by the soak test";

// ---------------------------------------------------------------------------------------
// What a request does
// ---------------------------------------------------------------------------------------

/// What the client asks the handler to do (header `x-mode`), and what the client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Answers `ok` at once.
    Answer,
    /// Streams `x-chunks` chunks, `x-pause-ms` apart; read to the end.
    Stream,
    /// Streams a long body; the client drops it after the first chunk.
    DropMidStream,
    /// Streams a long body to a raw socket, which closes after the first chunk.
    RawClose,
    /// The handler panics before answering.
    PanicBefore,
    /// The body's poll panics at chunk `x-fault-at`.
    PanicMidStream,
    /// The body yields an error at chunk `x-fault-at`.
    BodyError,
    /// The handler hangs; a timeout outside the layer drops the call and answers 504.
    HangOuter,
    /// The handler hangs on an inner future; its own timeout gives up and answers 504.
    HangInner,
    /// The handler hangs; the client gives up before the response head.
    ClientCancel,
    /// Malformed (no tenant, a bad tenant, no estimate, a bad estimate): 400.
    Invalid,
    /// An estimate above the tenant's cap: 413.
    OverCap,
}

/// Each kind and its share of the requests, in percent.
const MIX: [(Kind, u64); 12] = [
    (Kind::Answer, 34),
    (Kind::Stream, 30),
    (Kind::DropMidStream, 4),
    (Kind::RawClose, 2),
    (Kind::PanicBefore, 3),
    (Kind::PanicMidStream, 3),
    (Kind::BodyError, 3),
    (Kind::HangOuter, 2),
    (Kind::HangInner, 2),
    (Kind::ClientCancel, 3),
    (Kind::Invalid, 7),
    (Kind::OverCap, 7),
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Answer => "answer",
            Kind::Stream => "stream",
            Kind::DropMidStream => "drop-mid-stream",
            Kind::RawClose => "raw-close",
            Kind::PanicBefore => "panic-before",
            Kind::PanicMidStream => "panic-mid-stream",
            Kind::BodyError => "body-error",
            Kind::HangOuter => "hang-outer",
            Kind::HangInner => "hang-inner",
            Kind::ClientCancel => "client-cancel",
            Kind::Invalid => "invalid",
            Kind::OverCap => "over-cap",
        }
    }

    fn from_name(name: &str) -> Option<Kind> {
        MIX.iter().map(|&(kind, _)| kind).find(|k| k.name() == name)
    }
}

/// A small deterministic generator (xorshift64), one per client.
struct Rng(u64);

impl Rng {
    /// Spreads `seed` with splitmix64, so neighbouring seeds give unrelated sequences.
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

fn steady(index: u64) -> String {
    format!("steady-{index:02}")
}

/// The cap a tenant has in this test (set caps never change while it runs).
fn cap_of(tenant: &str) -> u64 {
    tenant
        .strip_prefix("steady-")
        .and_then(|index| index.parse::<usize>().ok())
        .and_then(|index| SET_CAPS.get(index).copied())
        .unwrap_or(DEFAULT_CAP)
}

/// One request, as the client decided it.
struct Plan {
    kind: Kind,
    /// The `x-tenant-id` header; `None` leaves it out.
    tenant: Option<String>,
    /// The `x-token-estimate` header; `None` leaves it out.
    estimate: Option<String>,
    /// The tenant's cap.
    cap: u64,
    /// The error code the layer must answer with, for `Invalid` and `OverCap`.
    code: &'static str,
    chunks: u64,
    pause_ms: u64,
    fault_at: u64,
    /// The server's timeout (`HangOuter`, `HangInner`) or the client's (`ClientCancel`).
    timeout_ms: u64,
}

impl Plan {
    fn random(rng: &mut Rng, client: usize, seq: u64) -> Plan {
        let mut roll = rng.below(100);
        let kind = MIX
            .iter()
            .find(|&&(_, share)| {
                let hit = roll < share;
                roll = roll.saturating_sub(share);
                hit
            })
            .map(|&(kind, _)| kind)
            .expect("the shares add up to 100");
        let tenant = if rng.below(100) < ONE_OFF_PERCENT {
            format!("oneoff-{client}-{seq}")
        } else if rng.below(2) == 0 {
            steady(rng.below(HOT_TENANTS))
        } else {
            steady(rng.below(STEADY_TENANTS))
        };
        let cap = cap_of(&tenant);
        let tokens = match kind {
            Kind::OverCap => rng.range(cap + 1, 2 * cap),
            _ => rng.range(1 + cap / 20, cap * 3 / 5),
        };
        let mut plan = Plan {
            kind,
            tenant: Some(tenant),
            estimate: Some(tokens.to_string()),
            cap,
            code: "rate_limit_exceeded",
            chunks: 0,
            pause_ms: 0,
            fault_at: 0,
            timeout_ms: 0,
        };
        match kind {
            Kind::Answer => {}
            Kind::Stream => {
                plan.chunks = rng.range(1, 12);
                plan.pause_ms = rng.range(0, 3);
            }
            Kind::DropMidStream | Kind::RawClose => {
                // Long enough that the server is still streaming when the client goes.
                plan.chunks = rng.range(20, 40);
                plan.pause_ms = rng.range(2, 4);
            }
            Kind::PanicMidStream | Kind::BodyError => {
                plan.chunks = rng.range(4, 10);
                plan.fault_at = rng.range(1, plan.chunks - 1);
                plan.pause_ms = rng.range(0, 3);
            }
            Kind::PanicBefore => {}
            Kind::HangOuter | Kind::HangInner => plan.timeout_ms = rng.range(10, 60),
            Kind::ClientCancel => plan.timeout_ms = rng.range(5, 30),
            Kind::Invalid => match rng.below(4) {
                0 => {
                    plan.estimate = Some(format!("{tokens}x"));
                    plan.code = "invalid_token_estimate";
                }
                1 => {
                    plan.tenant = None;
                    plan.code = "missing_tenant";
                }
                2 => {
                    plan.tenant = Some(format!("bad tenant {client}"));
                    plan.code = "invalid_tenant";
                }
                _ => {
                    plan.estimate = None;
                    plan.code = "missing_token_estimate";
                }
            },
            Kind::OverCap => plan.code = "request_too_large",
        }
        plan
    }

    /// The headers every request carries, as `(name, value)` pairs.
    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            ("x-mode", self.kind.name().to_owned()),
            ("x-chunks", self.chunks.to_string()),
            ("x-pause-ms", self.pause_ms.to_string()),
            ("x-fault-at", self.fault_at.to_string()),
        ];
        if let Some(tenant) = &self.tenant {
            headers.push(("x-tenant-id", tenant.clone()));
        }
        if let Some(estimate) = &self.estimate {
            headers.push(("x-token-estimate", estimate.clone()));
        }
        match self.kind {
            Kind::HangOuter => headers.push(("x-outer-timeout-ms", self.timeout_ms.to_string())),
            Kind::HangInner => headers.push(("x-inner-timeout-ms", self.timeout_ms.to_string())),
            _ => {}
        }
        headers
    }

    fn request(&self, addr: SocketAddr) -> http::Request<ReqBody> {
        let mut request = http::Request::post(format!("http://{addr}/soak"));
        for (name, value) in self.headers() {
            request = request.header(name, value);
        }
        request.body(empty()).expect("request")
    }

    fn raw_request(&self) -> String {
        let mut request = String::from("POST /soak HTTP/1.1\r\nhost: soak\r\n");
        for (name, value) in self.headers() {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("content-length: 0\r\nconnection: close\r\n\r\n");
        request
    }

    /// The body a `Stream` request must receive.
    fn expected_stream(&self) -> String {
        (0..self.chunks).map(|i| format!("chunk-{i};")).collect()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (tenant {:?}, estimate {:?}, cap {})",
            self.kind.name(),
            self.tenant,
            self.estimate,
            self.cap
        )
    }
}

// ---------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Count(AtomicU64);

impl Count {
    fn hit(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// What clients and server saw. Faults are counted where they really happened: a panic by
/// the code that panics, a disconnect by the server's stream when it is dropped unfinished.
#[derive(Default)]
struct Stats {
    // Clients.
    sent: Count,
    one_off_ids: Count,
    served: Count,
    refused_429: Count,
    refused_413: Count,
    refused_400: Count,
    timed_out_outer: Count,
    timed_out_inner: Count,
    dropped_mid_stream: Count,
    closed_raw: Count,
    cancelled: Count,
    broke_on_panic_before: Count,
    broke_on_panic_mid_stream: Count,
    broke_on_body_error: Count,
    unexpected: Count,
    // Server.
    handler_calls: Count,
    /// Requests admitted per steady tenant (by index).
    admitted: Vec<Count>,
    panics_before: Count,
    panics_mid_stream: Count,
    body_errors: Count,
    outer_timeouts: Count,
    inner_timeouts: Count,
    hung_handlers_dropped: Count,
    cancels_seen: Count,
    drops_seen: Count,
    raw_closes_seen: Count,
    unexpected_abandons: Count,
    handler_violations: Count,
    /// The first few unexpected outcomes and violations, for the failure message.
    notes: Mutex<Vec<String>>,
}

/// A server-side counter bumped when a handler future or a response stream is dropped
/// before it finished.
#[derive(Clone, Copy)]
enum Seen {
    /// A hung handler dropped by the timeout outside the layer.
    HungDropped,
    /// A hung handler dropped because its client went away.
    Cancel,
    /// A stream dropped by a client that dropped the body.
    Drop,
    /// A stream dropped by a client that closed its raw socket.
    RawClose,
    /// A stream no client was meant to abandon.
    Unexpected,
}

impl Stats {
    fn new() -> Self {
        Stats {
            admitted: (0..STEADY_TENANTS).map(|_| Count::default()).collect(),
            ..Stats::default()
        }
    }

    fn seen(&self, seen: Seen) -> &Count {
        match seen {
            Seen::HungDropped => &self.hung_handlers_dropped,
            Seen::Cancel => &self.cancels_seen,
            Seen::Drop => &self.drops_seen,
            Seen::RawClose => &self.raw_closes_seen,
            Seen::Unexpected => &self.unexpected_abandons,
        }
    }

    fn note(&self, counter: &Count, what: String) {
        counter.hit();
        let mut notes = self.notes.lock().unwrap_or_else(PoisonError::into_inner);
        if notes.len() < 20 {
            notes.push(what);
        }
    }

    fn record(&self, plan: &Plan, outcome: Outcome) {
        match outcome {
            Outcome::Served => self.served.hit(),
            Outcome::Refused(429) => self.refused_429.hit(),
            Outcome::Refused(413) => self.refused_413.hit(),
            Outcome::Refused(400) => self.refused_400.hit(),
            Outcome::Refused(other) => {
                self.note(&self.unexpected, format!("{plan}: refused with {other}"))
            }
            Outcome::TimedOut if plan.kind == Kind::HangOuter => self.timed_out_outer.hit(),
            Outcome::TimedOut => self.timed_out_inner.hit(),
            Outcome::Dropped => self.dropped_mid_stream.hit(),
            Outcome::ClosedRaw => self.closed_raw.hit(),
            Outcome::Cancelled => self.cancelled.hit(),
            Outcome::Broken => match plan.kind {
                Kind::PanicBefore => self.broke_on_panic_before.hit(),
                Kind::PanicMidStream => self.broke_on_panic_mid_stream.hit(),
                _ => self.broke_on_body_error.hit(),
            },
            Outcome::Unexpected(what) => self.note(&self.unexpected, what),
        }
    }
}

/// Bumps a [`Seen`] counter when dropped.
struct CountOnDrop {
    stats: Arc<Stats>,
    seen: Seen,
}

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        self.stats.seen(self.seen).hit();
    }
}

// ---------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------

struct Server {
    tracker: Arc<TenantTokenTracker>,
    stats: Arc<Stats>,
}

/// What the handler reads from a request before it lets go of it (the request's body is
/// not `Sync`, so no reference to it may live across an `.await`).
struct Order {
    kind: Kind,
    chunks: u64,
    pause: Duration,
    fault_at: u64,
    inner_timeout: Duration,
}

/// Checks what the layer promises a handler: only admitted requests arrive, each with a
/// reservation of exactly its estimate that the tracker counts.
fn inspect(server: &Server, request: &Request) -> Result<Order, String> {
    let headers = request.headers();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let number = |name: &str| text(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let kind = text("x-mode")
        .and_then(Kind::from_name)
        .ok_or("no x-mode".to_owned())?;
    if matches!(kind, Kind::Invalid | Kind::OverCap) {
        return Err(format!(
            "a request the layer must refuse reached the handler: {kind:?}"
        ));
    }
    let handle = request
        .extensions()
        .get::<ReservationHandle>()
        .ok_or("an admitted request without a ReservationHandle".to_owned())?;
    let (tenant, held) = (handle.tenant_id(), handle.tokens());
    let in_flight = server.tracker.in_flight(tenant);
    if Some(tenant) != text("x-tenant-id") || held != number("x-token-estimate") || in_flight < held
    {
        return Err(format!(
            "{kind:?}: reservation of {held} for {tenant:?} (tenant in flight: {in_flight}) \
             but the request says {:?} / {:?}",
            text("x-tenant-id"),
            text("x-token-estimate")
        ));
    }
    if let Some(index) = tenant.strip_prefix("steady-") {
        let index: usize = index.parse().map_err(|_| format!("tenant {tenant:?}"))?;
        server.stats.admitted[index].hit();
    }
    Ok(Order {
        kind,
        chunks: number("x-chunks"),
        pause: Duration::from_millis(number("x-pause-ms")),
        fault_at: number("x-fault-at"),
        inner_timeout: Duration::from_millis(number("x-inner-timeout-ms")),
    })
}

async fn handler(State(server): State<Arc<Server>>, request: Request) -> Response {
    let stats = server.stats.clone();
    stats.handler_calls.hit();
    let order = inspect(&server, &request);
    drop(request);
    let order = match order {
        Ok(order) => order,
        Err(violation) => {
            stats.note(&stats.handler_violations, violation);
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let stream = |fault, on_abandon| {
        Body::from_stream(Script {
            stats: stats.clone(),
            on_abandon,
            chunks: order.chunks,
            next: 0,
            pause: order.pause,
            sleep: None,
            fault,
            finished: false,
        })
        .into_response()
    };
    match order.kind {
        Kind::Answer => "ok".into_response(),
        Kind::Stream => stream(Fault::None, Seen::Unexpected),
        Kind::DropMidStream => stream(Fault::None, Seen::Drop),
        Kind::RawClose => stream(Fault::None, Seen::RawClose),
        Kind::PanicMidStream => stream(Fault::Panic(order.fault_at), Seen::Unexpected),
        Kind::BodyError => stream(Fault::Error(order.fault_at), Seen::Unexpected),
        Kind::PanicBefore => {
            stats.panics_before.hit();
            panic!("{INJECTED}: the handler panics before answering");
        }
        Kind::HangOuter | Kind::ClientCancel => {
            let seen = match order.kind {
                Kind::HangOuter => Seen::HungDropped,
                _ => Seen::Cancel,
            };
            let _on_drop = CountOnDrop { stats, seen };
            std::future::pending::<Response>().await
        }
        Kind::HangInner => {
            let upstream = std::future::pending::<()>();
            match tokio::time::timeout(order.inner_timeout, upstream).await {
                Ok(()) => unreachable!("a pending future completed"),
                Err(_) => {
                    stats.inner_timeouts.hit();
                    (StatusCode::GATEWAY_TIMEOUT, "upstream timed out").into_response()
                }
            }
        }
        Kind::Invalid | Kind::OverCap => unreachable!("refused by `inspect`"),
    }
}

/// A timeout outside the layer, for requests with `x-outer-timeout-ms`: when it fires it
/// drops the layer's response future (and the handler's) and answers 504.
async fn outer_timeout(
    State(server): State<Arc<Server>>,
    request: Request,
    next: Next,
) -> Response {
    let limit = request
        .headers()
        .get("x-outer-timeout-ms")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let Some(limit) = limit else {
        return next.run(request).await;
    };
    match tokio::time::timeout(Duration::from_millis(limit), next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            server.stats.outer_timeouts.hit();
            (StatusCode::GATEWAY_TIMEOUT, "timed out").into_response()
        }
    }
}

#[derive(Clone, Copy)]
enum Fault {
    None,
    Panic(u64),
    Error(u64),
}

/// A streamed response body: `chunk-0;`, `chunk-1;`, ... a pause apart, with an optional
/// panic or error at one chunk. Dropped before its end, it counts an abandonment.
struct Script {
    stats: Arc<Stats>,
    on_abandon: Seen,
    chunks: u64,
    next: u64,
    pause: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    fault: Fault,
    finished: bool,
}

impl Stream for Script {
    type Item = Result<Bytes, io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        if let Some(sleep) = this.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            this.sleep = None;
        }
        match this.fault {
            Fault::Panic(at) if at == this.next => {
                this.finished = true;
                this.stats.panics_mid_stream.hit();
                panic!("{INJECTED}: the response body panics mid-stream");
            }
            Fault::Error(at) if at == this.next => {
                this.finished = true;
                this.stats.body_errors.hit();
                return Poll::Ready(Some(Err(io::Error::other("injected body error"))));
            }
            _ => {}
        }
        if this.next == this.chunks {
            this.finished = true;
            return Poll::Ready(None);
        }
        let chunk = Bytes::from(format!("chunk-{};", this.next));
        this.next += 1;
        if !this.pause.is_zero() {
            this.sleep = Some(Box::pin(tokio::time::sleep(this.pause)));
        }
        Poll::Ready(Some(Ok(chunk)))
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if !self.finished {
            self.stats.seen(self.on_abandon).hit();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The clients
// ---------------------------------------------------------------------------------------

/// How one exchange ended, as the client saw it.
enum Outcome {
    /// 200, read to the end, with the expected body.
    Served,
    /// Refused by the layer with this status and the expected code.
    Refused(u16),
    /// 504 from a server-side timeout.
    TimedOut,
    /// The client dropped the body after the first chunk.
    Dropped,
    /// The client closed its raw socket after the first chunk.
    ClosedRaw,
    /// The client gave up before the response head.
    Cancelled,
    /// The connection or the body failed, as the injected fault makes it.
    Broken,
    Unexpected(String),
}

async fn client_loop(
    id: usize,
    seed: u64,
    client: HttpClient,
    addr: SocketAddr,
    stats: Arc<Stats>,
    deadline: Instant,
) {
    let mut rng = Rng::new(seed ^ (id as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut seq = 0;
    while Instant::now() < deadline {
        let plan = Plan::random(&mut rng, id, seq);
        seq += 1;
        stats.sent.hit();
        if plan
            .tenant
            .as_ref()
            .is_some_and(|t| t.starts_with("oneoff-"))
        {
            stats.one_off_ids.hit();
        }
        let outcome = match tokio::time::timeout(GUARD, exchange(&client, addr, &plan)).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Unexpected(format!("{plan}: no outcome within {GUARD:?}")),
        };
        let over_cap_now = matches!(outcome, Outcome::Refused(429));
        stats.record(&plan, outcome);
        if over_cap_now {
            // What a client honouring Retry-After would do, only much shorter.
            tokio::time::sleep(Duration::from_millis(rng.range(1, 5))).await;
        }
    }
}

async fn exchange(client: &HttpClient, addr: SocketAddr, plan: &Plan) -> Outcome {
    if plan.kind == Kind::RawClose {
        return raw_exchange(addr, plan).await;
    }
    let request = client.request(plan.request(addr));
    let response = if plan.kind == Kind::ClientCancel {
        let limit = Duration::from_millis(plan.timeout_ms);
        match tokio::time::timeout(limit, request).await {
            Ok(response) => response,
            Err(_) => return Outcome::Cancelled, // dropping the request closes its connection
        }
    } else {
        request.await
    };
    let response = match response {
        Ok(response) => response,
        Err(error) => {
            return match plan.kind {
                Kind::PanicBefore | Kind::PanicMidStream | Kind::BodyError => Outcome::Broken,
                _ => Outcome::Unexpected(format!("{plan}: the request failed: {error:?}")),
            }
        }
    };
    match (response.status(), plan.kind) {
        (StatusCode::OK, Kind::Answer | Kind::Stream) => {
            let expected = match plan.kind {
                Kind::Answer => "ok".to_owned(),
                _ => plan.expected_stream(),
            };
            match response.into_body().collect().await.map(|b| b.to_bytes()) {
                Ok(body) if body == expected.as_bytes() => Outcome::Served,
                Ok(body) => {
                    Outcome::Unexpected(format!("{plan}: body {body:?}, expected {expected:?}"))
                }
                Err(error) => Outcome::Unexpected(format!("{plan}: the body failed: {error:?}")),
            }
        }
        (StatusCode::OK, Kind::DropMidStream) => {
            let mut body = response.into_body();
            match body.frame().await {
                Some(Ok(frame)) if frame.is_data() => Outcome::Dropped, // `body` dropped here
                other => Outcome::Unexpected(format!("{plan}: first frame {other:?}")),
            }
        }
        (StatusCode::OK, Kind::PanicMidStream | Kind::BodyError) => {
            match response.into_body().collect().await {
                Err(_) => Outcome::Broken,
                Ok(body) => Outcome::Unexpected(format!(
                    "{plan}: the body ended cleanly despite the fault: {:?}",
                    body.to_bytes()
                )),
            }
        }
        (StatusCode::GATEWAY_TIMEOUT, Kind::HangOuter | Kind::HangInner) => {
            match response.into_body().collect().await {
                Ok(_) => Outcome::TimedOut,
                Err(error) => Outcome::Unexpected(format!("{plan}: the 504 failed: {error:?}")),
            }
        }
        _ => refusal(plan, response).await,
    }
}

/// Checks a refusal: the status and code the plan calls for, and the cap in the headers.
async fn refusal(plan: &Plan, response: http::Response<Incoming>) -> Outcome {
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (limit, retry_after) = (header("x-ratelimit-limit-tokens"), header("retry-after"));
    let body = match response.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => return Outcome::Unexpected(format!("{plan}: {status}: {error:?}")),
    };
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|json| json["error"]["code"].as_str().map(str::to_owned));
    let expected = match plan.kind {
        Kind::Invalid => 400,
        Kind::OverCap => 413,
        _ => 429,
    };
    let cap = plan.cap.to_string();
    let headers_right = match status {
        429 => limit.as_deref() == Some(&cap) && retry_after.is_some(),
        413 => limit.as_deref() == Some(&cap) && retry_after.is_none(),
        _ => true,
    };
    if status != expected || code.as_deref() != Some(plan.code) || !headers_right {
        return Outcome::Unexpected(format!(
            "{plan}: {status} {code:?} (limit {limit:?}, retry-after {retry_after:?}), \
             expected {expected} {:?}: {body:?}",
            plan.code
        ));
    }
    Outcome::Refused(status)
}

/// A raw socket that reads up to the first chunk and closes.
async fn raw_exchange(addr: SocketAddr, plan: &Plan) -> Outcome {
    let mut socket = match TcpStream::connect(addr).await {
        Ok(socket) => socket,
        Err(error) => return Outcome::Unexpected(format!("{plan}: connect: {error}")),
    };
    if let Err(error) = socket.write_all(plan.raw_request().as_bytes()).await {
        return Outcome::Unexpected(format!("{plan}: write: {error}"));
    }
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match socket.read(&mut buf).await {
            Ok(n) => n,
            Err(error) => return Outcome::Unexpected(format!("{plan}: read: {error}")),
        };
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
        if received.starts_with(b"HTTP/1.1 200 ") && contains(&received, b"chunk-0;") {
            drop(socket); // mid-stream: the server has more chunks to send
            return Outcome::ClosedRaw;
        }
    }
    // The server closed the connection (`connection: close`) after a whole response.
    let text = String::from_utf8_lossy(&received);
    let limit = format!("x-ratelimit-limit-tokens: {}\r\n", plan.cap);
    if text.starts_with("HTTP/1.1 429 ")
        && text.contains(&limit)
        && text.contains("\"rate_limit_exceeded\"")
    {
        Outcome::Refused(429)
    } else {
        Outcome::Unexpected(format!("{plan}: raw response {text:?}"))
    }
}

// ---------------------------------------------------------------------------------------
// The sampler
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Sampled {
    samples: u64,
    longest_gap: Duration,
    violations: u64,
    first_violations: Vec<String>,
    /// Steady tenants: the highest in-flight total sampled, and the cap.
    peaks: HashMap<String, (u64, u64)>,
    /// One-off tenants: the highest in-flight total sampled relative to the cap.
    one_off_peak: (u64, u64),
    most_tracked: usize,
}

/// Looks at every tenant every [`SAMPLE_EVERY`] until `stop`, on its own thread so a busy
/// runtime cannot delay it.
fn sample(tracker: &TenantTokenTracker, stop: &AtomicBool) -> Sampled {
    let mut out = Sampled::default();
    let mut last = Instant::now();
    while !stop.load(Relaxed) {
        let snapshot = tracker.snapshot();
        out.most_tracked = out.most_tracked.max(snapshot.len());
        for (tenant, state) in snapshot {
            // No reconciliation in this test: neither may ever pass the cap.
            if state.in_flight > state.cap || state.high_water > state.cap {
                out.violations += 1;
                if out.first_violations.len() < 20 {
                    out.first_violations.push(format!("{tenant}: {state:?}"));
                }
            }
            if tenant.starts_with("steady-") {
                let peak = out.peaks.entry(tenant).or_insert((0, state.cap));
                peak.0 = peak.0.max(state.in_flight);
            } else {
                let (peak, cap) = out.one_off_peak;
                if u128::from(state.in_flight) * u128::from(cap.max(1))
                    > u128::from(peak) * u128::from(state.cap.max(1))
                {
                    out.one_off_peak = (state.in_flight, state.cap);
                }
            }
        }
        out.samples += 1;
        out.longest_gap = out.longest_gap.max(last.elapsed());
        last = Instant::now();
        std::thread::sleep(SAMPLE_EVERY);
    }
    out
}

// ---------------------------------------------------------------------------------------
// The soak
// ---------------------------------------------------------------------------------------

fn soak_duration() -> Duration {
    match std::env::var("SOAK_SECS") {
        Err(_) => Duration::from_secs(20),
        Ok(value) => {
            let secs: f64 = value
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("SOAK_SECS must be a number of seconds: {value:?}"));
            assert!(
                secs > 0.0 && secs <= 86_400.0,
                "SOAK_SECS out of range: {secs}"
            );
            Duration::from_secs_f64(secs)
        }
    }
}

fn soak_seed() -> u64 {
    match std::env::var("SOAK_SEED") {
        Err(_) => 0x50A4_5EED,
        Ok(value) => {
            let value = value.trim();
            let parsed = match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => value.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("SOAK_SEED must be an integer: {value:?}"))
        }
    }
}

/// Keeps the injected panics out of the output; any other panic is reported as usual.
fn quiet_injected_panics() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info
            .payload_as_str()
            .is_some_and(|m| m.starts_with(INJECTED))
        {
            report(info);
        }
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_caps_hold_at_every_instant_and_everything_is_released() {
    quiet_injected_panics();
    let duration = soak_duration();
    let seed = soak_seed();

    let tracker = Arc::new(
        TenantTokenTracker::builder(DEFAULT_CAP)
            .max_idle_tenants(MAX_IDLE_TENANTS)
            .build(),
    );
    for (index, &cap) in (0..).zip(SET_CAPS.iter()) {
        tracker.set_cap(&steady(index), cap);
    }
    let stats = Arc::new(Stats::new());
    let state = Arc::new(Server {
        tracker: tracker.clone(),
        stats: stats.clone(),
    });
    let app = Router::new()
        .route("/soak", post(handler))
        .with_state(state.clone())
        .layer(TenantTokenLayer::new(tracker.clone()).reservation_handle(true))
        .layer(middleware::from_fn_with_state(state, outer_timeout)); // outside the layer
    let server = serve(app).await;

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (tracker, stop) = (tracker.clone(), stop.clone());
        std::thread::spawn(move || sample(&tracker, &stop))
    };

    let started = Instant::now();
    let deadline = started + duration;
    let client = pooled_client();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (client, stats) = (client.clone(), stats.clone());
            tokio::spawn(client_loop(id, seed, client, server.addr, stats, deadline))
        })
        .collect();
    // Each client stops at the deadline once its exchange (bounded by GUARD) is over.
    let mut failed_clients = Vec::new();
    let all_stopped = tokio::time::timeout_at((deadline + GUARD + POLL).into(), async {
        for (id, task) in clients.into_iter().enumerate() {
            if let Err(error) = task.await {
                failed_clients.push(format!("client {id}: {error}"));
            }
        }
    })
    .await;
    let clients_stopped = all_stopped.is_ok(); // asserted once the table is out
    let ran = started.elapsed();
    drop(client);

    // The server releases what the last disconnects and cancels held once it notices them.
    let drain_started = Instant::now();
    let held = loop {
        let held: Vec<_> = tracker
            .snapshot()
            .into_iter()
            .filter(|(_, state)| state.in_flight != 0 || state.reservations != 0)
            .collect();
        if held.is_empty() || drain_started.elapsed() > DRAIN {
            break held;
        }
        tokio::time::sleep(POLL).await;
    };
    let drained_in = drain_started.elapsed();
    stop.store(true, Relaxed);
    let sampled = sampler.join().expect("the sampler thread");
    let snapshot: HashMap<String, _> = tracker.snapshot().into_iter().collect();
    let leaked: u64 = snapshot.values().map(|state| state.in_flight).sum();
    let live: u64 = snapshot.values().map(|state| state.reservations).sum();
    let tracked = tracker.tracked_tenants();
    let tracked_bound = MAX_IDLE_TENANTS + SET_CAPS.len();

    // The table.
    let s = &stats;
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!(
        "\nsoak: {:.1} s of traffic from {CLIENTS} clients, {STEADY_TENANTS} steady tenants \
         ({} with set caps, default cap {DEFAULT_CAP}) + one-off ids, max_idle_tenants \
         {MAX_IDLE_TENANTS}, seed {seed:#x}",
        ran.as_secs_f64(),
        SET_CAPS.len()
    ));
    line(format!(
        "requests sent {:>9}   ({:.0}/s; {} reached the handler; {} to one-off ids)",
        s.sent.get(),
        s.sent.get() as f64 / ran.as_secs_f64(),
        s.handler_calls.get(),
        s.one_off_ids.get()
    ));
    line(format!("  served 200    {:>9}", s.served.get()));
    line(format!("  refused 429   {:>9}", s.refused_429.get()));
    line(format!("  refused 413   {:>9}", s.refused_413.get()));
    line(format!("  refused 400   {:>9}", s.refused_400.get()));
    line(format!(
        "  unexpected    {:>9}   (transport errors, wrong status or body, stuck)",
        s.unexpected.get()
    ));
    line(format!(
        "{:<44} {:>11} {:>11}",
        "faults", "server saw", "client saw"
    ));
    let rows = [
        (
            "client disconnect mid-stream (drop body)",
            s.drops_seen.get(),
            s.dropped_mid_stream.get(),
        ),
        (
            "client disconnect mid-stream (raw close)",
            s.raw_closes_seen.get(),
            s.closed_raw.get(),
        ),
        (
            "client cancel before the response",
            s.cancels_seen.get(),
            s.cancelled.get(),
        ),
        (
            "handler panic before answering",
            s.panics_before.get(),
            s.broke_on_panic_before.get(),
        ),
        (
            "handler panic mid-stream (body poll)",
            s.panics_mid_stream.get(),
            s.broke_on_panic_mid_stream.get(),
        ),
        (
            "handler timeout outside the layer (504)",
            s.outer_timeouts.get(),
            s.timed_out_outer.get(),
        ),
        (
            "handler timeout inside the handler (504)",
            s.inner_timeouts.get(),
            s.timed_out_inner.get(),
        ),
        (
            "body error mid-stream",
            s.body_errors.get(),
            s.broke_on_body_error.get(),
        ),
    ];
    for (what, server_saw, client_saw) in rows {
        line(format!("  {what:<42} {server_saw:>11} {client_saw:>11}"));
    }
    line(format!(
        "  (hung handlers dropped by the outer timeout: {}; streams abandoned unexpectedly: {})",
        s.hung_handlers_dropped.get(),
        s.unexpected_abandons.get()
    ));
    line(format!(
        "sampler: {} samples, longest gap {:.1} ms, {} cap violations; most tenants tracked \
         at once {}",
        sampled.samples,
        sampled.longest_gap.as_secs_f64() * 1e3,
        sampled.violations,
        sampled.most_tracked
    ));
    // The busiest tenants: the most requests admitted.
    let mut busiest: Vec<_> = (0..STEADY_TENANTS)
        .map(|index| (steady(index), s.admitted[index as usize].get()))
        .collect();
    busiest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    line(format!(
        "{:<12} {:>9} {:>7} {:>12} {:>7} {:>11}",
        "tenant", "admitted", "cap", "peak sampled", "of cap", "high-water"
    ));
    for (tenant, admitted) in busiest.iter().take(12) {
        let (peak, cap) = sampled.peaks.get(tenant).copied().unwrap_or((0, 0));
        let high_water = snapshot.get(tenant).map_or(0, |state| state.high_water);
        line(format!(
            "{tenant:<12} {admitted:>9} {cap:>7} {peak:>12} {:>6.1}% {high_water:>11}",
            100.0 * peak as f64 / cap.max(1) as f64
        ));
    }
    let (peak, cap) = sampled.one_off_peak;
    line(format!(
        "{:<12} {:>9} {cap:>7} {peak:>12} {:>6.1}%",
        "(one-offs)",
        "",
        100.0 * peak as f64 / cap.max(1) as f64
    ));
    line(format!(
        "after stop: drained in {:.0} ms; leaked tokens {leaked}, live reservations {live}; \
         tenants tracked {tracked} (bound {MAX_IDLE_TENANTS} idle + {} set caps)",
        drained_in.as_secs_f64() * 1e3,
        SET_CAPS.len()
    ));
    eprint!("{out}");

    assert!(clients_stopped, "the clients did not stop within {GUARD:?}");
    // Guarantee 1: no tenant ever above its cap, at a sampling instant or in between.
    assert_eq!(
        sampled.violations, 0,
        "tenants above their cap: {:?}",
        sampled.first_violations
    );
    assert!(sampled.samples > 0, "the sampler ran");
    for (tenant, state) in &snapshot {
        assert!(state.high_water <= state.cap, "{tenant}: {state:?}");
    }
    // Guarantees 2 and 4: every reservation released, exactly once (a double release would
    // wrap in_flight far above the cap), and no more tenants kept than the bound.
    assert!(
        held.is_empty(),
        "{} tenants still hold tokens {DRAIN:?} after the clients stopped, such as {:?}",
        held.len(),
        &held[..held.len().min(5)]
    );
    assert_eq!(leaked, 0, "leaked tokens");
    assert_eq!(live, 0, "live reservations");
    assert!(
        tracked <= tracked_bound,
        "{tracked} tenants tracked, bound {tracked_bound}"
    );
    for (index, &cap) in (0..).zip(SET_CAPS.iter()) {
        let state = snapshot.get(&steady(index));
        assert_eq!(state.map(|s| s.cap), Some(cap), "steady-{index:02} kept");
    }
    // Guarantee 3 and the HTTP side: only admitted requests reached the handler, each with
    // its own estimate reserved, and every exchange ended as its plan says it must.
    let notes = s.notes.lock().unwrap().clone();
    assert_eq!(s.handler_violations.get(), 0, "{notes:#?}");
    assert_eq!(s.unexpected.get(), 0, "{notes:#?}");
    assert_eq!(
        s.unexpected_abandons.get(),
        0,
        "streams abandoned unexpectedly"
    );
    assert!(failed_clients.is_empty(), "{failed_clients:?}");
    let outcomes = [
        &s.served,
        &s.refused_429,
        &s.refused_413,
        &s.refused_400,
        &s.timed_out_outer,
        &s.timed_out_inner,
        &s.dropped_mid_stream,
        &s.closed_raw,
        &s.cancelled,
        &s.broke_on_panic_before,
        &s.broke_on_panic_mid_stream,
        &s.broke_on_body_error,
        &s.unexpected,
    ];
    let ended: u64 = outcomes.iter().map(|count| count.get()).sum();
    assert_eq!(ended, s.sent.get(), "every request ended once");
    // The soak went through every path at least once.
    let exercised = [
        ("served", s.served.get()),
        ("429", s.refused_429.get()),
        ("413", s.refused_413.get()),
        ("400", s.refused_400.get()),
        ("client disconnects (drop)", s.drops_seen.get()),
        ("client disconnects (raw)", s.raw_closes_seen.get()),
        ("client cancels", s.cancels_seen.get()),
        ("panics before answering", s.panics_before.get()),
        ("panics mid-stream", s.panics_mid_stream.get()),
        ("outer timeouts", s.outer_timeouts.get()),
        ("inner timeouts", s.inner_timeouts.get()),
        ("body errors", s.body_errors.get()),
    ];
    for (what, count) in exercised {
        assert!(count > 0, "no {what} in the whole run");
    }
}
