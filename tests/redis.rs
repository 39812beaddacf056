//! The Redis ledger against a real `redis-server` on a free loopback port (no mocks):
//! replicas sharing one cap, a replica killed while holding leases, Redis killed and
//! restarted under each failure policy, `SCRIPT FLUSH` mid-run, streams outliving several
//! lease TTLs, and what a timed-out reservation leaves behind.
//!
//! Each test starts its own server. Without `redis-server` installed, each says loudly
//! that it was skipped, and fails instead when `CI=true`.
#![cfg(feature = "redis")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::{Extension, Router};
use common::redis_server::RedisServer;
use common::*;
use http::StatusCode;
use tower::{Layer, ServiceExt};
use tower_tenant_tokens::body::RequestBody;
use tower_tenant_tokens::redis::{
    FailurePolicy, RedisReservation, RedisTokenTracker, RedisTokenTrackerBuilder,
};
use tower_tenant_tokens::{
    Error, OpenAiEstimator, ReservationHandle, ShadowMode, SharedBudget, TenantTokenLayer,
};

/// Starts this test's server, or returns from the test where none is installed.
macro_rules! redis_or_skip {
    ($test:literal) => {
        match RedisServer::start($test) {
            Some(server) => server,
            None => return,
        }
    };
}

/// Test-sized leases: short enough that expiry is quick to watch.
fn builder(cap: u64) -> RedisTokenTrackerBuilder {
    RedisTokenTracker::builder(cap)
        .lease_ttl(Duration::from_millis(1_000))
        .renew_every(Duration::from_millis(250))
        .call_timeout(Duration::from_millis(250))
        .circuit_breaker(2, Duration::from_millis(200))
}

fn connect(builder: RedisTokenTrackerBuilder, redis: &RedisServer) -> RedisTokenTracker {
    builder.connect(redis.url()).expect("a valid redis url")
}

async fn in_flight(tracker: &RedisTokenTracker, tenant: &str) -> u64 {
    tracker.in_flight(tenant).await.expect("redis answers")
}

/// Polls the shared count until it equals `expected`, within `limit`.
async fn wait_for_shared(
    tracker: &RedisTokenTracker,
    tenant: &str,
    expected: u64,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let now = tracker.in_flight(tenant).await.ok();
        if now == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "in_flight({tenant:?}) is {now:?}, expected {expected} within {limit:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_exceed_the_shared_cap() {
    let redis = redis_or_skip!("two_replicas_never_exceed_the_shared_cap");
    const CAP: u64 = 1_000;
    let replicas = [connect(builder(CAP), &redis), connect(builder(CAP), &redis)];
    // What the workers hold, counted after admission and before release: never more than
    // Redis counts, so it must never pass the cap either.
    let held = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..64u64 {
        let tracker = replicas[worker as usize % 2].clone();
        let (held, peak, refused) = (held.clone(), peak.clone(), refused.clone());
        workers.push(tokio::spawn(async move {
            for round in 0..40u64 {
                let tokens = 50 + (worker * 37 + round * 91) % 350;
                match tracker.reserve("acme", tokens).await {
                    Ok(reservation) => {
                        assert!(reservation.is_shared());
                        let now = held.fetch_add(tokens, SeqCst) + tokens;
                        peak.fetch_max(now, SeqCst);
                        tokio::time::sleep(Duration::from_micros(200 * (round % 5))).await;
                        held.fetch_sub(tokens, SeqCst);
                        if round % 2 == 0 {
                            reservation.release().await;
                        } // else dropped: released by a spawned task
                    }
                    Err(Error::TenantOverloaded { in_flight, cap, .. }) => {
                        assert_eq!(cap, CAP);
                        assert!(in_flight + tokens > CAP, "refused though it fit");
                        refused.fetch_add(1, SeqCst);
                    }
                    Err(other) => panic!("unexpected refusal: {other}"),
                }
            }
        }));
    }
    // Redis's own count, sampled while they run.
    let sampler = {
        let tracker = replicas[0].clone();
        tokio::spawn(async move {
            let mut max = 0;
            for _ in 0..200 {
                let now = tracker.in_flight("acme").await.expect("redis answers");
                assert!(
                    now <= CAP,
                    "redis counts {now} in flight over the cap {CAP}"
                );
                max = max.max(now);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            max
        })
    };
    for worker in workers {
        worker.await.expect("worker");
    }
    let sampled = sampler.await.expect("sampler");
    let peak = peak.load(SeqCst);
    assert!(
        peak <= CAP,
        "workers held {peak} at once over the cap {CAP}"
    );
    assert!(peak > CAP / 2, "the cap was never approached (peak {peak})");
    assert!(
        refused.load(SeqCst) > 0,
        "nothing was refused: not a test of the cap"
    );
    assert!(sampled > 0);
    wait_for_shared(&replicas[1], "acme", 0, WAIT).await;
    let stats = replicas[0].stats();
    assert_eq!(
        (stats.unavailable, stats.failed_releases, stats.lost_leases),
        (0, 0, 0)
    );
    wait_until("no live leases", || {
        replicas.iter().all(|replica| replica.live_leases() == 0)
    })
    .await;
    // Nothing left behind but the tenant's idle hash, which expires.
    assert_eq!(redis.leftover_keys(), 0);
}

/// An app on `tracker` whose `/stream` handler streams a body the test drives (after
/// resizing its reservation to `x-used`, if sent), and whose `/usage` handler grows or
/// shrinks its reservation to `x-used` within the cap.
async fn replica_server(tracker: &RedisTokenTracker) -> (TestServer, Streams) {
    replica_server_with(tracker, |layer| layer).await
}

/// [`replica_server`] with its layer adjusted by `adjust`.
async fn replica_server_with(
    tracker: &RedisTokenTracker,
    adjust: impl FnOnce(TenantTokenLayer) -> TenantTokenLayer,
) -> (TestServer, Streams) {
    let (source, streams) = streams();
    let app = Router::new()
        .route(
            "/stream",
            post(
                move |Extension(handle): Extension<ReservationHandle>, headers: http::HeaderMap| {
                    // Reconciled before streaming when the test says what was "used".
                    if let Some(used) = headers.get("x-used") {
                        handle.resize(used.to_str().unwrap().parse().unwrap());
                    }
                    let source = source.clone();
                    async move { source.body() }
                },
            ),
        )
        .route(
            "/usage",
            post(
                |Extension(handle): Extension<ReservationHandle>, headers: http::HeaderMap| async move {
                    let used: u64 = headers["x-used"].to_str().unwrap().parse().unwrap();
                    let grown = handle.try_resize_async(used).await;
                    grown.map_or_else(|e| e.code().to_owned(), |()| "ok".to_owned())
                },
            ),
        )
        .layer(adjust(
            TenantTokenLayer::new(tracker.clone())
                .reservation_handle(true)
                .openai_ratelimit_headers(true),
        ));
    (serve(app).await, streams)
}

#[tokio::test]
async fn a_request_waiting_on_one_replica_gets_in_when_another_replica_releases() {
    let redis =
        redis_or_skip!("a_request_waiting_on_one_replica_gets_in_when_another_replica_releases");
    let (first, second) = (
        connect(builder(1_000), &redis),
        connect(builder(1_000), &redis),
    );
    let wait = |layer: TenantTokenLayer| layer.wait_for_capacity(Duration::from_secs(10));
    let (one, mut one_streams) = replica_server_with(&first, wait).await;
    let (two, mut two_streams) = replica_server_with(&second, wait).await;
    let client = client();

    let holding = send(&client, metered(&one, "/stream", "acme", 800)).await;
    assert_eq!(holding.status(), StatusCode::OK);
    let chunks = one_streams.next().await;

    // Over the shared cap on the other replica: it waits, holding nothing.
    let waiting = tokio::spawn({
        let (client, request) = (client.clone(), metered(&two, "/stream", "acme", 500));
        async move { send(&client, request).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "it fits only once the first stream ends"
    );
    assert_eq!(
        in_flight(&second, "acme").await,
        800,
        "waiting reserves nothing"
    );

    // A cancelled wait leaves nothing behind either.
    let cancelled = tokio::spawn({
        let (client, request) = (client.clone(), metered(&two, "/stream", "acme", 300));
        async move { send(&client, request).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    cancelled.abort();

    // The first replica's stream ends; the second replica's request gets in.
    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    let admitted = within("the waiting request", waiting).await.unwrap();
    assert_eq!(admitted.status(), StatusCode::OK);
    assert_eq!(in_flight(&first, "acme").await, 500);
    drop(two_streams.next().await);
    assert_eq!(read(admitted).await.status, StatusCode::OK);
    wait_for_shared(&first, "acme", 0, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn replicas_behind_the_layer_share_one_cap_over_http() {
    let redis = redis_or_skip!("replicas_behind_the_layer_share_one_cap_over_http");
    let (first, second) = (
        connect(builder(1_000), &redis),
        connect(builder(1_000), &redis),
    );
    let (one, mut one_streams) = replica_server(&first).await;
    let (two, _two_streams) = replica_server(&second).await;
    let client = client();

    let streaming = send(&client, metered(&one, "/stream", "acme", 600)).await;
    assert_eq!(streaming.status(), StatusCode::OK);
    assert_eq!(streaming.headers()["x-ratelimit-remaining-tokens"], "400");
    assert_eq!(
        in_flight(&second, "acme").await,
        600,
        "the other replica sees it"
    );

    let refused = call(&client, metered(&two, "/stream", "acme", 600)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "rate_limit_exceeded");
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), Some("400"));
    let too_large = call(&client, metered(&two, "/stream", "acme", 1_001)).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);

    // A handler growing its reservation is checked against both replicas' leases.
    let mut grow = metered(&two, "/usage", "acme", 100);
    grow.headers_mut().insert("x-used", "500".parse().unwrap());
    assert_eq!(call(&client, grow).await.text(), "rate_limit_exceeded");
    // That request's lease is released in the background once its response ends.
    wait_for_shared(&second, "acme", 600, WAIT).await;
    let mut grow = metered(&two, "/usage", "acme", 100);
    grow.headers_mut().insert("x-used", "400".parse().unwrap());
    assert_eq!(call(&client, grow).await.text(), "ok");

    // The stream ends: its lease goes, and the other replica admits the big request.
    let chunks = one_streams.next().await;
    let mut body = streaming.into_body();
    chunks.send("data: hi\n\n".into()).unwrap();
    assert!(next_data(&mut body).await.is_some());
    drop(chunks);
    assert!(next_data(&mut body).await.is_none());
    wait_for_shared(&first, "acme", 0, WAIT).await;
    let mut admitted = metered(&two, "/usage", "acme", 600);
    admitted
        .headers_mut()
        .insert("x-used", "600".parse().unwrap());
    assert_eq!(call(&client, admitted).await.text(), "ok");
    wait_for_shared(&first, "acme", 0, WAIT).await;

    // A resize reaches Redis in the background, while the stream is still going.
    let mut reconciled = metered(&one, "/stream", "acme", 900);
    reconciled
        .headers_mut()
        .insert("x-used", "250".parse().unwrap());
    let streaming = send(&client, reconciled).await;
    assert_eq!(streaming.status(), StatusCode::OK);
    wait_for_shared(&second, "acme", 250, WAIT).await;
    let mut fits = metered(&two, "/usage", "acme", 750);
    fits.headers_mut().insert("x-used", "750".parse().unwrap());
    assert_eq!(
        call(&client, fits).await.text(),
        "ok",
        "the shrink freed room"
    );
    drop(one_streams.next().await);
    drop(streaming);
    wait_for_shared(&second, "acme", 0, WAIT).await;
    for replica in [&first, &second] {
        let stats = replica.stats();
        assert_eq!(
            (stats.lost_leases, stats.failed_releases),
            (0, 0),
            "{stats:?}"
        );
    }
}

/// Run by `a_killed_replica_gives_its_capacity_back_within_one_ttl` in a child process:
/// reserves, says so, and holds the lease (renewing it) until killed.
#[tokio::test]
#[ignore = "run as a child process by a_killed_replica_gives_its_capacity_back_within_one_ttl"]
async fn child_replica_holds_a_lease_until_killed() {
    let Ok(url) = std::env::var("TTT_CHILD_REDIS_URL") else {
        return;
    };
    let tracker = builder(1_000).connect(url).expect("url");
    let reservation = tracker.reserve("acme", 800).await.expect("admitted");
    println!("HELD {}", reservation.lease_id().unwrap());
    tokio::time::sleep(Duration::from_secs(60)).await;
    drop(reservation);
}

#[tokio::test]
async fn a_killed_replica_gives_its_capacity_back_within_one_ttl() {
    let redis = redis_or_skip!("a_killed_replica_gives_its_capacity_back_within_one_ttl");
    let survivor = connect(builder(1_000), &redis);
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "child_replica_holds_a_lease_until_killed",
            "--exact",
            "--ignored",
        ])
        .args(["--nocapture", "--test-threads", "1"])
        .env("TTT_CHILD_REDIS_URL", redis.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the child replica");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let held = loop {
        let line = lines.next().expect("child output").expect("read");
        // libtest prints the test's name on the same line first.
        if let Some((_, lease)) = line.split_once("HELD ") {
            break lease.to_owned();
        }
    };
    assert!(!held.is_empty());
    assert_eq!(in_flight(&survivor, "acme").await, 800);

    // Alive, it renews: after three TTLs the lease still counts.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert_eq!(
        in_flight(&survivor, "acme").await,
        800,
        "a live lease expired"
    );
    assert!(matches!(
        survivor.reserve("acme", 300).await,
        Err(Error::TenantOverloaded { in_flight: 800, .. })
    ));

    // Killed without releasing: back within one TTL (plus a renewal period of slack).
    child.kill().expect("kill the child replica");
    child.wait().expect("reap");
    let killed = Instant::now();
    wait_for_shared(&survivor, "acme", 0, Duration::from_millis(1_500)).await;
    let back_after = killed.elapsed();
    assert!(back_after <= Duration::from_millis(1_500));
    let reservation = survivor
        .reserve("acme", 1_000)
        .await
        .expect("whole cap back");
    reservation.release().await;
}

#[tokio::test]
async fn renewal_registers_again_a_lease_that_expired_while_its_work_runs() {
    let redis = redis_or_skip!("renewal_registers_again_a_lease_that_expired_while_its_work_runs");
    // Renewed less often than it expires: the lease is gone before the first renewal, as
    // for a replica cut off from Redis for longer than the TTL.
    let tracker = connect(
        builder(1_000)
            .lease_ttl(Duration::from_millis(200))
            .renew_every(Duration::from_millis(600)),
        &redis,
    );
    let lease = tracker.reserve("acme", 700).await.expect("admitted");
    assert_eq!(in_flight(&tracker, "acme").await, 700);
    wait_for_shared(&tracker, "acme", 0, Duration::from_millis(500)).await;
    let steady = connect(builder(1_000), &redis);
    let other = steady
        .reserve("acme", 1_000)
        .await
        .expect("the expired lease is free");

    // The work behind `lease` still runs: renewal counts it again, over the cap, and the
    // overcommit shows in what Redis counts.
    wait_until("the renewal to register the lease again", || {
        lease.is_lost()
    })
    .await;
    assert_eq!(in_flight(&tracker, "acme").await, 1_700, "counted again");
    assert_eq!(tracker.stats().lost_leases, 1);
    assert!(matches!(
        steady.reserve("acme", 1).await,
        Err(Error::TenantOverloaded { .. })
    ));
    drop(other);
    assert_eq!(lease.tokens(), 700);
    drop(lease);
    wait_for_shared(&tracker, "acme", 0, WAIT).await;
    assert_eq!(redis.leftover_keys(), 0, "no key left behind");
}

#[tokio::test]
async fn a_flushed_redis_counts_a_running_stream_again_within_one_renewal_period() {
    let redis =
        redis_or_skip!("a_flushed_redis_counts_a_running_stream_again_within_one_renewal_period");
    let (first, second) = (
        connect(builder(1_000), &redis),
        connect(builder(1_000), &redis),
    );
    let (one, mut one_streams) = replica_server(&first).await;
    let (two, mut two_streams) = replica_server(&second).await;
    let client = client();
    let streaming = send(&client, metered(&one, "/stream", "acme", 800)).await;
    let chunks = one_streams.next().await;
    assert_eq!(in_flight(&second, "acme").await, 800);

    // What a restart without persistence, or a failover to a lagging replica, does.
    assert_eq!(redis.command("FLUSHALL").trim(), "+OK");
    let flushed = Instant::now();
    wait_for_shared(&second, "acme", 800, WAIT).await;
    let window = flushed.elapsed();
    assert!(
        window < Duration::from_millis(250 + 500),
        "counted again after {window:?}: more than one renewal period"
    );
    // The renewal's answer is read after Redis has the lease again.
    wait_until("the lost lease counted", || first.stats().lost_leases == 1).await;
    let refused = call(&client, metered(&two, "/stream", "acme", 800)).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the cap holds again"
    );

    drop(chunks);
    assert_eq!(read(streaming).await.status, StatusCode::OK);
    wait_for_shared(&second, "acme", 0, WAIT).await;
    let admitted = send(&client, metered(&two, "/stream", "acme", 800)).await;
    assert_eq!(admitted.status(), StatusCode::OK);
    drop(two_streams.next().await);
    assert_eq!(read(admitted).await.status, StatusCode::OK);
    wait_for_shared(&second, "acme", 0, WAIT).await;
}

#[tokio::test]
async fn a_stream_outliving_several_ttls_stays_counted() {
    let redis = redis_or_skip!("a_stream_outliving_several_ttls_stays_counted");
    let (tracker, observer) = (
        connect(builder(1_000), &redis),
        connect(builder(1_000), &redis),
    );
    let (server, mut streams) = replica_server(&tracker).await;
    let client = client();
    let response = send(&client, metered(&server, "/stream", "acme", 900)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let chunks = streams.next().await;
    let mut body = response.into_body();
    // Four TTLs of streaming, a chunk every 200 ms; the lease counts throughout.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(4_000) {
        chunks.send("data: token\n\n".into()).unwrap();
        assert!(next_data(&mut body).await.is_some());
        assert_eq!(
            in_flight(&observer, "acme").await,
            900,
            "the stream's lease lapsed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(matches!(
        observer.reserve("acme", 200).await,
        Err(Error::TenantOverloaded { .. })
    ));
    drop(chunks);
    assert!(next_data(&mut body).await.is_none());
    wait_for_shared(&observer, "acme", 0, WAIT).await;
    assert_eq!(tracker.stats().lost_leases, 0);
}

#[tokio::test]
async fn fail_closed_answers_503_while_redis_is_down_and_recovers_after_restart() {
    let mut redis =
        redis_or_skip!("fail_closed_answers_503_while_redis_is_down_and_recovers_after_restart");
    let tracker = connect(builder(1_000), &redis);
    let (server, _streams) = replica_server(&tracker).await;
    let client = client();
    let usage = |tokens: u64| {
        let mut request = metered(&server, "/usage", "acme", tokens);
        request
            .headers_mut()
            .insert("x-used", tokens.to_string().parse().unwrap());
        request
    };
    assert_eq!(call(&client, usage(100)).await.text(), "ok");

    redis.kill();
    for _ in 0..3 {
        let refused = call(&client, usage(100)).await;
        let message = assert_openai_error(&refused, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.error_code(), "backend_unavailable");
        assert_eq!(refused.header("retry-after"), Some("1"));
        assert!(
            !message.contains("redis"),
            "internal detail sent to the client: {message}"
        );
    }
    assert!(
        tracker.is_circuit_open(),
        "the breaker should skip a dead redis"
    );
    assert!(tracker.stats().unavailable >= 3);

    redis.restart();
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = call(&client, usage(100)).await;
        if reply.status == StatusCode::OK {
            break;
        }
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            Instant::now() < deadline,
            "no recovery after redis restarted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!tracker.is_circuit_open());
    wait_for_shared(&tracker, "acme", 0, WAIT).await;
}

#[tokio::test]
async fn fail_open_admits_uncounted_while_redis_is_down() {
    let mut redis = redis_or_skip!("fail_open_admits_uncounted_while_redis_is_down");
    let tracker = connect(
        builder(1_000).on_unavailable(FailurePolicy::FailOpen),
        &redis,
    );
    let counted = tracker.reserve("acme", 900).await.expect("admitted");
    assert!(counted.is_shared());

    redis.kill();
    for _ in 0..4 {
        // Over the cap next to `counted`, and admitted anyway: the caps are off.
        let blind = tracker
            .reserve("acme", 900)
            .await
            .expect("fail open admits");
        assert!(!blind.is_shared());
        assert_eq!(blind.tokens(), 900);
    }
    assert_eq!(tracker.stats().unavailable, 4);
    assert!(matches!(
        tracker.reserve("acme", 1_001).await,
        Err(Error::RequestTooLarge { .. })
    ));

    redis.restart(); // empty: `counted` is gone with the old server's data
                     // Fail open admits uncounted until Redis answers again; then `counted`, whose work
                     // still runs, is registered again within a renewal period, and the cap holds.
    let deadline = Instant::now() + WAIT;
    let shared = loop {
        let reservation = tracker.reserve("acme", 100).await.expect("admitted");
        if reservation.is_shared() && counted.is_lost() {
            break reservation;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after redis restarted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        in_flight(&tracker, "acme").await,
        1_000,
        "the lost lease counts again"
    );
    assert!(matches!(
        tracker.reserve("acme", 1).await,
        Err(Error::TenantOverloaded { .. })
    ));
    shared.release().await;
    drop(counted);
    wait_for_shared(&tracker, "acme", 0, WAIT).await;
}

#[tokio::test]
async fn local_share_counts_a_replicas_share_of_the_cap_while_redis_is_down() {
    let mut redis =
        redis_or_skip!("local_share_counts_a_replicas_share_of_the_cap_while_redis_is_down");
    let tracker = connect(
        builder(1_000).on_unavailable(FailurePolicy::LocalShare { replicas: 4 }),
        &redis,
    );
    redis.kill();
    let first = tracker
        .reserve("acme", 200)
        .await
        .expect("within the share");
    assert!(!first.is_shared());
    match tracker.reserve("acme", 100).await {
        Err(Error::TenantOverloaded { in_flight, cap, .. }) => {
            assert_eq!((in_flight, cap), (200, 250))
        }
        other => panic!("expected the local share to refuse, got {other:?}"),
    }
    // More than the share but within the cap: 429 (it fits again later), not 413.
    assert!(matches!(
        tracker.reserve("acme", 900).await,
        Err(Error::TenantOverloaded { cap: 250, .. })
    ));
    let local = tracker.local_share().expect("a local share");
    assert_eq!(local.in_flight("acme"), 200);
    drop(first);
    assert_eq!(local.in_flight("acme"), 0);

    redis.restart();
    let deadline = Instant::now() + WAIT;
    loop {
        // Until the breaker lets a call through, the share refuses the whole cap.
        match tracker.reserve("acme", 1_000).await {
            Ok(reservation) if reservation.is_shared() => {
                reservation.release().await;
                break;
            }
            Ok(local) => panic!("the share admitted more than its 250: {local:?}"),
            Err(Error::TenantOverloaded { cap: 250, .. }) => {}
            Err(other) => panic!("unexpected refusal: {other}"),
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after redis restarted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn script_flush_mid_run_reloads_every_script() {
    let redis = redis_or_skip!("script_flush_mid_run_reloads_every_script");
    let tracker = connect(builder(1_000), &redis);
    let mut held = tracker.reserve("acme", 300).await.expect("admitted");
    assert_eq!(redis.command("SCRIPT FLUSH"), "+OK");
    // Renewal (a pipeline of EVALSHA) reloads its script: the lease outlives two TTLs.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(in_flight(&tracker, "acme").await, 300);
    assert!(!held.is_lost());

    assert_eq!(redis.command("SCRIPT FLUSH"), "+OK");
    held.try_resize(600).await.expect("resize after a flush");
    assert_eq!(redis.command("SCRIPT FLUSH"), "+OK");
    let other = tracker
        .reserve("acme", 400)
        .await
        .expect("reserve after a flush");
    assert_eq!(in_flight(&tracker, "acme").await, 1_000);
    assert_eq!(redis.command("SCRIPT FLUSH"), "+OK");
    other.release().await;
    held.release().await;
    assert_eq!(in_flight(&tracker, "acme").await, 0);
    assert_eq!(tracker.stats().unavailable, 0);
}

/// Both trackers connected, and the reserve script loaded: a reservation sent during a
/// stall then lands after it (a NOSCRIPT answer would land nothing).
async fn warm_up(tracker: &RedisTokenTracker, observer: &RedisTokenTracker) {
    let reservation = tracker.reserve("acme", 1).await.expect("admitted");
    reservation.release().await;
    assert_eq!(in_flight(observer, "acme").await, 0);
}

/// Stalls Redis for 400 ms from another connection; answers `+OK` when it is over.
async fn stall(redis: &RedisServer) -> std::thread::JoinHandle<String> {
    let port = redis.port;
    let stall = std::thread::spawn(move || RedisServer::command_on(port, "DEBUG SLEEP 0.4"));
    tokio::time::sleep(Duration::from_millis(50)).await; // it has begun
    stall
}

#[tokio::test]
async fn a_reservation_that_timed_out_leaves_nothing_behind() {
    let redis = redis_or_skip!("a_reservation_that_timed_out_leaves_nothing_behind");
    let tracker = connect(
        builder(1_000)
            .lease_ttl(Duration::from_secs(60)) // expiry cannot be what cleans up
            .call_timeout(Duration::from_millis(50))
            .on_unavailable(FailurePolicy::FailOpen),
        &redis,
    );
    let observer = connect(builder(1_000), &redis);
    warm_up(&tracker, &observer).await;
    // Redis stalls for 400 ms; the reservation is queued behind it and times out, but
    // Redis applies it afterwards.
    let stall = stall(&redis).await;
    let blind = tracker.reserve("acme", 800).await.expect("fail open");
    assert!(!blind.is_shared(), "should have timed out");
    assert_eq!(stall.join().expect("stall"), "+OK");
    // The late reservation was applied, then taken back by lease id.
    wait_for_shared(&observer, "acme", 0, WAIT).await;
    assert_eq!(redis.leftover_keys(), 0);
}

#[tokio::test]
async fn connect_refuses_a_url_that_is_not_redis() {
    assert!(RedisTokenTracker::builder(1)
        .connect("http://example.com")
        .is_err());
    let outside_runtime = std::thread::spawn(|| {
        RedisTokenTracker::builder(1)
            .connect("redis://127.0.0.1:1")
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .join()
    .unwrap();
    assert!(outside_runtime.unwrap_err().contains("tokio runtime"));
}

#[tokio::test]
async fn a_request_cancelled_while_redis_decides_leaves_nothing_behind() {
    let redis = redis_or_skip!("a_request_cancelled_while_redis_decides_leaves_nothing_behind");
    let tracker = connect(
        builder(1_000)
            .lease_ttl(Duration::from_secs(60)) // expiry cannot be what cleans up
            .call_timeout(Duration::from_secs(2)),
        &redis,
    );
    let observer = connect(builder(1_000), &redis);
    warm_up(&tracker, &observer).await;
    let service = TenantTokenLayer::new(tracker.clone()).layer(tower::service_fn(
        |_: http::Request<RequestBody<String>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("served")))
        },
    ));
    let stall = stall(&redis).await;
    let request = http::Request::post("/v1/chat/completions")
        .header("x-tenant-id", "acme")
        .header("x-token-estimate", "800")
        .body(String::new())
        .unwrap();
    // The client gives up while the reservation waits behind the stall.
    let cancelled = tokio::time::timeout(Duration::from_millis(100), service.oneshot(request));
    assert!(
        cancelled.await.is_err(),
        "should still have been waiting for redis"
    );
    assert_eq!(stall.join().expect("stall"), "+OK");
    // Redis applied the reservation after the stall; its release by id follows it.
    wait_for_shared(&observer, "acme", 0, WAIT).await;
    assert_eq!(redis.leftover_keys(), 0);
    assert_eq!(tracker.live_leases(), 0);
}

#[tokio::test]
async fn the_body_estimator_reserves_in_redis_once_the_body_is_read() {
    let redis = redis_or_skip!("the_body_estimator_reserves_in_redis_once_the_body_is_read");
    let tracker = connect(builder(10_000), &redis);
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(
                |Extension(handle): Extension<ReservationHandle>, body: String| async move {
                    format!("{} {}", handle.tokens(), body.len())
                },
            ),
        )
        .layer(
            TenantTokenLayer::new(tracker.clone())
                .reservation_handle(true)
                .estimator(OpenAiEstimator::new()),
        );
    let server = serve(app).await;
    let body =
        r#"{"model":"m","max_tokens":100,"messages":[{"role":"user","content":"12345678"}]}"#;
    let request = http::Request::post(server.url("/v1/chat/completions"))
        .header("x-tenant-id", "acme")
        .body(full(body))
        .unwrap();
    let reply = call(&client(), request).await;
    assert_eq!(reply.status, StatusCode::OK);
    // 12 bytes of text under `messages` (role and content) / 4 + max_tokens; the handler
    // got the whole body.
    assert_eq!(reply.text(), format!("103 {}", body.len()));
    wait_for_shared(&tracker, "acme", 0, WAIT).await;
    let too_large = http::Request::post(server.url("/v1/chat/completions"))
        .header("x-tenant-id", "acme")
        .body(full(r#"{"model":"m","max_tokens":20000,"messages":[]}"#))
        .unwrap();
    assert_eq!(
        call(&client(), too_large).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
}

#[tokio::test]
async fn shadow_mode_admits_over_the_shared_cap_and_counts_it() {
    let redis = redis_or_skip!("shadow_mode_admits_over_the_shared_cap_and_counts_it");
    let tracker = connect(builder(1_000), &redis);
    let held = tracker.reserve("acme", 800).await.expect("admitted");
    let layer = TenantTokenLayer::new(tracker.clone()).shadow(ShadowMode::All);
    let service = layer.clone().layer(tower::service_fn(
        |_: http::Request<RequestBody<String>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("served")))
        },
    ));
    let request = http::Request::post("/v1/chat/completions")
        .header("x-tenant-id", "acme")
        .header("x-token-estimate", "500")
        .body(String::new())
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "would be 429; shadow admits"
    );
    assert_eq!(layer.shadow_refusals(), 1);
    assert_eq!(
        in_flight(&tracker, "acme").await,
        1_300,
        "and Redis counts it"
    );
    drop(response);
    held.release().await;
    wait_for_shared(&tracker, "acme", 0, WAIT).await;
}

#[tokio::test]
async fn the_tenants_in_flight_across_replicas_are_listed() {
    let redis = redis_or_skip!("the_tenants_in_flight_across_replicas_are_listed");
    let (first, second) = (
        connect(builder(1_000), &redis),
        connect(builder(1_000), &redis),
    );
    let mut held = vec![
        first.reserve("acme", 300).await.unwrap(),
        second.reserve("acme", 200).await.unwrap(),
        second.reserve("globex", 50).await.unwrap(),
        first.reserve("in*itech", 7).await.unwrap(),
    ];
    let listed = first.tenants_in_flight(100).await.unwrap();
    assert_eq!(
        listed,
        [
            ("acme".to_owned(), 500),
            ("globex".to_owned(), 50),
            ("in*itech".to_owned(), 7),
        ]
    );
    assert_eq!(second.tenants_in_flight(2).await.unwrap().len(), 2);
    // Another application's keys on the same Redis are not listed.
    let other = connect(builder(1_000).key_prefix("other-app:"), &redis);
    let _theirs = other.reserve("acme", 1).await.unwrap();
    assert_eq!(first.tenants_in_flight(100).await.unwrap().len(), 3);
    assert_eq!(
        other.tenants_in_flight(100).await.unwrap(),
        [("acme".to_owned(), 1)]
    );

    let last = held.pop().expect("in*itech's");
    for reservation in held {
        reservation.release().await;
    }
    // The idle tenants' hashes stay until they expire; they are not listed, nor do they
    // take the place of one that holds tokens.
    assert_eq!(
        first.tenants_in_flight(1).await.unwrap(),
        [("in*itech".to_owned(), 7)]
    );
    last.release().await;
    assert!(first.tenants_in_flight(100).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_budget_in_redis_holds_across_replicas_all_or_nothing_with_the_tenant() {
    let redis =
        redis_or_skip!("a_budget_in_redis_holds_across_replicas_all_or_nothing_with_the_tenant");
    let (first, second) = (
        connect(builder(1_000), &redis),
        connect(builder(1_000), &redis),
    );
    // The upstream takes 1,500 tokens from both replicas together; its leases live under
    // their own prefix, apart from the tenants'.
    let budget = || connect(builder(1_500).key_prefix("budget:"), &redis);
    let (upstream_one, upstream_two) = (budget(), budget());
    let (one, mut one_streams) = replica_server_with(&first, |layer| {
        layer.shared_budget(SharedBudget::new("upstream", upstream_one))
    })
    .await;
    let (two, mut two_streams) = replica_server_with(&second, |layer| {
        layer.shared_budget(SharedBudget::new("upstream", upstream_two))
    })
    .await;
    let observer = budget();
    let client = client();

    let acme = send(&client, metered(&one, "/stream", "acme", 600)).await;
    assert_eq!(acme.status(), StatusCode::OK);
    let acme_chunks = one_streams.next().await;
    let globex = send(&client, metered(&two, "/stream", "globex", 800)).await;
    assert_eq!(globex.status(), StatusCode::OK);
    let globex_chunks = two_streams.next().await;
    assert_eq!(in_flight(&observer, "upstream").await, 1_400);

    // Replica two alone holds 800 of 1,500: only the shared count refuses this one.
    let refused = call(&client, metered(&two, "/stream", "initech", 200)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "budget_exceeded");
    assert_eq!(
        in_flight(&second, "initech").await,
        0,
        "nothing held for it"
    );

    // A handler's growth is checked against the budget across replicas too.
    let mut grow = metered(&two, "/usage", "initech", 50);
    grow.headers_mut().insert("x-used", "200".parse().unwrap());
    assert_eq!(call(&client, grow).await.text(), "budget_exceeded");
    wait_for_shared(&observer, "upstream", 1_400, WAIT).await;
    let mut grow = metered(&two, "/usage", "initech", 50);
    grow.headers_mut().insert("x-used", "100".parse().unwrap());
    assert_eq!(call(&client, grow).await.text(), "ok");
    wait_for_shared(&observer, "upstream", 1_400, WAIT).await;

    // The budget fits and the tenant's cap does not: the budget's lease goes too.
    drop(globex_chunks);
    assert_eq!(read(globex).await.status, StatusCode::OK);
    wait_for_shared(&observer, "upstream", 600, WAIT).await;
    let refused = call(&client, metered(&two, "/stream", "acme", 450)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "rate_limit_exceeded");
    wait_for_shared(&observer, "upstream", 600, WAIT).await;
    assert_eq!(in_flight(&first, "acme").await, 600);

    drop(acme_chunks);
    assert_eq!(read(acme).await.status, StatusCode::OK);
    wait_for_shared(&observer, "upstream", 0, WAIT).await;
    wait_for_shared(&first, "acme", 0, WAIT).await;
}

/// A reservation dropped after the last handle on its tracker is still released at once
/// (its release keeps the tracker's connection until it is sent), not left to expire.
#[tokio::test]
async fn a_reservation_outliving_its_tracker_is_still_released() {
    let redis = redis_or_skip!("a_reservation_outliving_its_tracker_is_still_released");
    // Expiry cannot be what cleans up.
    let tracker = connect(builder(1_000).lease_ttl(Duration::from_secs(60)), &redis);
    let reservations: Vec<_> = futures_util::future::join_all(
        (0..20).map(|i| tracker.reserve(if i % 2 == 0 { "acme" } else { "globex" }, 10)),
    )
    .await
    .into_iter()
    .map(|reservation| reservation.expect("admitted"))
    .collect();
    assert_ne!(redis.command("DBSIZE"), ":0");
    drop(tracker);
    drop(reservations); // the last handles on the tracker
    let deadline = Instant::now() + Duration::from_secs(2);
    while redis.leftover_keys() != 0 {
        assert!(
            Instant::now() < deadline,
            "leases left behind: {} keys",
            redis.leftover_keys()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A lease resized to nothing is released like any other, and does not take the batch it
/// is sent in down with it.
#[tokio::test]
async fn a_lease_resized_to_nothing_is_released() {
    let redis = redis_or_skip!("a_lease_resized_to_nothing_is_released");
    let tracker = connect(builder(1_000), &redis);
    let mut emptied = tracker.reserve("acme", 100).await.expect("fits");
    emptied.resize(0);
    wait_for_shared(&tracker, "acme", 0, WAIT).await;
    let other = tracker.reserve("acme", 300).await.expect("fits");
    emptied.release().await;
    assert_eq!(tracker.stats().failed_releases, 0, "{:?}", tracker.stats());
    assert_eq!(tracker.live_leases(), 1);
    assert_eq!(in_flight(&tracker, "acme").await, 300);
    other.release().await;
    wait_for_shared(&tracker, "acme", 0, WAIT).await;
    assert_eq!(tracker.stats().failed_releases, 0, "{:?}", tracker.stats());
    assert_eq!(
        redis.command("HLEN tenant-tokens:{t:acme}:tokens").trim(),
        ":3",
        "only the `=` fields left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headroom_admits_without_redis_and_the_shared_cap_still_holds() {
    let redis = redis_or_skip!("headroom_admits_without_redis_and_the_shared_cap_still_holds");
    const CAP: u64 = 1_000;
    const STEP: u64 = CAP / 10;
    let replicas = [
        connect(builder(CAP).local_headroom(10), &redis),
        connect(builder(CAP).local_headroom(10), &redis),
    ];
    let mut held = vec![
        drawn(&replicas[0], "acme", 10).await,
        drawn(&replicas[1], "acme", 10).await,
    ];
    // Both replicas reserve until both are refused three times in a row (a refused
    // headroom gives back what it does not use meanwhile).
    let mut streaks = [0; 2];
    for _ in 0..1_000 {
        for (replica, streak) in replicas.iter().zip(streaks.iter_mut()) {
            match replica.reserve("acme", 10).await {
                Ok(reservation) => {
                    held.push(reservation);
                    *streak = 0;
                }
                Err(Error::TenantOverloaded { in_flight, cap, .. }) => {
                    assert_eq!(cap, CAP);
                    assert!(in_flight + 10 > CAP, "refused at {in_flight} though it fit");
                    *streak += 1;
                }
                Err(other) => panic!("unexpected refusal: {other}"),
            }
        }
        let counted = in_flight(&replicas[0], "acme").await;
        assert!(counted <= CAP, "redis counts {counted} over the cap {CAP}");
        if streaks.iter().all(|streak| *streak >= 3) {
            break;
        }
        if streaks.iter().any(|streak| *streak > 0) {
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
    assert!(streaks.iter().all(|streak| *streak >= 3), "never refused");
    let admitted: u64 = held.iter().map(RedisReservation::tokens).sum();
    assert!(admitted <= CAP, "{admitted} admitted over the cap {CAP}");
    assert!(
        admitted >= CAP - STEP,
        "refused at {admitted}: more than one other replica's headroom unused"
    );
    for replica in &replicas {
        let stats = replica.stats();
        assert!(stats.admitted_locally > 0, "{stats:?}");
        assert!(stats.admitted > 0, "{stats:?}");
        assert_eq!((stats.lost_leases, stats.failed_releases), (0, 0));
    }
    assert!(held.iter().any(|r| r.is_drawn_from_headroom()));
    assert!(held.iter().all(RedisReservation::is_shared));

    // Once nothing is held, the headroom goes within two renewal periods.
    drop(held);
    wait_for_shared(&replicas[0], "acme", 0, WAIT).await;
    wait_until("no live leases", || {
        replicas.iter().all(|replica| replica.live_leases() == 0)
    })
    .await;
    assert_eq!(redis.leftover_keys(), 0);
}

#[tokio::test]
async fn a_reservation_drawn_from_headroom_resizes_in_redis() {
    let redis = redis_or_skip!("a_reservation_drawn_from_headroom_resizes_in_redis");
    let tracker = connect(builder(1_000).local_headroom(10), &redis);
    let observer = connect(builder(1_000), &redis);
    let mut reservation = drawn(&tracker, "acme", 10).await;

    // Unchecked growth past the headroom is counted in Redis in the background.
    assert_eq!(reservation.resize(600), 600);
    wait_until_counted(&observer, "acme", 600..=700).await;
    // Checked growth asks Redis for what the headroom lacks.
    let refused = reservation.try_resize(1_001).await;
    assert!(
        matches!(refused, Err(Error::TenantOverloaded { cap: 1_000, .. })),
        "{refused:?}"
    );
    assert_eq!(reservation.tokens(), 600);
    reservation
        .try_resize(900)
        .await
        .expect("fits under the cap");
    assert_eq!(reservation.tokens(), 900);
    assert!(in_flight(&observer, "acme").await >= 900);
    // Something else of the tenant's is refused meanwhile, on either replica.
    let other = observer.reserve("acme", 200).await;
    assert!(
        matches!(other, Err(Error::TenantOverloaded { .. })),
        "{other:?}"
    );

    reservation.release().await;
    wait_for_shared(&observer, "acme", 0, WAIT).await;
    assert_eq!(tracker.live_leases(), 0);
}

#[tokio::test]
async fn a_flushed_redis_counts_headroom_again_within_one_renewal_period() {
    let redis = redis_or_skip!("a_flushed_redis_counts_headroom_again_within_one_renewal_period");
    let tracker = connect(builder(1_000).local_headroom(10), &redis);
    let observer = connect(builder(1_000), &redis);
    let reservation = drawn(&tracker, "acme", 50).await;
    assert!(in_flight(&observer, "acme").await >= 50);

    assert_eq!(redis.command("FLUSHALL").trim(), "+OK");
    let flushed = Instant::now();
    wait_until_counted(&observer, "acme", 50..=1_000).await;
    let window = flushed.elapsed();
    assert!(
        window < Duration::from_millis(250 + 500),
        "counted again after {window:?}: more than one renewal period"
    );
    wait_until("the lost lease counted", || {
        tracker.stats().lost_leases == 1
    })
    .await;
    assert!(reservation.is_lost());

    drop(reservation);
    wait_for_shared(&observer, "acme", 0, WAIT).await;
}

#[tokio::test]
async fn dropping_a_tracker_releases_its_headroom() {
    let redis = redis_or_skip!("dropping_a_tracker_releases_its_headroom");
    // Expiry cannot be what cleans up.
    let builder = || builder(1_000).lease_ttl(Duration::from_secs(60));
    let tracker = connect(builder().local_headroom(10), &redis);
    let observer = connect(builder(), &redis);
    drop(drawn(&tracker, "acme", 10).await);
    assert!(
        in_flight(&observer, "acme").await > 0,
        "the headroom is held"
    );
    drop(tracker);
    wait_for_shared(&observer, "acme", 0, WAIT).await;
}

#[tokio::test]
async fn the_layer_admits_from_headroom_and_refuses_at_the_cap_over_http() {
    let redis = redis_or_skip!("the_layer_admits_from_headroom_and_refuses_at_the_cap_over_http");
    let tracker = connect(builder(1_000).local_headroom(10), &redis);
    let observer = connect(builder(1_000), &redis);
    let (server, mut streams) = replica_server(&tracker).await;
    let client = client();
    for used in 0..50 {
        // Each grows its reservation a little within the headroom, or in Redis.
        let mut request = metered(&server, "/usage", "acme", 20);
        request.headers_mut().insert("x-used", (20 + used).into());
        assert_eq!(call(&client, request).await.text(), "ok");
    }
    assert!(
        tracker.stats().admitted_locally > 0,
        "{:?}",
        tracker.stats()
    );

    let streaming = send(&client, metered(&server, "/stream", "acme", 850)).await;
    assert_eq!(streaming.status(), StatusCode::OK);
    let chunks = streams.next().await;
    let refused = call(&client, metered(&server, "/stream", "acme", 200)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let over = observer.reserve("acme", 200).await;
    assert!(
        matches!(over, Err(Error::TenantOverloaded { .. })),
        "{over:?}"
    );

    drop(chunks);
    assert_eq!(read(streaming).await.status, StatusCode::OK);
    wait_for_shared(&observer, "acme", 0, WAIT).await;
}

#[tokio::test]
async fn a_changed_cap_drains_the_headroom_made_under_the_old_one() {
    let redis = redis_or_skip!("a_changed_cap_drains_the_headroom_made_under_the_old_one");
    let cap = Arc::new(AtomicU64::new(1_000));
    let caps = cap.clone();
    let tracker = connect(
        builder(1_000)
            .cap_fn(move |_| Some(caps.load(SeqCst)))
            .local_headroom(10),
        &redis,
    );
    let observer = connect(builder(1_000), &redis);
    let held = drawn(&tracker, "acme", 10).await;
    assert!(
        in_flight(&observer, "acme").await > 10,
        "the headroom is held"
    );

    cap.store(500, SeqCst);
    // Asked in Redis under the new cap; the old headroom gives back what it does not use.
    let next = tracker.reserve("acme", 10).await.expect("fits");
    assert!(!next.is_drawn_from_headroom());
    wait_until_counted(&observer, "acme", 20..=20).await;
    let refused = tracker.reserve("acme", 481).await;
    assert!(
        matches!(refused, Err(Error::TenantOverloaded { cap: 500, .. })),
        "{refused:?}"
    );

    // Once drained and let go, a headroom is made under the new cap.
    drop((held, next));
    let again = drawn(&tracker, "acme", 10).await;
    let counted = in_flight(&observer, "acme").await;
    assert!(counted <= 10 + 2 * 50, "{counted} held under a cap of 500");
    drop(again);
    wait_for_shared(&observer, "acme", 0, WAIT).await;
}

/// Polls Redis's count of `tenant` until it is within `range`.
async fn wait_until_counted(
    tracker: &RedisTokenTracker,
    tenant: &str,
    range: std::ops::RangeInclusive<u64>,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = in_flight(tracker, tenant).await;
        if range.contains(&now) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{tenant} counts {now}, not {range:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Calls of `command` the server has answered (its `INFO commandstats`).
fn calls_of(redis: &RedisServer, command: &str) -> u64 {
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client.get_connection().expect("connect");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut conn)
        .expect("INFO");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Waits until `lost_leases` reaches `count`; when it did.
async fn registered_again(tracker: &RedisTokenTracker, count: u64, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    while tracker.stats().lost_leases < count {
        assert!(
            Instant::now() < deadline,
            "the lost lease was not registered again within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Instant::now()
}

/// With the default lease settings (renewal every 10 s), a server restarted empty while
/// nothing asks it anything: once quickly, once after an outage longer than the retry's
/// longest pause. The stream is counted again within moments of the server answering,
/// not at the next renewal; and a replica holding no lease sends nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_default_leases_a_restarted_empty_redis_counts_a_stream_again_within_moments() {
    let mut redis = redis_or_skip!(
        "with_default_leases_a_restarted_empty_redis_counts_a_stream_again_within_moments"
    );
    const CAP: u64 = 1_000;
    let tracker = RedisTokenTracker::builder(CAP)
        .connect(redis.url())
        .expect("a valid redis url");
    let stream = tracker.reserve("acme", 800).await.expect("fits");
    // Held and idle: the connection is checked now and then.
    let pings = calls_of(&redis, "ping");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(
        calls_of(&redis, "ping") >= pings + 2,
        "no health check while a lease is held"
    );

    let mut figures = Vec::new();
    for (round, outage) in [Duration::ZERO, Duration::from_millis(2_500)]
        .into_iter()
        .enumerate()
    {
        redis.kill();
        tokio::time::sleep(outage).await;
        redis.restart(); // empty, and answering when this returns
        let answers = Instant::now();
        let registered = registered_again(&tracker, round as u64 + 1, WAIT * 2).await;
        let window = registered - answers;
        assert!(
            window <= Duration::from_secs(2),
            "counted again {window:?} after redis answered"
        );
        assert_eq!(in_flight(&tracker, "acme").await, 800);
        assert!(matches!(
            tracker.reserve("acme", 800).await,
            Err(Error::TenantOverloaded { in_flight: 800, .. })
        ));
        figures.push(format!(
            "outage {outage:?}: counted again {window:?} after it answered"
        ));
    }
    assert!(stream.is_lost());

    // Nothing held: nothing sent, however long it waits.
    stream.release().await;
    wait_for_shared(&tracker, "acme", 0, WAIT).await;
    let (pings, scripts) = (calls_of(&redis, "ping"), calls_of(&redis, "evalsha"));
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(calls_of(&redis, "ping"), pings, "a health check while idle");
    assert_eq!(calls_of(&redis, "evalsha"), scripts, "a renewal while idle");
    println!("single server restarted empty: {}", figures.join("; "));
}
