//! A soak of the Redis path under faults, over real HTTP: two replicas (and a third in a
//! child process) share one real `redis-server` while clients stream and disconnect, and
//! Redis is flushed, then restarted empty, then the child replica is SIGKILLed. The work
//! running never exceeds a tenant's cap outside the documented re-registration window
//! after each fault, and when everything ends no token and no key is left.
//!
//! One of the two replicas admits from headroom it holds in Redis (`local_headroom`), the
//! other asks Redis for every request. Three tenants are kept at their caps (where a
//! headroom gives back what it does not use); the fourth has room to spare (where most of
//! its requests on that replica are drawn from headroom).
//!
//! `TTT_REDIS_SOAK_SECS` sets the length (default 20 s, as in CI).
#![cfg(feature = "redis")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use common::redis_server::RedisServer;
use common::*;
use futures_util::StreamExt;
use http::StatusCode;
use tower_tenant_tokens::redis::{RedisTokenTracker, RedisTokenTrackerBuilder};
use tower_tenant_tokens::TenantTokenLayer;

const TENANTS: [&str; 4] = ["t0", "t1", "t2", "t3"];
const CAP: u64 = 1_000;
/// The last tenant's cap: room to spare, where the others are kept at their caps.
const ROOMY_CAP: u64 = 4 * CAP;

fn cap_of(tenant: &str) -> u64 {
    if tenant == TENANTS[3] {
        ROOMY_CAP
    } else {
        CAP
    }
}
const CHILD_HOLDS: u64 = 200;
const RENEW: Duration = Duration::from_millis(250);
const TTL: Duration = Duration::from_millis(1_000);
/// The longest a stream runs: five chunks at most this far apart.
const CHUNK_MAX_MS: u64 = 60;

fn builder() -> RedisTokenTrackerBuilder {
    RedisTokenTracker::builder(CAP)
        .cap_fn(|tenant| Some(cap_of(tenant)))
        .lease_ttl(TTL)
        .renew_every(RENEW)
        .call_timeout(Duration::from_millis(250))
        .circuit_breaker(2, Duration::from_millis(200))
}

/// The work running, per tenant, as the replicas' handlers see it: counted from the moment
/// a handler starts (after its reservation) until its stream ends or is dropped (before
/// its release), so it never counts more than was reserved.
type Running = Arc<[AtomicU64; 4]>;

/// Takes a handler's tokens off [`Running`] once, when its stream ends or is dropped.
struct Counted {
    running: Running,
    tenant: usize,
    tokens: u64,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.running[self.tenant].fetch_sub(self.tokens, SeqCst);
    }
}

/// A replica admitting from `headroom` % of each cap held ahead (0: none), and its tracker:
/// `/stream` streams five chunks, `x-chunk-ms` apart.
async fn replica(url: &str, running: Running, headroom: u8) -> (TestServer, RedisTokenTracker) {
    let tracker = builder()
        .local_headroom(headroom)
        .connect(url)
        .expect("a redis url");
    let app = Router::new()
        .route(
            "/stream",
            post(move |headers: http::HeaderMap| {
                let running = running.clone();
                async move {
                    let text = |name: &str| headers[name].to_str().unwrap().to_owned();
                    let ms: u64 = text("x-chunk-ms").parse().unwrap();
                    let tokens: u64 = text("x-token-estimate").parse().unwrap();
                    let tenant = TENANTS
                        .iter()
                        .position(|t| *t == text("x-tenant-id"))
                        .unwrap();
                    running[tenant].fetch_add(tokens, SeqCst);
                    let mut counted = Some(Counted {
                        running,
                        tenant,
                        tokens,
                    });
                    let chunks = futures_util::stream::iter(0..5).then(move |i| {
                        // The last chunk ends the work: off the count before it is sent.
                        let done = (i == 4).then(|| counted.take());
                        async move {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            drop(done);
                            Ok::<_, std::convert::Infallible>(format!("data: {i}\n\n"))
                        }
                    });
                    Body::from_stream(chunks)
                }
            }),
        )
        .layer(TenantTokenLayer::new(tracker.clone()));
    (serve(app).await, tracker)
}

#[tokio::test]
#[ignore = "run as a child process by the soak"]
async fn child_replica_for_the_soak() {
    let Ok(url) = std::env::var("TTT_CHILD_REDIS_URL") else {
        return;
    };
    let tracker = builder().connect(url).expect("url");
    let reservation = tracker.reserve("t0", CHILD_HOLDS).await.expect("admitted");
    println!("HELD {}", reservation.lease_id().unwrap());
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop(reservation);
}

/// The child replica, SIGKILLed and reaped when the test is done with it (or fails).
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A small deterministic generator, so a failing run can be replayed.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_hold_the_cap_through_a_flush_a_restart_and_a_killed_replica() {
    let Some(mut redis) = RedisServer::start("redis_soak") else {
        return;
    };
    let secs: u64 = std::env::var("TTT_REDIS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let run = Duration::from_secs(secs);
    let url = redis.url();
    let running: Running = Arc::new(Default::default());
    // One replica asks Redis for every request, the other admits from headroom (a step
    // larger than any request here).
    let (first, _) = replica(&url, running.clone(), 0).await;
    let (second, with_headroom) = replica(&url, running.clone(), 40).await;
    let replicas = Arc::new([first, second]);
    let observer = builder().connect(url.as_str()).expect("url");

    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["child_replica_for_the_soak", "--exact", "--ignored"])
        .args(["--nocapture", "--test-threads", "1"])
        .env("TTT_CHILD_REDIS_URL", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the child replica");
    let mut child = KillOnDrop(child);
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    while !lines.next().unwrap().unwrap().contains("HELD ") {}

    let counts = Arc::new(Mutex::new([0_u64; 3])); // admitted, refused, unavailable
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let clients: Vec<_> = (0..24)
        .map(|n| {
            let (replicas, counts, stop) = (replicas.clone(), counts.clone(), stop.clone());
            tokio::spawn(async move {
                let client = pooled_client();
                let mut dice = Dice(0x9E37_79B9_7F4A_7C15 ^ (n + 1));
                while !stop.load(SeqCst) {
                    let tenant = dice.roll(4) as usize;
                    let tokens = 100 + dice.roll(300);
                    let server = &replicas[dice.roll(2) as usize];
                    let mut request = metered(server, "/stream", TENANTS[tenant], tokens);
                    // A few clients keep streams going for seconds: they outlive a fault's
                    // window, and stay counted only if lost leases are registered again.
                    let ms = match n % 6 {
                        0 => 400 + dice.roll(200),
                        _ => 5 + dice.roll(CHUNK_MAX_MS - 5),
                    };
                    request
                        .headers_mut()
                        .insert("x-chunk-ms", ms.to_string().parse().unwrap());
                    let Ok(response) = client.request(request).await else {
                        continue;
                    };
                    match response.status() {
                        StatusCode::OK => {
                            counts.lock().unwrap()[0] += 1;
                            let mut body = response.into_body();
                            // One in five clients goes away after the first chunk.
                            let chunks = if dice.roll(5) == 0 { 1 } else { usize::MAX };
                            for _ in 0..chunks {
                                if next_data(&mut body).await.is_none() {
                                    break;
                                }
                            }
                            drop(body);
                        }
                        StatusCode::TOO_MANY_REQUESTS | StatusCode::PAYLOAD_TOO_LARGE => {
                            counts.lock().unwrap()[1] += 1;
                            drop(read(response).await);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        StatusCode::SERVICE_UNAVAILABLE => {
                            counts.lock().unwrap()[2] += 1;
                            drop(read(response).await);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        other => panic!("unexpected {other}"),
                    }
                }
            })
        })
        .collect();

    // Faults at a quarter, half and three quarters of the run; each opens a window of one
    // renewal period plus the longest stream (and the restart's downtime) in which the
    // work running may exceed a cap while lost leases are registered again.
    let windows = Arc::new(Mutex::new(Vec::<(Instant, Instant)>::new()));
    let slack = RENEW + Duration::from_millis(5 * CHUNK_MAX_MS + 300);
    let (mut over_outside, mut over_inside, mut samples) = (Vec::new(), 0, 0);
    let mut faults = 0;
    while started.elapsed() < run {
        let elapsed = started.elapsed();
        if faults == 0 && elapsed >= run / 4 {
            assert_eq!(redis.command("FLUSHALL").trim(), "+OK");
            windows
                .lock()
                .unwrap()
                .push((Instant::now(), Instant::now() + slack));
            faults += 1;
        } else if faults == 1 && elapsed >= run / 2 {
            let at = Instant::now();
            redis.restart();
            windows.lock().unwrap().push((at, Instant::now() + slack));
            faults += 1;
        } else if faults == 2 && elapsed >= run * 3 / 4 {
            child.kill();
            faults += 1;
        }
        let now = Instant::now();
        let in_window = windows
            .lock()
            .unwrap()
            .iter()
            .any(|(a, b)| *a <= now && now <= *b);
        for (tenant, held) in running.iter().enumerate() {
            samples += 1;
            let held = held.load(SeqCst);
            if held > cap_of(TENANTS[tenant]) {
                if in_window {
                    over_inside += 1;
                } else {
                    over_outside.push((TENANTS[tenant], held, started.elapsed()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, SeqCst);
    for client in clients {
        within("a client to stop", client).await.unwrap();
    }
    // A stream whose client hung up ends once its server notices the connection gone.
    wait_until("every handler's work to end", || {
        running.iter().all(|held| held.load(SeqCst) == 0)
    })
    .await;

    // Everything ended: every count back to 0 (the killed child's lease within its TTL),
    // and no key left once the tenants' idle hashes have expired (two TTLs after their last
    // lease at most).
    for tenant in TENANTS {
        let deadline = Instant::now() + TTL + Duration::from_secs(3);
        loop {
            match observer.in_flight(tenant).await {
                Ok(0) => break,
                other => assert!(Instant::now() < deadline, "{tenant} still counts {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let deadline = Instant::now() + 2 * TTL + Duration::from_secs(3);
    while redis.command("DBSIZE").trim() != ":0" {
        assert!(
            Instant::now() < deadline,
            "keys left: {}",
            redis.command("DBSIZE")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let [admitted, refused, unavailable] = *counts.lock().unwrap();
    let from_headroom = with_headroom.stats().admitted_locally;
    eprintln!(
        "redis soak, {secs} s: {admitted} admitted ({from_headroom} from headroom), {refused} \
         refused, {unavailable} unavailable; {samples} samples, {over_inside} over a cap \
         inside a fault's window, {} outside",
        over_outside.len()
    );
    assert!(admitted > 100, "too little traffic to judge: {admitted}");
    assert!(from_headroom > 0, "the headroom was never drawn from");
    assert!(
        over_outside.is_empty(),
        "over a cap outside the windows: {over_outside:?}"
    );
}
