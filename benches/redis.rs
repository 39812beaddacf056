//! Two replicas sharing one Redis: admitted requests per second and the latency the layer
//! adds, next to peers measured in the same run on the same server.
//!
//! `cargo bench --features redis --bench redis` starts its own `redis-server` on a free
//! loopback port (install it first: `apt-get install -y redis-server`) and runs bounded
//! load rounds of `REDIS_BENCH_SECS` seconds (default 5) each:
//!
//! - `layer`: requests through two `TenantTokenLayer` services on a Redis tracker (one per replica,
//!   each its own connection) in front of an instant `service_fn`; a request's time runs
//!   from `call` to the end of its response body, so it is the latency the layer adds.
//!   Releases are the layer's own (a spawned task when the body ends).
//! - `layer with headroom`: the same, each replica admitting from headroom it holds in
//!   Redis (`local_headroom`, a tenth of each cap), so most requests make no round trip.
//!   The caps here are far above what the requests use, where headroom helps most; near a
//!   cap, requests ask Redis one by one as in `layer`.
//! - `layer near the cap` and `layer with headroom near the cap`: the same two on
//!   `NEAR_TENANTS` tenants, each request held `NEAR_HOLD` by the inner service, so the
//!   requests in flight pass the tenants' caps: part of them are refused (429, the
//!   `refused` column), and the headrooms are mostly giving back what they do not use.
//!   What counts there is `admitted/s`, which early refusals lower.
//! - `tracker`: `RedisTokenTracker::reserve` then `release().await`, timed per reserve.
//! - `naive INCRBY/DECRBY`: the counter design this crate replaces (increment, check,
//!   decrement on refusal or release; no leases, so a crash leaks): two round trips.
//! - `PING`: one round trip, the floor of anything that asks Redis.
//!
//! Every variant runs `WORKERS` concurrent requests per replica; but for those near the
//! cap, over 64 tenants with caps no request reaches, so every request is admitted unless
//! the pair is overloaded: then
//! the layer answers 503 (the tracker fails closed once a call passes its timeout) and the
//! bench counts those (`503` column) instead of stopping, and says where the pair
//! saturates.
//! These closed-loop rounds give the most requests per second the pair sustains; at that
//! rate requests mostly wait in queues, so their latency is Little's law, not the layer.
//! Last, the `layer` requests (per request, then with headroom) and then `PING`s are sent
//! open-loop at a fixed
//! `REDIS_BENCH_RATE` per second for the pair (default 20,000), which gives the latency the
//! layer adds at that load next to the bare round trip's at the same load (the machine's
//! own tail). `REDIS_BENCH_WORKERS` sets the runtime's worker threads (default 1, leaving
//! the other core to Redis, as a gateway and its Redis would not share cores in
//! production; 2 shows the cost of oversubscribing). `REDIS_BENCH_CLOSED_ROUNDS` sets how
//! many times the closed-loop rounds run (default 2; 0 runs the open loop alone). Each
//! round prints the share of the machine's CPU time its hypervisor took meanwhile (the
//! `stolen` column, Linux's steal time): a round the host starved tells little of the
//! layer, and its tail least of all.

#[path = "../tests/common/redis_server.rs"]
#[allow(dead_code)] // the tests' helper; the bench needs only part of it
mod redis_server;
#[path = "common/steal.rs"]
mod steal;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use redis::aio::ConnectionManager;
use redis_server::RedisServer;
use steal::CpuTimes;
use tower::{Layer, Service, ServiceExt};
use tower_tenant_tokens::body::RequestBody;
use tower_tenant_tokens::redis::RedisTokenTracker;
use tower_tenant_tokens::TenantTokenLayer;

const WORKERS: usize = 32;
const TENANTS: usize = 64;
const CAP: u64 = 1 << 40;
/// Short, so that releases an overloaded Redis missed expire before the next round.
const LEASE_TTL: Duration = Duration::from_secs(3);
/// The share of each tenant's cap a replica holds as headroom, in the variant that does.
const HEADROOM: u8 = 10;
const LAYER: &str = "layer (reserve, call, release)";
const HEADROOM_LAYER: &str = "layer with headroom (same)";
/// Near the cap: every request on a few tenants, whose caps the requests in flight pass.
const NEAR_TENANTS: usize = 4;
const NEAR_CAP: u64 = 1_500;
/// How long the upstream holds a request near the cap: 16 requests of 100 tokens per
/// tenant in flight pass its cap.
const NEAR_HOLD: Duration = Duration::from_millis(2);

struct Round {
    name: String,
    requests: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// Requests refused (429, 413) and unanswered (503, or Redis's error), of `requests`.
    refused: usize,
    unavailable: usize,
    /// The share of the machine's CPU time its hypervisor gave to others during the round
    /// (Linux's steal time), when known: a round the host starved says little of the layer.
    stolen: Option<f64>,
}

/// How one request ended: under overload the layer answers 503 (fail closed) or 429, and
/// the bench counts those rather than stopping.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Admitted,
    Refused,
    Unavailable,
}

impl Round {
    fn count(
        name: String,
        elapsed: Duration,
        timed: Vec<(Duration, Outcome)>,
        stolen: Option<f64>,
    ) -> Self {
        let count = |outcome| timed.iter().filter(|(_, o)| *o == outcome).count();
        let (refused, unavailable) = (count(Outcome::Refused), count(Outcome::Unavailable));
        Round {
            name,
            requests: timed.len(),
            elapsed,
            latencies: timed.into_iter().map(|(latency, _)| latency).collect(),
            refused,
            unavailable,
            stolen,
        }
    }
}

impl Round {
    fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[index]
    }
}

/// Runs `WORKERS` loops per replica of `request(replica, worker, i)` for `secs`, each
/// request timed.
async fn round<F, Fut>(name: &str, secs: u64, request: F) -> Round
where
    F: Fn(usize, usize, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    let cpu = CpuTimes::now();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for replica in 0..2 {
        for worker in 0..WORKERS {
            let request = request.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut i = 0;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let outcome = request(replica, worker, i).await;
                    latencies.push((t.elapsed(), outcome));
                    i += 1;
                    // A request answered without waiting (from headroom) would otherwise
                    // keep the worker from every other task, Redis's replies included.
                    tokio::task::consume_budget().await;
                }
                latencies
            }));
        }
    }
    let mut timed = Vec::new();
    for task in tasks {
        timed.extend(task.await.expect("worker"));
    }
    Round::count(name.to_owned(), started.elapsed(), timed, cpu.stolen())
}

/// `request(i)` sent at `rate` per second, each started when due by a pacing thread
/// (sleeping between sends, so it takes no core). Timed from when each was sent, and from
/// when it was due (adding the pacing thread's own lateness on a busy machine); the rate
/// achieved is printed.
async fn paced<F, Fut>(name: &str, rate: u64, secs: u64, request: F) -> [Round; 2]
where
    F: Fn(usize) -> Fut + Send + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    let cpu = CpuTimes::now();
    let sender = std::thread::spawn(move || {
        let period = Duration::from_secs(1) / rate.max(1) as u32;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0.. {
            let due = started + period * i as u32;
            if due - started >= Duration::from_secs(secs) {
                break;
            }
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (work, sent) = (request(i), Instant::now());
            tasks.push(runtime.spawn(async move {
                let outcome = work.await;
                (sent.elapsed(), due.elapsed(), outcome)
            }));
        }
        (tasks, started.elapsed())
    });
    let (tasks, elapsed) = tokio::task::spawn_blocking(move || sender.join().expect("sender"))
        .await
        .expect("join");
    let (mut from_sent, mut from_due) = (Vec::new(), Vec::new());
    for task in tasks {
        let (sent, due, outcome) = task.await.expect("request");
        from_sent.push((sent, outcome));
        from_due.push((due, outcome));
    }
    let stolen = cpu.stolen();
    [
        Round::count(
            format!("{name}, open loop, from send"),
            elapsed,
            from_sent,
            stolen,
        ),
        Round::count(
            format!("{name}, open loop, from due"),
            elapsed,
            from_due,
            stolen,
        ),
    ]
}

/// One request through a layered service, its response body read to the end (where the
/// layer releases the reservation).
async fn through_layer<S>(service: S, tenant: String) -> Outcome
where
    S: Service<
        Request<Empty<Bytes>>,
        Response = Response<tower_tenant_tokens::body::ResponseBody<Empty<Bytes>>>,
    >,
    S::Error: std::fmt::Debug,
{
    let request = Request::post("/v1/chat/completions")
        .header("x-tenant-id", tenant)
        .header("x-token-estimate", "100")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = service.oneshot(request).await.expect("infallible");
    let outcome = match response.status() {
        status if status.is_success() => Outcome::Admitted,
        http::StatusCode::SERVICE_UNAVAILABLE => Outcome::Unavailable,
        _ => Outcome::Refused,
    };
    response.into_body().collect().await.expect("body");
    outcome
}

fn tenant(worker: usize, i: usize) -> String {
    format!("tenant-{}", (worker * 7 + i) % TENANTS)
}

async fn answer(
    _: Request<RequestBody<Empty<Bytes>>>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    Ok(Response::new(Empty::new()))
}

/// Answers after `NEAR_HOLD`, so that requests near the cap overlap (answered at once
/// from headroom, they would not).
async fn answer_after_hold(
    request: Request<RequestBody<Empty<Bytes>>>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    tokio::time::sleep(NEAR_HOLD).await;
    answer(request).await
}

fn main() {
    let secs: u64 = env_or("REDIS_BENCH_SECS", 5);
    let Some(redis) = RedisServer::start("benches/redis.rs") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env_or("REDIS_BENCH_WORKERS", 1))
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(&redis, secs));
}

async fn run(redis: &RedisServer, secs: u64) {
    let trackers: Arc<[RedisTokenTracker; 2]> = Arc::new([0, 1].map(|_| {
        RedisTokenTracker::builder(CAP)
            .lease_ttl(LEASE_TTL)
            .connect(redis.url())
            .expect("url")
    }));
    // The same layer, each replica admitting from headroom it holds in Redis (its own
    // keys, so the two layers' rounds do not meet in Redis).
    let with_headroom: Arc<[RedisTokenTracker; 2]> = Arc::new([0, 1].map(|_| {
        RedisTokenTracker::builder(CAP)
            .lease_ttl(LEASE_TTL)
            .renew_every(LEASE_TTL / 3)
            .local_headroom(HEADROOM)
            .key_prefix("headroom:")
            .connect(redis.url())
            .expect("url")
    }));
    let layered = |trackers: &[RedisTokenTracker; 2]| -> Arc<Vec<_>> {
        let layer = |tracker: &RedisTokenTracker| {
            TenantTokenLayer::new(tracker.clone()).layer(tower::service_fn(answer))
        };
        Arc::new(trackers.iter().map(layer).collect())
    };
    let services = layered(&trackers);
    let headroom_services = layered(&with_headroom);
    // Near the cap, each on its own keys: per request, and with headroom.
    let near_cap = |headroom: u8| -> Arc<Vec<_>> {
        let layer = |_| {
            let tracker = RedisTokenTracker::builder(NEAR_CAP)
                .lease_ttl(LEASE_TTL)
                .renew_every(LEASE_TTL / 3)
                .local_headroom(headroom)
                .key_prefix(format!("near-{headroom}:"))
                .connect(redis.url())
                .expect("url");
            TenantTokenLayer::new(tracker).layer(tower::service_fn(answer_after_hold))
        };
        Arc::new((0..2).map(layer).collect())
    };
    let near = [
        ("layer near the cap", near_cap(0)),
        ("layer with headroom near the cap", near_cap(HEADROOM)),
    ];
    let conns: Arc<Vec<ConnectionManager>> =
        Arc::new(vec![connection(redis).await, connection(redis).await]);

    let mut rounds = Vec::new();
    // Interleaved twice, so a slow spell of the machine does not land on one variant only.
    let closed_rounds: usize = env_or("REDIS_BENCH_CLOSED_ROUNDS", 2);
    for _ in 0..closed_rounds {
        let s = services.clone();
        rounds.push(
            round(LAYER, secs, move |replica, worker, i| {
                through_layer(s[replica].clone(), tenant(worker, i))
            })
            .await,
        );
        let s = headroom_services.clone();
        rounds.push(
            round(HEADROOM_LAYER, secs, move |replica, worker, i| {
                through_layer(s[replica].clone(), tenant(worker, i))
            })
            .await,
        );
        for (name, services) in &near {
            let s = services.clone();
            rounds.push(
                round(name, secs, move |replica, worker, i| {
                    let tenant = format!("near-{}", (worker + i) % NEAR_TENANTS);
                    through_layer(s[replica].clone(), tenant)
                })
                .await,
            );
        }
        let t = trackers.clone();
        rounds.push(
            round(
                "tracker (reserve; release awaited)",
                secs,
                move |replica, worker, i| {
                    let tracker = t[replica].clone();
                    async move {
                        match tracker.reserve(&tenant(worker, i), 100).await {
                            Ok(reservation) if reservation.is_shared() => {
                                reservation.release().await;
                                Outcome::Admitted
                            }
                            Ok(_) | Err(tower_tenant_tokens::Error::BackendUnavailable { .. }) => {
                                Outcome::Unavailable
                            }
                            Err(_) => Outcome::Refused,
                        }
                    }
                },
            )
            .await,
        );
        let c = conns.clone();
        rounds.push(
            round("naive INCRBY/DECRBY", secs, move |replica, worker, i| {
                let mut conn = c[replica].clone();
                async move {
                    let key = format!("naive:{}", tenant(worker, i));
                    let held: Result<u64, _> = redis::cmd("INCRBY")
                        .arg(&key)
                        .arg(100)
                        .query_async(&mut conn)
                        .await;
                    let Ok(held) = held else {
                        return Outcome::Unavailable;
                    };
                    assert!(held <= CAP);
                    let released: Result<i64, _> = redis::cmd("DECRBY")
                        .arg(&key)
                        .arg(100)
                        .query_async(&mut conn)
                        .await;
                    match released {
                        Ok(_) => Outcome::Admitted,
                        Err(_) => Outcome::Unavailable,
                    }
                }
            })
            .await,
        );
        let c = conns.clone();
        rounds.push(round("PING", secs, move |replica, _, _| ping(c[replica].clone())).await);
    }
    let rate: u64 = env_or("REDIS_BENCH_RATE", 20_000);
    let open_loops = [
        ("layer", &services),
        ("layer with headroom", &headroom_services),
    ];
    for (name, services) in open_loops {
        settle(&trackers).await;
        settle(&with_headroom).await;
        let s = Arc::clone(services);
        rounds.extend(
            paced(name, rate, secs, move |i| {
                through_layer(s[i % 2].clone(), tenant(i, i / 2))
            })
            .await,
        );
    }
    settle(&with_headroom).await;
    let c = conns.clone();
    rounds.extend(paced("PING", rate, secs, move |i| ping(c[i % 2].clone())).await);

    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    println!(
        "\ntwo replicas, {WORKERS} concurrent requests each (closed loop), {secs} s per round, \
         {closed_rounds} rounds each; then open loop at {rate} requests/s; {workers} runtime worker(s)"
    );
    println!(
        "{:<40} {:>12} {:>12} {:>10} {:>10} {:>10} {:>9} {:>9} {:>8}",
        "variant",
        "requests/s",
        "admitted/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "refused",
        "503",
        "stolen"
    );
    let mut saturates = None;
    let (mut ratios, mut versus_naive) = (Vec::new(), Vec::new());
    for mut r in rounds {
        match r.name.as_str() {
            LAYER | HEADROOM_LAYER => ratios.push((r.name.clone(), r.per_second())),
            "naive INCRBY/DECRBY" => {
                for (name, per_second) in std::mem::take(&mut ratios) {
                    let ratio = per_second / r.per_second();
                    versus_naive.push(format!("{name:<40} {ratio:>12.2} × naive in its round"));
                }
            }
            _ => {}
        }
        let (p50, p99, p999) = (r.percentile(0.5), r.percentile(0.99), r.percentile(0.999));
        if r.name == LAYER {
            saturates = Some(saturates.unwrap_or(0.0_f64).max(r.per_second()));
        }
        let stolen = r
            .stolen
            .map_or("-".to_owned(), |share| format!("{:.1}%", share * 100.0));
        let admitted = (r.requests - r.refused - r.unavailable) as f64;
        println!(
            "{:<40} {:>12.0} {:>12.0} {:>10} {:>10} {:>10} {:>9} {:>9} {:>8}",
            r.name,
            r.per_second(),
            admitted / r.elapsed.as_secs_f64(),
            p50.as_micros(),
            p99.as_micros(),
            p999.as_micros(),
            r.refused,
            r.unavailable,
            stolen,
        );
    }
    println!();
    for line in versus_naive {
        println!("{line}");
    }
    if let Some(most) = saturates {
        println!("\nthe pair saturates near {most:.0} requests/s through the layer (closed loop)");
        if rate as f64 > most {
            println!(
                "the open-loop rate {rate}/s is above that: its latencies are queueing, and \
                 requests past the call timeout are answered 503 (counted above)"
            );
        }
    }
    for (name, trackers) in [
        ("layer", &trackers),
        ("layer with headroom", &with_headroom),
    ] {
        let stats = trackers[0].stats();
        println!(
            "{name}, replica 0: admitted {} by redis and {} from headroom, refused {}, \
             unavailable {}, failed releases {}",
            stats.admitted,
            stats.admitted_locally,
            stats.refused,
            stats.unavailable,
            stats.failed_releases
        );
    }
}

/// One round trip.
async fn ping(mut conn: ConnectionManager) -> Outcome {
    let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
    match pong {
        Ok(_) => Outcome::Admitted,
        Err(_) => Outcome::Unavailable,
    }
}

/// The number in environment variable `name`, or `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

async fn connection(redis: &RedisServer) -> ConnectionManager {
    let client = redis::Client::open(redis.url()).expect("url");
    ConnectionManager::new(client).await.expect("connect")
}

/// Every release (spawned when a body ends) has landed, or its lease has expired: no
/// backlog left for the next round. Overloaded, Redis may miss releases (counted as failed
/// releases); their leases expire after `LEASE_TTL`.
async fn settle(trackers: &[RedisTokenTracker; 2]) {
    let deadline = Instant::now() + LEASE_TTL + Duration::from_secs(5);
    for tenant in (0..TENANTS).map(|t| format!("tenant-{t}")) {
        loop {
            match trackers[0].in_flight(&tenant).await {
                Ok(0) => break,
                _ if Instant::now() >= deadline => {
                    println!("note: {tenant} still holds tokens after the leases' TTL");
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}
