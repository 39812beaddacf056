//! An OpenAI-compatible LLM gateway that caps the tokens each tenant has in flight.
//!
//! By default everything runs in this one process: an in-memory [`TenantTokenTracker`],
//! the [`TenantTokenLayer`] in front of `/v1`, and a mock upstream model that answers with
//! `--chunks` tokens, one every `--token-delay-ms` (streamed as server-sent events when the
//! request says `"stream": true`). With `--upstream` the gateway forwards to a real model
//! server instead (see below). Each request reserves its estimate, the prompt plus its
//! `max_tokens`, until its response has been sent; each tenant may have
//! `--cap` tokens (default 4,096) reserved at once. The layer reads the usage the upstream
//! reports ([`read_usage`](TenantTokenLayer::read_usage)): a stream that runs past its
//! reservation grows it as it goes, and the reservation is settled on the reported total
//! when the response ends. The mock upstream reports usage as OpenAI does: on every
//! non-streamed answer, and in a last chunk (empty `choices`) of a stream that asks for
//! `stream_options.include_usage`. The layer asks every stream that did not say
//! ([`ask_stream_usage`](TenantTokenLayer::ask_stream_usage); off with `--no-ask-usage`, and
//! then it counts the text such streams carry) and takes the usage chunk out again before
//! the client sees it.
//! A request without `max_tokens` reserves the output that tenant's requests to that model
//! really produced ([`adaptive_output`](TenantTokenLayer::adaptive_output); 1,024 until 8
//! are known, or always with `--no-adaptive`), never more than the cap can hold. A prompt
//! reserves what its text costs at its model, learned from the prompt tokens the upstream
//! reports ([`calibrate_prompts`](TenantTokenLayer::calibrate_prompts); 4 bytes a token
//! until a model has reported a few, or always with `--no-calibrate`). A 429's
//! `Retry-After` follows how long reservations are held
//! ([`retry_after_from_in_flight`](TenantTokenLayer::retry_after_from_in_flight), at most
//! 30 s).
//!
//! ```text
//! cargo run --example gateway                 # listens on 127.0.0.1:3000
//! cargo run --example gateway -- --help
//!
//! # 200: an answer (add "stream":true for server-sent events; curl -N shows them arrive)
//! curl -s 127.0.0.1:3000/v1/chat/completions -H 'x-tenant-id: acme' \
//!   -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi!"}]}'
//!
//! # 429 with Retry-After and x-ratelimit-*: a long stream holds 3,500 of acme's 4,096 tokens
//! # while a second request asks for about 1,030
//! curl -sN 127.0.0.1:3000/v1/chat/completions -H 'x-tenant-id: acme' -o /dev/null \
//!   -d '{"model":"m","max_tokens":3500,"stream":true,"messages":[]}' & sleep 0.1
//! curl -si 127.0.0.1:3000/v1/chat/completions -H 'x-tenant-id: acme' \
//!   -d '{"model":"m","messages":[{"role":"user","content":"Hi!"}]}'
//!
//! # 413: a request that could never fit the cap
//! curl -si 127.0.0.1:3000/v1/chat/completions -H 'x-tenant-id: acme' \
//!   -d '{"model":"m","max_tokens":5000,"messages":[]}'
//!
//! # 400: malformed JSON, or no tenant
//! curl -si 127.0.0.1:3000/v1/chat/completions -H 'x-tenant-id: acme' -d '{"model":'
//! curl -si 127.0.0.1:3000/v1/chat/completions -d '{"model":"m","messages":[]}'
//!
//! # What every tenant holds now, its cap and its peak
//! curl -s 127.0.0.1:3000/admin/tenants
//!
//! # Limits over time: started with `-- --tpm 2000`, each tenant may use 2,000 tokens a
//! # minute; once they are used, 429 `window_exceeded` says when to come back, and
//! # /admin/tenants/acme shows what is left
//! curl -s 127.0.0.1:3000/admin/tenants/acme
//!
//! # The output allowances learned per tenant and model
//! curl -s 127.0.0.1:3000/admin/estimates
//! ```
//!
//! With `--redis URL` (build with `--features redis`) the cap is kept in Redis and shared by
//! every gateway started with the same URL: run two on different `--addr`s and a tenant's
//! cap holds across both. `--redis-down closed|open|share:N` picks what happens while Redis
//! is unreachable (503, admit uncounted, or a 1/N share of the cap in memory), and
//! `--redis-headroom PCT` lets each gateway admit a busy tenant's requests without a round
//! trip, from headroom of PCT % of its cap held in Redis. With `--upstream-cap` and
//! `--wait-ms` too, the requests waiting for the upstream on every
//! gateway are served in one fair order kept in Redis. `--tpm`, `--tpd` and
//! `--spend-per-day` keep one bucket per tenant in Redis for every gateway.
//!
//! ```text
//! cargo run --example gateway --features redis -- --redis redis://127.0.0.1:6379
//! cargo run --example gateway --features redis -- --redis redis://127.0.0.1:6379 --addr 127.0.0.1:3001
//! curl -s 127.0.0.1:3001/admin/tenants/acme
//! ```
//!
//! A Redis Cluster or a Sentinel-watched master instead of one server:
//!
//! ```text
//! cargo run --example gateway --features redis -- --redis-cluster redis://127.0.0.1:7000,redis://127.0.0.1:7001
//! cargo run --example gateway --features redis -- --redis-sentinel redis://127.0.0.1:26379 --sentinel-master mymaster
//! ```
//!
//! With `--features metrics`, `GET /metrics` serves the layer's metrics in Prometheus text
//! (requests by outcome and reason, tokens in flight, reserved and reconciled), labelled by
//! tenant for the first 100 tenants.
//!
//! OpenAI's client SDKs work unchanged: base URL `http://127.0.0.1:3000/v1`, any API key,
//! and the `x-tenant-id` header as a default header. A 429 from the layer is their
//! rate-limit error, retried after `Retry-After`. Every metered response says the tenant's
//! cap and what is left of it in `x-ratelimit-limit-tokens` and
//! `x-ratelimit-remaining-tokens`, as OpenAI's API does.
//!
//! # In front of your model server
//!
//! `--upstream` takes the base URL an OpenAI SDK would use for your server, and the gateway
//! forwards to it (`proxy.rs` beside this file: pooled connections, bodies streamed both
//! ways, server-sent events passed on as they arrive):
//!
//! ```text
//! vllm serve Qwen/Qwen2.5-0.5B-Instruct --port 8000 &       # or any OpenAI-compatible server
//! cargo run --example gateway -- --upstream http://127.0.0.1:8000/v1
//! curl -s 127.0.0.1:3000/v1/models                         # unmetered: no tenant needed
//! curl -sN 127.0.0.1:3000/v1/chat/completions -H 'x-tenant-id: acme' \
//!   -d '{"model":"Qwen/Qwen2.5-0.5B-Instruct","stream":true,"messages":[{"role":"user","content":"Hi!"}]}'
//!
//! # an upstream started with an API key (vllm serve … --api-key KEY): the key stays on the
//! # gateway, and clients' own Authorization and x-api-key are not forwarded
//! UPSTREAM_KEY=KEY cargo run --example gateway -- --upstream http://10.0.0.5:8000/v1 \
//!   --upstream-key-env UPSTREAM_KEY
//! ```
//!
//! Metered (behind the layer): `POST /v1/chat/completions`, `/v1/completions`,
//! `/v1/responses`, `/v1/embeddings` and Anthropic's `/v1/messages`; `GET /v1/models` passes
//! unmetered. An upstream that cannot be reached gets 502, one that sends no response head
//! within `--upstream-timeout` seconds 504, as OpenAI-style JSON errors; the reservation
//! is released either way. The upstream is plain `http` (HTTP/1.1, or HTTP/2 with prior
//! knowledge with `--upstream-http2`): an `https` one needs a TLS connector, which the
//! example leaves out, and is refused at start-up.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use futures_util::{stream, StreamExt};
use serde_json::{json, Value};
use tower_tenant_tokens::{
    AdaptiveOutput, OpenAiEstimator, Price, Prices, PromptCalibration, ShadowMode, SharedBudget,
    TenantTokenLayer, TenantTokenTracker, TokenLedger, TokenWindow,
};

mod proxy;

const USAGE: &str = "\
An OpenAI-compatible gateway capping each tenant's tokens in flight, in front of a mock
upstream or of your model server (--upstream).

usage: cargo run --example gateway -- [OPTIONS]

  --addr ADDR           address to listen on (default 127.0.0.1:3000)
  --cap TOKENS          tokens each tenant may have in flight (default 4096)
  --upstream BASE_URL   forward to this OpenAI-compatible server instead of the mock, e.g.
                        http://127.0.0.1:8000/v1 (the base URL an OpenAI SDK would use;
                        plain http only: https needs a TLS connector)
  --upstream-key-env VAR
                        send the upstream `Authorization: Bearer $VAR` (read at start-up),
                        and not the clients' own Authorization or x-api-key
  --upstream-timeout SECS
                        wait this long for the upstream's response head, then 504
                        (default 600; a stream may run longer)
  --upstream-http2      speak HTTP/2 to the upstream (prior knowledge; default HTTP/1.1)
  --chunks N            tokens in each mock answer, one chunk each when streamed (default 16)
  --token-delay-ms MS   time the mock upstream takes per token (default 25)
  --redis URL           share the caps with every gateway on this Redis, e.g.
                        redis://127.0.0.1:6379 (needs --features redis)
  --redis-cluster URL[,URL...]
                        the same on a Redis Cluster (any of its nodes)
  --redis-sentinel URL[,URL...] --sentinel-master NAME
                        the same on the master these Sentinels watch as NAME,
                        following failovers
  --redis-down POLICY   while Redis is unreachable: closed (503, default), open (admit
                        uncounted) or share:N (a 1/N share of each cap, in memory)
  --redis-headroom PCT  admit a busy tenant's requests without a round trip, from
                        headroom of PCT % of its cap held in Redis (default 0: off;
                        at most 50)
  --upstream-cap TOKENS a cap all tenants share (the upstream's capacity; with --redis,
                        shared by every replica too), next to each
                        tenant's own
  --wait-ms MS          let a request over the cap wait up to MS for capacity; across
                        tenants waiting for --upstream-cap, by class, then fairly (with
                        --redis, in one order for every replica)
  --weight TENANT=W     TENANT's weight in the fair share of the upstream (default 1);
                        repeatable
  (a request's class comes from header x-priority: critical, standard or sheddable)
  --tpm N               every tenant may use N tokens per minute (a bucket that refills
                        continuously; 429 with Retry-After when it is empty; with
                        --redis, one bucket for every replica)
  --tpd N               every tenant may use N tokens per day
  --spend-per-day X --prices FILE
                        every tenant may spend X per day, each request priced by its
                        model from FILE, a JSON object of model -> prices per million
                        tokens: {\"gpt-4o-mini\": {\"input\": 0.15, \"cached_input\": 0.075,
                        \"output\": 0.6}} (cached_input defaults to input; a \"*\" entry
                        prices the models not listed, which are refused without one)
  --shadow              count and log what the caps would refuse, and admit it anyway
  --no-adaptive         reserve the fixed 1,024 output tokens for requests without
                        max_tokens, instead of what each tenant's requests to the model
                        really produce (GET /admin/estimates shows what was learned)
  --no-calibrate        estimate prompts at 4 bytes a token, instead of learning what each
                        model's prompts cost from the prompt tokens it reports
  --no-ask-usage        forward streams as they come, instead of asking those that did
                        not say for stream_options.include_usage (and taking the usage
                        chunk out before the client sees it)
  -h, --help            print this help

Log levels come from RUST_LOG (default info).";

#[derive(Clone)]
struct AppState {
    ledger: Ledger,
    windows: Vec<TokenWindow>,
    chunks: u32,
    token_delay: Duration,
    learned: Arc<AdaptiveOutput>,
    calibration: Arc<PromptCalibration>,
}

/// Where the caps are counted.
#[derive(Clone)]
enum Ledger {
    Memory(Arc<TenantTokenTracker>),
    #[cfg(feature = "redis")]
    Redis(tower_tenant_tokens::redis::RedisTokenTracker),
}

#[tokio::main]
async fn main() {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => return println!("{USAGE}"),
        Err(error) => {
            eprintln!("error: {error}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let addr = options.addr;
    let ledger = match ledger(&options) {
        Ok(ledger) => ledger,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    };
    let proxy = match upstream(&options) {
        Ok(proxy) => proxy,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    };
    let layer = match &ledger {
        Ledger::Memory(tracker) => TenantTokenLayer::new(tracker.clone()),
        #[cfg(feature = "redis")]
        Ledger::Redis(tracker) => TenantTokenLayer::new(tracker.clone()),
    };
    // The tenant comes from a header so the demo is easy to drive with curl. Anyone can set
    // a header: in production authenticate first, insert a `TenantScope` into the request
    // extensions, and use `.tenant_from_extension()` instead.
    let mut limits = layer
        .tenant_header(HeaderName::from_static("x-tenant-id"))
        .estimator(OpenAiEstimator::new())
        .read_usage(true) // the reservations follow the usage the upstream reports
        // Admitted responses say the tenant's cap and what is left, as OpenAI's API does
        // (refusals over the cap say it whether or not this is on).
        .openai_ratelimit_headers(true)
        // Streams that did not ask for their usage are asked, and the answer to that is
        // taken out of the stream again: each settles on the usage the upstream reports.
        .ask_stream_usage(options.ask_usage);
    if let Some(cap) = options.upstream_cap {
        // One upstream for every replica: with Redis, its budget is counted there too.
        let upstream: TokenLedger = match &ledger {
            Ledger::Memory(_) => Arc::new(TenantTokenTracker::new(cap)).into(),
            #[cfg(feature = "redis")]
            Ledger::Redis(_) => {
                let redis = options.redis.as_ref().expect("a Redis ledger has a URL");
                let budget = tower_tenant_tokens::redis::RedisTokenTracker::builder(cap)
                    .key_prefix("tenant-tokens-budget:");
                match redis.connect(budget) {
                    Ok(budget) => budget.into(),
                    Err(error) => {
                        eprintln!("error: {error}");
                        std::process::exit(2);
                    }
                }
            }
        };
        limits = limits.shared_budget(SharedBudget::new("upstream", upstream));
    }
    if let Some(wait) = options.wait {
        let weights = options.weights.clone();
        limits = limits
            .wait_for_capacity(wait)
            .priority_header(HeaderName::from_static("x-priority"))
            .tenant_weight(move |tenant| weights.get(tenant).copied().unwrap_or(1));
    }
    // Limits over time, charged in the same admission as the in-flight cap and settled on
    // the usage the upstream reports.
    let mut windows: Vec<TokenWindow> = [
        options.tpm.map(TokenWindow::per_minute),
        options.tpd.map(TokenWindow::per_day),
    ]
    .into_iter()
    .flatten()
    .collect();
    if let (Some(limit), Some(file)) = (options.spend_per_day, &options.prices) {
        match prices(file) {
            Ok(prices) => windows.push(TokenWindow::spend_per_day(limit, prices)),
            Err(error) => {
                eprintln!("error: --prices {file}: {error}");
                std::process::exit(2);
            }
        }
    }
    for window in &windows {
        limits = limits.window(window.clone());
    }
    if options.shadow {
        limits = limits.shadow(ShadowMode::All);
    }
    // Requests without max_tokens reserve what that tenant's requests to that model really
    // produce (learned from the usage the layer reads), not a fixed 1,024.
    let learned = Arc::new(AdaptiveOutput::new());
    if options.adaptive {
        limits = limits.adaptive_output(learned.clone());
    }
    // Prompts are estimated from what their text costs at each model, learned from the
    // prompt tokens the upstream reports, not at a fixed 4 bytes a token.
    let calibration = Arc::new(PromptCalibration::new());
    if options.calibrate {
        limits = limits.calibrate_prompts(calibration.clone());
    }
    // Streams hold their tokens for seconds: a refused client is told to come back after
    // about as long as what it waits for is held, not after the layer's fixed second.
    limits = limits.retry_after_from_in_flight(Duration::from_secs(30));
    // Tenant labels on the metrics, for the first 100 tenants: ids here come from a header
    // anyone can set, so the series must be bounded.
    #[cfg(feature = "metrics")]
    let limits =
        limits.metrics_tenant_labels(tower_tenant_tokens::metrics::TenantLabels::Bounded(100));
    let state = AppState {
        ledger,
        windows,
        chunks: options.chunks,
        token_delay: options.token_delay,
        learned,
        calibration,
    };
    let answering = options.upstream.as_deref().unwrap_or("the mock upstream");
    let v1 = match proxy {
        Some(proxy) => proxy::router(proxy, limits),
        None => Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route_layer(limits) // only the routes above: /admin needs no tenant
            .with_state(state.clone()),
    };
    let app = v1.merge(
        Router::new()
            .route("/admin/tenants", get(tenants))
            .route("/admin/tenants/{tenant}", get(tenant))
            .route("/admin/estimates", get(estimates))
            .with_state(state),
    );
    #[cfg(feature = "metrics")]
    let app = {
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("the only metrics recorder");
        app.route("/metrics", get(move || async move { prometheus.render() }))
    };

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|error| {
            eprintln!("error: cannot listen on {addr}: {error}");
            std::process::exit(1)
        });
    tracing::info!(
        "listening, cap {} tokens ({}), OpenAI base URL http://{addr}/v1, answering from {answering}",
        options.cap,
        options
            .redis
            .as_ref()
            .map_or("in memory".to_owned(), RedisAt::to_string),
    );
    println!(
        "try: curl -s {addr}/v1/chat/completions -H 'x-tenant-id: acme' \
         -d '{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hi!\"}}]}}'"
    );
    // Streamed events are small writes: without TCP_NODELAY each waits for the client's
    // delayed ack (tens of milliseconds an event).
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "could not set TCP_NODELAY");
        }
    });
    if let Err(error) = axum::serve(listener, app).await {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

/// `POST /v1/chat/completions`. The layer has already admitted the request: its tenant was
/// under the cap, and the reservation is in the extensions.
async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The layer refuses bodies that are not JSON objects (400) before they get here; the
    // handler checks all the same rather than trust it.
    let request: Value = match serde_json::from_slice(&body) {
        Ok(request @ Value::Object(_)) => request,
        _ => return (StatusCode::BAD_REQUEST, "expected a JSON object").into_response(),
    };
    let answer = Completion::generate(&request, state.chunks);
    tracing::info!(
        tenant = headers.get("x-tenant-id").and_then(|v| v.to_str().ok()),
        model = %answer.model,
        stream = request["stream"] == true,
        "chat completion"
    );
    let delay = state.token_delay;

    if request["stream"] != true {
        tokio::time::sleep(delay.saturating_mul(answer.tokens)).await; // the upstream works
        return Json(answer.full_response()).into_response();
    }

    // One chunk per token; the reservation is held until the last one is sent, or until the
    // client disconnects and the body is dropped.
    let deltas = stream::iter(0..answer.tokens).then({
        let answer = answer.clone();
        move |i| {
            let event = sse(&answer.chunk(i));
            async move {
                tokio::time::sleep(delay).await;
                event
            }
        }
    });
    let end = stream::once(async move {
        let mut tail = sse(&answer.finish_chunk());
        if answer.include_usage {
            tail += &sse(&answer.usage_chunk());
        }
        tail + "data: [DONE]\n\n"
    });
    let body = Body::from_stream(deltas.chain(end).map(Ok::<_, Infallible>));
    let headers = [
        (CONTENT_TYPE, "text/event-stream"),
        (CACHE_CONTROL, "no-cache"),
    ];
    (headers, body).into_response()
}

/// The proxy to the upstream `--upstream` names, if it names one.
fn upstream(options: &Options) -> Result<Option<proxy::Proxy>, String> {
    let Some(base_url) = &options.upstream else {
        return Ok(None);
    };
    // Read once: a key that is missing fails here rather than on the first request.
    let key = match &options.upstream_key_env {
        Some(var) => match std::env::var(var) {
            Ok(key) if !key.is_empty() => Some(key),
            _ => return Err(format!("--upstream-key-env {var}: ${var} is not set")),
        },
        None => None,
    };
    let timeout = options.upstream_timeout;
    proxy::Proxy::new(base_url, key.as_deref(), timeout, options.upstream_http2)
        .map(Some)
        .map_err(|error| format!("--upstream {error}"))
}

/// The ledger `options` ask for.
fn ledger(options: &Options) -> Result<Ledger, String> {
    let Some(redis) = &options.redis else {
        return Ok(Ledger::Memory(Arc::new(TenantTokenTracker::new(
            options.cap,
        ))));
    };
    #[cfg(feature = "redis")]
    {
        use tower_tenant_tokens::redis::{FailurePolicy, RedisTokenTracker};
        let policy = match options.redis_down.as_str() {
            "closed" => FailurePolicy::FailClosed,
            "open" => FailurePolicy::FailOpen,
            share => match share.strip_prefix("share:").map(str::parse) {
                Some(Ok(replicas)) if replicas > 0 => FailurePolicy::LocalShare { replicas },
                _ => return Err(format!("--redis-down: unknown policy `{share}`")),
            },
        };
        let builder = RedisTokenTracker::builder(options.cap)
            .on_unavailable(policy)
            .local_headroom(options.redis_headroom);
        redis.connect(builder).map(Ledger::Redis)
    }
    #[cfg(not(feature = "redis"))]
    Err(format!(
        "{redis}: this build has no Redis support; run with \
         `cargo run --example gateway --features redis -- …`"
    ))
}

/// Where the shared ledger lives: `--redis`, `--redis-cluster` or `--redis-sentinel`.
enum RedisAt {
    Single(String),
    Cluster(Vec<String>),
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

impl RedisAt {
    /// A tracker built by `builder`, connected here.
    #[cfg(feature = "redis")]
    fn connect(
        &self,
        builder: tower_tenant_tokens::redis::RedisTokenTrackerBuilder,
    ) -> Result<tower_tenant_tokens::redis::RedisTokenTracker, String> {
        let built = match self {
            RedisAt::Single(url) => builder.connect(url.as_str()),
            RedisAt::Cluster(nodes) => builder.connect_cluster(nodes.iter().map(String::as_str)),
            RedisAt::Sentinel { sentinels, master } => {
                builder.connect_sentinel(sentinels.iter().map(String::as_str), master)
            }
        };
        built.map_err(|error| format!("{self}: {error}"))
    }
}

impl std::fmt::Display for RedisAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisAt::Single(url) => write!(f, "--redis {url}"),
            RedisAt::Cluster(nodes) => write!(f, "--redis-cluster {}", nodes.join(",")),
            RedisAt::Sentinel { sentinels, master } => write!(
                f,
                "--redis-sentinel {} --sentinel-master {master}",
                sentinels.join(",")
            ),
        }
    }
}

/// `GET /admin/tenants/{tenant}`: what one tenant has in flight (across every replica, with
/// Redis) and its cap, and what is left of each window (`--tpm`, `--tpd`,
/// `--spend-per-day`, the last in millionths).
async fn tenant(State(state): State<AppState>, Path(tenant): Path<String>) -> Response {
    let (in_flight, cap) = match &state.ledger {
        Ledger::Memory(tracker) => (tracker.in_flight(&tenant), tracker.cap(&tenant)),
        #[cfg(feature = "redis")]
        Ledger::Redis(tracker) => match tracker.in_flight(&tenant).await {
            Ok(in_flight) => (in_flight, tracker.cap(&tenant)),
            Err(error) => {
                return (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response()
            }
        },
    };
    let mut windows = Vec::new();
    for window in &state.windows {
        // With Redis, the bucket every replica charges; in memory, this process's.
        let remaining = match &state.ledger {
            Ledger::Memory(_) => window.remaining(&tenant),
            #[cfg(feature = "redis")]
            Ledger::Redis(tracker) => match tracker.window_remaining(window, &tenant).await {
                Ok(remaining) => remaining,
                Err(error) => {
                    return (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response()
                }
            },
        };
        windows.push(json!({
            "window": window.name(), "limit": window.limit(&tenant), "remaining": remaining,
        }));
    }
    let mut body = json!({ "tenant": tenant, "in_flight": in_flight, "cap": cap });
    if !windows.is_empty() {
        body["windows"] = Value::Array(windows);
    }
    Json(body).into_response()
}

/// `GET /admin/tenants`: every tenant the tracker knows, sorted by id (in memory), or the
/// tenants with work in flight across every replica and this replica's counts of what
/// Redis decided (with Redis).
#[cfg_attr(not(feature = "redis"), allow(clippy::infallible_destructuring_match))]
async fn tenants(State(state): State<AppState>) -> Json<Value> {
    let tracker = match &state.ledger {
        Ledger::Memory(tracker) => tracker,
        #[cfg(feature = "redis")]
        Ledger::Redis(tracker) => {
            let stats = tracker.stats();
            // Every replica's work, as Redis counts it (the first 100 tenants).
            let tenants: Vec<Value> = match tracker.tenants_in_flight(100).await {
                Ok(listed) => listed
                    .into_iter()
                    .map(|(tenant, in_flight)| {
                        json!({ "tenant": tenant, "in_flight": in_flight, "cap": tracker.cap(&tenant) })
                    })
                    .collect(),
                Err(error) => vec![json!({ "error": error.to_string() })],
            };
            return Json(json!({
                "tenants": tenants,
                "redis": {
                    "admitted": stats.admitted, "refused": stats.refused,
                    "unavailable": stats.unavailable, "lost_leases": stats.lost_leases,
                    "failed_releases": stats.failed_releases,
                    "live_leases": tracker.live_leases(),
                    "circuit_open": tracker.is_circuit_open(),
                },
            }));
        }
    };
    let mut snapshot = tracker.snapshot();
    snapshot.sort_by(|a, b| a.0.cmp(&b.0));
    let tenants: Vec<Value> = snapshot
        .into_iter()
        .map(|(tenant, state)| {
            json!({
                "tenant": tenant, "in_flight": state.in_flight,
                "cap": state.cap, "high_water": state.high_water,
            })
        })
        .collect();
    Json(json!({ "tenants": tenants }))
}

/// `GET /admin/estimates`: the output allowances learned per tenant and model (`null`
/// while too few outputs are known: the fixed default applies).
async fn estimates(State(state): State<AppState>) -> Json<Value> {
    let learned: Vec<Value> = state
        .learned
        .snapshot()
        .into_iter()
        .map(|learned| {
            json!({
                "tenant": learned.tenant, "model": learned.model,
                "samples": learned.samples, "output_allowance": learned.allowance,
            })
        })
        .collect();
    let prompts: Vec<Value> = state
        .calibration
        .snapshot()
        .into_iter()
        .map(|calibrated| json!({ "model": calibrated.model, "samples": calibrated.samples }))
        .collect();
    Json(json!({ "estimates": learned, "prompts": prompts }))
}

/// The mock upstream's answer to one chat request.
#[derive(Clone)]
struct Completion {
    id: String,
    created: u64,
    model: String,
    tokens: u32,
    finish_reason: &'static str,
    prompt_tokens: u64,
    /// The request asked for `stream_options.include_usage`: every chunk carries `usage`.
    include_usage: bool,
}

const WORDS: [&str; 8] = [
    "This", "is", "a", "mock", "answer", "from", "the", "gateway.",
];

impl Completion {
    fn generate(request: &Value, chunks: u32) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let limit = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|key| request[key].as_u64())
            .unwrap_or(u64::MAX);
        let tokens = u32::try_from(limit).unwrap_or(u32::MAX).min(chunks);
        Self {
            id: format!("chatcmpl-mock{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: request["model"].as_str().unwrap_or("mock").to_owned(),
            tokens,
            finish_reason: if tokens < chunks { "length" } else { "stop" },
            prompt_tokens: prompt_tokens(request),
            include_usage: request["stream_options"]["include_usage"] == true,
        }
    }

    fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.tokens.into())
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": self.total_tokens(),
        })
    }

    /// Token `i` of the answer.
    fn word(i: u32) -> String {
        let space = if i == 0 { "" } else { " " };
        format!("{space}{}", WORDS[i as usize % WORDS.len()])
    }

    fn full_response(&self) -> Value {
        let content: String = (0..self.tokens).map(Self::word).collect();
        let message = json!({"role": "assistant", "content": content});
        json!({
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model, "usage": self.usage(),
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}],
        })
    }

    /// A chunk; as OpenAI's, with `"usage": null` when the request asked for usage.
    fn chunk_with(&self, choices: Value) -> Value {
        let mut chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// Token `i` of the stream; the first also carries the role.
    fn chunk(&self, i: u32) -> Value {
        let delta = match i {
            0 => json!({"role": "assistant", "content": Self::word(i)}),
            _ => json!({"content": Self::word(i)}),
        };
        self.chunk_with(json!([{"index": 0, "delta": delta, "finish_reason": null}]))
    }

    fn finish_chunk(&self) -> Value {
        let choice = json!({"index": 0, "delta": {}, "finish_reason": self.finish_reason});
        self.chunk_with(json!([choice]))
    }

    /// The last chunk when the request asks for `stream_options.include_usage`.
    fn usage_chunk(&self) -> Value {
        let mut chunk = self.chunk_with(json!([]));
        chunk["usage"] = self.usage();
        chunk
    }
}

/// The prompt's tokens as the layer's estimator counts them. (A real upstream reports its
/// own tokenizer's count.)
fn prompt_tokens(request: &Value) -> u64 {
    let bytes = serde_json::to_vec(request).unwrap_or_default();
    OpenAiEstimator::new()
        .estimate_parts(&bytes)
        .map_or(0, |estimate| estimate.prompt_tokens)
}

fn sse(data: &Value) -> String {
    format!("data: {data}\n\n")
}

struct Options {
    addr: SocketAddr,
    cap: u64,
    chunks: u32,
    token_delay: Duration,
    upstream: Option<String>,
    upstream_key_env: Option<String>,
    upstream_timeout: Duration,
    upstream_http2: bool,
    redis: Option<RedisAt>,
    redis_down: String,
    redis_headroom: u8,
    upstream_cap: Option<u64>,
    wait: Option<Duration>,
    weights: HashMap<String, u32>,
    shadow: bool,
    adaptive: bool,
    calibrate: bool,
    ask_usage: bool,
    tpm: Option<u64>,
    tpd: Option<u64>,
    spend_per_day: Option<f64>,
    prices: Option<String>,
}

impl Options {
    /// `Ok(None)` for `--help`.
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Self>, String> {
        let mut options = Options {
            addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
            cap: 4096,
            chunks: 16,
            token_delay: Duration::from_millis(25),
            upstream: None,
            upstream_key_env: None,
            upstream_timeout: Duration::from_secs(600),
            upstream_http2: false,
            redis: None,
            redis_down: "closed".to_owned(),
            redis_headroom: 0,
            upstream_cap: None,
            wait: None,
            weights: HashMap::new(),
            shadow: false,
            adaptive: true,
            calibrate: true,
            ask_usage: true,
            tpm: None,
            tpd: None,
            spend_per_day: None,
            prices: None,
        };
        let (mut sentinels, mut sentinel_master) = (None, None);
        while let Some(flag) = args.next() {
            match flag.as_str() {
                "-h" | "--help" => return Ok(None),
                "--addr" => options.addr = value(&flag, &mut args)?,
                "--cap" => options.cap = value(&flag, &mut args)?,
                "--chunks" => options.chunks = value(&flag, &mut args)?,
                "--token-delay-ms" => {
                    options.token_delay = Duration::from_millis(value(&flag, &mut args)?);
                }
                "--upstream" => options.upstream = Some(value(&flag, &mut args)?),
                "--upstream-key-env" => options.upstream_key_env = Some(value(&flag, &mut args)?),
                "--upstream-timeout" => {
                    options.upstream_timeout = Duration::from_secs(value(&flag, &mut args)?);
                }
                "--upstream-http2" => options.upstream_http2 = true,
                "--redis" => options.redis = Some(RedisAt::Single(value(&flag, &mut args)?)),
                "--redis-cluster" => {
                    let nodes = list(&value::<String>(&flag, &mut args)?);
                    options.redis = Some(RedisAt::Cluster(nodes));
                }
                "--redis-sentinel" => sentinels = Some(list(&value::<String>(&flag, &mut args)?)),
                "--sentinel-master" => sentinel_master = Some(value(&flag, &mut args)?),
                "--redis-down" => options.redis_down = value(&flag, &mut args)?,
                "--redis-headroom" => match value(&flag, &mut args)? {
                    percent @ 0..=50 => options.redis_headroom = percent,
                    other => return Err(format!("--redis-headroom {other}: at most 50")),
                },
                "--upstream-cap" => options.upstream_cap = Some(value(&flag, &mut args)?),
                "--wait-ms" => {
                    options.wait = Some(Duration::from_millis(value(&flag, &mut args)?));
                }
                "--weight" => {
                    let pair: String = value(&flag, &mut args)?;
                    let (tenant, weight) = pair
                        .split_once('=')
                        .ok_or_else(|| format!("--weight {pair}: expected TENANT=WEIGHT"))?;
                    let weight = weight
                        .parse()
                        .map_err(|error| format!("--weight {pair}: {error}"))?;
                    options.weights.insert(tenant.to_owned(), weight);
                }
                "--shadow" => options.shadow = true,
                "--tpm" => options.tpm = Some(value(&flag, &mut args)?),
                "--tpd" => options.tpd = Some(value(&flag, &mut args)?),
                "--spend-per-day" => options.spend_per_day = Some(value(&flag, &mut args)?),
                "--prices" => options.prices = Some(value(&flag, &mut args)?),
                "--no-adaptive" => options.adaptive = false,
                "--no-calibrate" => options.calibrate = false,
                "--no-ask-usage" => options.ask_usage = false,
                _ => return Err(format!("unknown argument `{flag}`")),
            }
        }
        match (sentinels, sentinel_master) {
            (Some(sentinels), Some(master)) => {
                options.redis = Some(RedisAt::Sentinel { sentinels, master });
            }
            (None, None) => {}
            (Some(_), None) => return Err("--redis-sentinel needs --sentinel-master".into()),
            (None, Some(_)) => return Err("--sentinel-master needs --redis-sentinel".into()),
        }
        if options.spend_per_day.is_some() != options.prices.is_some() {
            return Err("--spend-per-day and --prices go together".into());
        }
        if options.upstream.is_none()
            && (options.upstream_key_env.is_some() || options.upstream_http2)
        {
            return Err("--upstream-key-env and --upstream-http2 need --upstream".into());
        }
        Ok(Some(options))
    }
}

/// The prices in `file`: a JSON object of model → `{"input", "cached_input", "output"}`
/// per million tokens, `"*"` for the models not listed.
fn prices(file: &str) -> Result<Prices, String> {
    let text = std::fs::read_to_string(file).map_err(|error| error.to_string())?;
    let table: HashMap<String, HashMap<String, f64>> =
        serde_json::from_str(&text).map_err(|error| error.to_string())?;
    let mut prices = Prices::new();
    for (model, price) in table {
        let known = ["input", "cached_input", "output"];
        if let Some(other) = price.keys().find(|key| !known.contains(&key.as_str())) {
            return Err(format!("{model}: unknown price `{other}`"));
        }
        let (Some(&input), Some(&output)) = (price.get("input"), price.get("output")) else {
            return Err(format!("{model}: needs \"input\" and \"output\""));
        };
        let cached = price.get("cached_input").copied().unwrap_or(input);
        let price = Price::per_million(input, cached, output)
            .ok_or_else(|| format!("{model}: prices must be finite and not negative"))?;
        prices = match model.as_str() {
            "*" => prices.with_default(price),
            _ => prices.with(model, price),
        };
    }
    Ok(prices)
}

/// `URL[,URL...]` as a list.
fn list(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The value after `flag`, parsed.
fn value<T>(flag: &str, args: &mut impl Iterator<Item = String>) -> Result<T, String>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
    value
        .parse()
        .map_err(|error| format!("invalid value `{value}` for {flag}: {error}"))
}
