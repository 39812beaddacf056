//! Requests per second through the gateway example's proxy mode
//! (`examples/gateway/proxy.rs`), with and without the layer, next to the upstream alone.
//!
//! `cargo bench --bench proxy` starts, each on its own 127.0.0.1 port:
//!
//! - a fast upstream: every `POST /v1/chat/completions` is answered at once, with a small
//!   fixed chat completion (with `usage`), or, when the body says `"stream":true`, a short
//!   stream of server-sent events (a few chunks, the finish chunk, the usage chunk if the
//!   request asked for `stream_options.include_usage`, then `data: [DONE]`);
//! - `direct to upstream`: that upstream itself, the reference;
//! - `proxy, no layer`: the proxy's routes, forwarding with [`proxy::Proxy::forward`], no
//!   layer in front;
//! - `proxy + layer`: [`proxy::router`] behind a `TenantTokenLayer` configured as the
//!   gateway configures it (in-memory tracker with a cap nothing reaches, tenant from
//!   `x-tenant-id`, the OpenAI estimator, usage read, streams asked for their usage,
//!   learned output allowances, calibrated prompts, OpenAI's rate-limit headers,
//!   `Retry-After` from how long reservations are held).
//!
//! A load generator in the same process (one pooled hyper-util client) keeps
//! `PROXY_BENCH_CONCURRENCY` requests in flight (default 32) until
//! `PROXY_BENCH_REQUESTS` requests (default 10,000) have been answered and their bodies read;
//! that is one variant's round. The requests are small chat bodies (three prompts, with
//! and without `max_tokens`) over four tenants, with a few of the headers an SDK sends
//! (content type, accept, user agent, authorization) and `x-tenant-id`. Each of the
//! two cases, non-streamed and streamed (the same bodies with `"stream":true`, not asking
//! for usage, as an SDK's default), runs one warm-up round and then `PROXY_BENCH_ROUNDS`
//! rounds (default 9) of every variant, interleaved, the order rotated each round. The
//! table gives each variant's median requests per second, the median of the per-round
//! ratios (layer ÷ no layer, proxy ÷ direct: each against a peer measured in the same
//! round), and the p50 and p99 of every request's time, from send to the end of its body,
//! over all rounds. With that many requests in flight the latencies are mostly queueing
//! (about the requests in flight over the rate). It also gives the CPU time the whole
//! process (servers and load generator) spent per request in each variant's rounds
//! (`/proc/self/task/*/schedstat`), and the medians of the per-round differences: what
//! the layer adds to the proxy, and the proxy to the upstream. Those depend less on how
//! much of the machine the bench was given than requests per second do.
//!
//! `PROXY_BENCH_LAYER` picks the layer's configuration, to see where its cost goes:
//! `gateway` (the default, as above), `no-ask` (the same, but streams are not asked for
//! their usage, so the upstream sends no usage chunk and nothing is taken out of the
//! stream) or `minimal` (tenant header and OpenAI estimator only: the request body is
//! read, the response body is not).
//!
//! Every server's accepted connections, and the load generator's, get `TCP_NODELAY`;
//! `PROXY_BENCH_NODELAY=0` leaves it off on all of them, as `axum::serve`, and so the
//! gateway, does. Without it a stream through the proxy, written to the client an event at
//! a time, holds its next write until the client acknowledges the last (Nagle's algorithm),
//! and the client delays its acknowledgements: the streamed case then times that wait, not
//! the proxy. The proxy's own connections to the upstream are the example's, as they are.
//!
//! Servers and load generator share one runtime of `PROXY_BENCH_WORKERS` worker threads
//! (default 2), and so the machine's cores: the proxy's cost shows as a share of what one
//! machine does with client, proxy and upstream on it, not as a gateway alone would run.
//! Each case prints the share of the machine's CPU time its hypervisor took meanwhile
//! (`stolen`, Linux's steal time). The criterion groups that follow time the same variants
//! (`-- skip-criterion` prints only the table).

#[path = "../examples/gateway/proxy.rs"]
mod proxy;
#[path = "common/steal.rs"]
mod steal;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use bytes::Bytes;
use criterion::{Criterion, Throughput};
use http::header::{ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, USER_AGENT};
use http::{HeaderName, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use steal::CpuTimes;
use tokio::net::TcpListener;
use tower_tenant_tokens::{
    AdaptiveOutput, OpenAiEstimator, PromptCalibration, TenantTokenLayer, TenantTokenTracker,
};

/// A cap no tenant reaches: nothing is refused.
const CAP: u64 = 1 << 40;
const TENANTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];
const TENANT: HeaderName = HeaderName::from_static("x-tenant-id");

/// The request bodies, non-streamed; the streamed case adds `"stream":true`.
const PROMPTS: [&str; 3] = [
    r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Summarise the plot of Hamlet in two sentences."}],"max_tokens":128,"temperature":0.7}"#,
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Translate into French: the meeting has moved to Thursday at ten."}]}"#,
    r#"{"model":"llama-3.1-8b-instruct","messages":[{"role":"system","content":"You write short poems."},{"role":"user","content":"A haiku about autumn rain."},{"role":"assistant","content":"Cold rain on the roof, / the maple lets go its last / red hands to the wind."},{"role":"user","content":"Another one, about snow."}],"max_tokens":64}"#,
];

/// The upstream's non-streamed answer.
const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1735689600,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Prince Hamlet's father's ghost asks him to avenge his murder; his revenge costs every life in the court."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":31,"completion_tokens":22,"total_tokens":53}}"#;

/// The streamed answer's content, one chunk each.
const DELTAS: [&str; 4] = ["Prince", " Hamlet", " avenges", " his father."];

// ---------------------------------------------------------------------------------------
// The upstream

/// What the upstream sends, built once.
struct Answers {
    completion: Bytes,
    /// The stream's events, without and with the usage chunk (and `"usage":null` on every
    /// other chunk, as OpenAI sends them when asked).
    stream: [Vec<Bytes>; 2],
}

impl Answers {
    fn new() -> Self {
        Answers {
            completion: Bytes::from_static(COMPLETION.as_bytes()),
            stream: [false, true].map(Self::events),
        }
    }

    fn events(include_usage: bool) -> Vec<Bytes> {
        let usage_null = if include_usage {
            r#","usage":null"#
        } else {
            ""
        };
        let chunk = |choices: &str, usage: &str| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\
                 \"created\":1735689600,\"model\":\"gpt-4o-mini\",\"choices\":{choices}{usage}}}\n\n"
            ))
        };
        let mut events: Vec<Bytes> = DELTAS
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let role = if i == 0 { r#""role":"assistant","# } else { "" };
                let choice = format!(
                    r#"[{{"index":0,"delta":{{{role}"content":"{text}"}},"finish_reason":null}}]"#
                );
                chunk(&choice, usage_null)
            })
            .collect();
        events.push(chunk(
            r#"[{"index":0,"delta":{},"finish_reason":"stop"}]"#,
            usage_null,
        ));
        if include_usage {
            let usage = r#","usage":{"prompt_tokens":31,"completion_tokens":4,"total_tokens":35}"#;
            events.push(chunk("[]", usage));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        events
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// `POST /v1/chat/completions` on the upstream: answered at once. The bodies are compact
/// JSON (the layer's edit too), so a byte search finds the two fields.
async fn answer(State(answers): State<Arc<Answers>>, body: Bytes) -> Response {
    if !contains(&body, br#""stream":true"#) {
        let headers = [(CONTENT_TYPE, "application/json")];
        return (headers, answers.completion.clone()).into_response();
    }
    let asked = contains(&body, br#""include_usage":true"#);
    let events = answers.stream[usize::from(asked)].clone();
    let events = futures_util::stream::iter(events.into_iter().map(Ok::<_, Infallible>));
    let headers = [
        (CONTENT_TYPE, "text/event-stream"),
        (CACHE_CONTROL, "no-cache"),
    ];
    (headers, Body::from_stream(events)).into_response()
}

// ---------------------------------------------------------------------------------------
// The servers

/// Serves `app` on a free 127.0.0.1 port with `axum::serve`, as the gateway does; with
/// `nodelay`, each accepted connection gets `TCP_NODELAY` (the gateway leaves it off).
async fn serve(app: Router, nodelay: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local address");
    let listener = listener.tap_io(move |tcp| {
        if nodelay {
            tcp.set_nodelay(true).expect("TCP_NODELAY");
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    addr
}

/// How the `proxy + layer` variant's layer is configured (`PROXY_BENCH_LAYER`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    /// As the gateway builds it (the default).
    Gateway,
    /// The same, but streams not asked for their usage.
    NoAsk,
    /// Tenant from the header and the OpenAI estimator only: no response body read.
    Minimal,
}

impl Config {
    fn from_env() -> Self {
        match std::env::var("PROXY_BENCH_LAYER").as_deref() {
            Ok("gateway") | Err(_) => Config::Gateway,
            Ok("no-ask") => Config::NoAsk,
            Ok("minimal") => Config::Minimal,
            Ok(other) => panic!("PROXY_BENCH_LAYER={other}: expected gateway, no-ask or minimal"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Config::Gateway => "as the gateway's",
            Config::NoAsk => "as the gateway's, streams not asked for usage",
            Config::Minimal => "tenant header and estimator only",
        }
    }

    /// The layer, on an in-memory tracker.
    fn layer(self, tracker: Arc<TenantTokenTracker>) -> TenantTokenLayer {
        let layer = TenantTokenLayer::new(tracker)
            .tenant_header(TENANT)
            .estimator(OpenAiEstimator::new());
        if self == Config::Minimal {
            return layer;
        }
        layer
            .read_usage(true)
            .openai_ratelimit_headers(true)
            .ask_stream_usage(self == Config::Gateway)
            .adaptive_output(Arc::new(AdaptiveOutput::new()))
            .calibrate_prompts(Arc::new(PromptCalibration::new()))
            .retry_after_from_in_flight(Duration::from_secs(30))
    }
}

/// The proxy's routes with no layer: those of [`proxy::router`], all forwarded as they are.
fn unmetered(proxy: proxy::Proxy) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(forward))
        .route("/v1/completions", post(forward))
        .route("/v1/responses", post(forward))
        .route("/v1/embeddings", post(forward))
        .route("/v1/messages", post(forward))
        .route("/v1/models", get(forward))
        .route("/v1/models/{*id}", get(forward))
        .with_state(Arc::new(proxy))
}

async fn forward(State(proxy): State<Arc<proxy::Proxy>>, request: Request) -> Response {
    proxy.forward(request).await
}

fn new_proxy(upstream: SocketAddr) -> proxy::Proxy {
    let base = format!("http://{upstream}/v1");
    proxy::Proxy::new(&base, None, Duration::from_secs(30), false).expect("a valid base URL")
}

// ---------------------------------------------------------------------------------------
// The load

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Completion,
    Stream,
}

impl Case {
    const ALL: [Case; 2] = [Case::Completion, Case::Stream];

    fn name(self) -> &'static str {
        match self {
            Case::Completion => "non-streamed",
            Case::Stream => "streamed",
        }
    }
}

const VARIANTS: [&str; 3] = ["direct to upstream", "proxy, no layer", "proxy + layer"];
const DIRECT: usize = 0;
const NO_LAYER: usize = 1;
const LAYER: usize = 2;

/// Everything a run needs: the servers (one per variant), the client, the bodies.
struct Bench {
    runtime: tokio::runtime::Runtime,
    /// `http://127.0.0.1:port/v1/chat/completions` of each variant, as [`VARIANTS`].
    targets: [Uri; 3],
    tracker: Arc<TenantTokenTracker>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// The bodies, per case.
    bodies: [Vec<Bytes>; 2],
    concurrency: usize,
    nodelay: bool,
    config: Config,
}

impl Bench {
    fn start(workers: usize, concurrency: usize, nodelay: bool, config: Config) -> Arc<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .expect("runtime");
        let tracker = Arc::new(TenantTokenTracker::new(CAP));
        let addrs = runtime.block_on(async {
            let answers = Arc::new(Answers::new());
            let upstream = Router::new()
                .route("/v1/chat/completions", post(answer))
                .with_state(answers);
            let upstream = serve(upstream, nodelay).await;
            let no_layer = serve(unmetered(new_proxy(upstream)), nodelay).await;
            let layer = config.layer(tracker.clone());
            let layered = serve(proxy::router(new_proxy(upstream), layer), nodelay).await;
            [upstream, no_layer, layered]
        });
        let targets = addrs.map(|addr| {
            format!("http://{addr}/v1/chat/completions")
                .parse()
                .expect("a valid URI")
        });
        let streamed = |body: &&str| {
            let body = body.replacen('{', r#"{"stream":true,"#, 1);
            Bytes::from(body)
        };
        let bodies = [
            PROMPTS
                .iter()
                .map(|b| Bytes::from_static(b.as_bytes()))
                .collect(),
            PROMPTS.iter().map(streamed).collect(),
        ];
        // Pooled: each variant keeps its connections alive from one request to the next.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(nodelay);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Arc::new(Bench {
            runtime,
            targets,
            tracker,
            client,
            bodies,
            concurrency,
            nodelay,
            config,
        })
    }

    /// Request `i` of `case` to variant `target`.
    fn request(&self, target: usize, case: Case, i: usize) -> http::Request<Full<Bytes>> {
        let bodies = &self.bodies[case as usize];
        let body = bodies[(i / TENANTS.len()) % bodies.len()].clone();
        let accept = match case {
            Case::Completion => "application/json",
            Case::Stream => "text/event-stream",
        };
        http::Request::post(self.targets[target].clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, accept)
            .header(USER_AGENT, "OpenAI/Python 1.109.1")
            .header(AUTHORIZATION, "Bearer sk-bench-0123456789abcdef")
            .header(TENANT, TENANTS[i % TENANTS.len()])
            .body(Full::new(body))
            .expect("a valid request")
    }

    /// Sends request `i` and reads its body to the end: the time it took and the body.
    async fn one(&self, target: usize, case: Case, i: usize) -> (Duration, Bytes) {
        let request = self.request(target, case, i);
        let start = Instant::now();
        let response = self.client.request(request).await.expect("a response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("the response body")
            .to_bytes();
        let elapsed = start.elapsed();
        assert_eq!(
            status,
            StatusCode::OK,
            "{}: {}",
            VARIANTS[target],
            String::from_utf8_lossy(&body)
        );
        (elapsed, body)
    }

    /// `requests` requests of `case` to variant `target`, `concurrency` at a time.
    async fn round(self: &Arc<Self>, target: usize, case: Case, requests: usize) -> Round {
        let next = Arc::new(AtomicUsize::new(0));
        let cpu = process_cpu();
        let started = Instant::now();
        let tasks: Vec<_> = (0..self.concurrency.min(requests))
            .map(|_| {
                let (bench, next) = (Arc::clone(self), Arc::clone(&next));
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(requests / bench.concurrency + 1);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= requests {
                            return latencies;
                        }
                        latencies.push(bench.one(target, case, i).await.0);
                    }
                })
            })
            .collect();
        let mut latencies = Vec::with_capacity(requests);
        for task in tasks {
            latencies.extend(task.await.expect("a load task"));
        }
        let elapsed = started.elapsed();
        let cpu = match (cpu, process_cpu()) {
            (Some(before), Some(after)) => after.checked_sub(before),
            _ => None,
        };
        Round {
            elapsed,
            latencies,
            cpu,
        }
    }

    /// One request of each kind to each variant, its answer checked: every variant
    /// answers the same thing, the layer's work (asking for usage, taking the usage chunk
    /// out) included.
    fn check(self: &Arc<Self>) {
        self.runtime.block_on(async {
            for case in Case::ALL {
                let mut answers = Vec::new();
                for target in 0..VARIANTS.len() {
                    answers.push(self.one(target, case, 0).await.1);
                }
                for (target, body) in answers.iter().enumerate() {
                    assert_eq!(body, &answers[DIRECT], "{}", VARIANTS[target]);
                }
                if case == Case::Stream {
                    assert!(answers[LAYER].ends_with(b"data: [DONE]\n\n"));
                    assert!(!contains(&answers[LAYER], br#""usage""#));
                }
            }
            let held = self.tracker.snapshot();
            assert!(
                held.iter().any(|(_, state)| state.high_water > 0),
                "the layer reserved nothing"
            );
        });
    }

    /// Tokens the layer's tracker holds (every tenant), once the last releases landed.
    fn settled_in_flight(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let held: u64 = self
                .tracker
                .snapshot()
                .iter()
                .map(|(_, s)| s.in_flight)
                .sum();
            if held == 0 || Instant::now() >= deadline {
                return held;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The table

/// One variant's round.
struct Round {
    elapsed: Duration,
    /// Every request's time, from send to the end of its body.
    latencies: Vec<Duration>,
    /// The CPU time the whole process (servers and load generator) used meanwhile.
    cpu: Option<Duration>,
}

/// The CPU time every thread of this process has used so far
/// (`/proc/self/task/*/schedstat`), where Linux tells.
fn process_cpu() -> Option<Duration> {
    let mut nanos = 0_u64;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        // A thread that has just ended has nothing left to read: skipped.
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        nanos += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(nanos))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `median (min–max)` of `values`, with `digits` decimals.
fn spread(values: Vec<f64>, digits: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{:.digits$} ({min:.digits$}–{max:.digits$})",
        median(values)
    )
}

/// Each variant's figures in one round: requests per second, CPU µs per request.
type Figures = [(f64, Option<f64>); 3];

fn table(bench: &Arc<Bench>, rounds: usize, requests: usize) {
    let workers = bench.runtime.metrics().num_workers();
    println!(
        "\nrequests/s through the gateway's proxy, {} in flight, {requests} requests a round, \
         {rounds} rounds interleaved (median), {workers} runtime workers shared with the load, \
         TCP_NODELAY {}; the layer {}",
        bench.concurrency,
        if bench.nodelay { "on" } else { "off" },
        bench.config.name(),
    );
    println!(
        "{:<14} {:<20} {:>11} {:>13} {:>9} {:>9}",
        "case", "variant", "requests/s", "CPU µs/req", "p50 µs", "p99 µs"
    );
    let mut summaries = Vec::new();
    for case in Case::ALL {
        let cpu = CpuTimes::now();
        let mut per_round: Vec<Figures> = Vec::with_capacity(rounds);
        let mut latencies: [Vec<Duration>; 3] = Default::default();
        bench.runtime.block_on(async {
            for target in 0..VARIANTS.len() {
                bench.round(target, case, requests).await; // warm-up, not recorded
            }
            for round in 0..rounds {
                let mut figures = [(0.0, None); 3];
                for k in 0..VARIANTS.len() {
                    let target = (round + k) % VARIANTS.len();
                    let measured = bench.round(target, case, requests).await;
                    figures[target] = (
                        requests as f64 / measured.elapsed.as_secs_f64(),
                        measured
                            .cpu
                            .map(|cpu| cpu.as_secs_f64() * 1e6 / requests as f64),
                    );
                    latencies[target].extend(measured.latencies);
                }
                per_round.push(figures);
            }
        });
        let stolen = cpu.stolen().map_or("unknown".to_owned(), |share| {
            format!("{:.1} %", share * 100.0)
        });
        let cpu_of =
            |target: usize| -> Option<Vec<f64>> { per_round.iter().map(|r| r[target].1).collect() };
        for (target, times) in latencies.iter_mut().enumerate() {
            times.sort_unstable();
            let rate = median(per_round.iter().map(|r| r[target].0).collect());
            let cpu = cpu_of(target).map_or("-".to_owned(), |cpu| format!("{:.1}", median(cpu)));
            println!(
                "{:<14} {:<20} {:>11.0} {:>13} {:>9} {:>9}",
                case.name(),
                VARIANTS[target],
                rate,
                cpu,
                percentile(times, 0.5).as_micros(),
                percentile(times, 0.99).as_micros(),
            );
        }
        let ratio = |over: usize, under: usize| {
            spread(
                per_round.iter().map(|r| r[over].0 / r[under].0).collect(),
                2,
            )
        };
        let added = |over: usize, under: usize| match (cpu_of(over), cpu_of(under)) {
            (Some(over), Some(under)) => {
                spread(over.iter().zip(&under).map(|(o, u)| o - u).collect(), 1)
            }
            _ => "-".to_owned(),
        };
        summaries.push(format!(
            "{:<14} requests/s: layer ÷ no layer {}, proxy (no layer) ÷ direct {}, \
             layer ÷ direct {}\n{:<14} CPU µs a request: the layer adds {} to the proxy, \
             the proxy {} to the upstream and the load; stolen {stolen}",
            case.name(),
            ratio(LAYER, NO_LAYER),
            ratio(NO_LAYER, DIRECT),
            ratio(LAYER, DIRECT),
            "",
            added(LAYER, NO_LAYER),
            added(NO_LAYER, DIRECT),
        ));
    }
    println!("\nmedian of per-round ratios and differences (min–max over the rounds):");
    for summary in summaries {
        println!("{summary}");
    }
    println!(
        "layer: {} tokens in flight after the rounds (every reservation released)\n",
        bench.settled_in_flight()
    );
}

fn criterion_benches(c: &mut Criterion, bench: &Arc<Bench>) {
    for case in Case::ALL {
        let mut group = c.benchmark_group(format!("proxy/{}", case.name()));
        group
            .throughput(Throughput::Elements(1))
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        for (target, name) in VARIANTS.iter().enumerate() {
            group.bench_function(*name, |b| {
                b.iter_custom(|iters| {
                    let requests = usize::try_from(iters).expect("iterations fit usize");
                    bench
                        .runtime
                        .block_on(bench.round(target, case, requests))
                        .elapsed
                })
            });
        }
        group.finish();
    }
}

/// The number in environment variable `name`, or `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rounds = env_or("PROXY_BENCH_ROUNDS", 9_usize).max(1);
    let requests = env_or("PROXY_BENCH_REQUESTS", 10_000_usize).max(1);
    let concurrency = env_or("PROXY_BENCH_CONCURRENCY", 32_usize).max(1);
    let workers = env_or("PROXY_BENCH_WORKERS", 2_usize).max(1);
    let nodelay = env_or("PROXY_BENCH_NODELAY", 1_u8) != 0;
    let bench = Bench::start(workers, concurrency, nodelay, Config::from_env());
    bench.check();
    table(&bench, rounds, requests);
    let mut criterion = Criterion::default().configure_from_args();
    criterion_benches(&mut criterion, &bench);
    criterion.final_summary();
}
