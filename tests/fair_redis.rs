//! One fair order across replicas for a shared budget in Redis, against a real
//! `redis-server` and over real HTTP: each replica is its own layer and server, the
//! budget and the tenants' caps are counted in one Redis, and the requests waiting on
//! every replica are served by class, then by the tokens each tenant was served.
//!
//! Each test starts its own server. Without `redis-server` installed, each says loudly
//! that it was skipped, and fails instead when `CI=true`.
#![cfg(feature = "redis")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fair::*;
use common::redis_server::RedisServer;
use common::*;
use http::{HeaderName, StatusCode};
use tower_tenant_tokens::redis::{RedisTokenTracker, RedisTokenTrackerBuilder};
use tower_tenant_tokens::{SharedBudget, TenantTokenLayer};

/// The tests here run one at a time: they time streams and waits against each other.
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where the budget's tickets wait, and their deadlines.
const TICKETS: &str = "budget:{t:upstream}:q:deadlines";

/// Starts this test's server, or returns from the test where none is installed.
macro_rules! redis_or_skip {
    ($test:literal) => {
        match RedisServer::start($test) {
            Some(server) => server,
            None => return,
        }
    };
}

/// Test-sized leases and tickets: short enough that expiry is quick to watch.
fn builder(cap: u64) -> RedisTokenTrackerBuilder {
    RedisTokenTracker::builder(cap)
        .lease_ttl(Duration::from_millis(1_000))
        .renew_every(Duration::from_millis(250))
        .call_timeout(Duration::from_millis(250))
}

/// The tenants admitted by a replica's handlers (from `/stream`), with the time.
type Admitted = Arc<Mutex<Vec<(String, Instant)>>>;

struct Replica {
    server: Arc<TestServer>,
    budget: RedisTokenTracker,
}

/// A replica on `url`: its own tenants' tracker and budget tracker (as a separate process
/// would have), one layer waiting up to `max_wait`, classes from `x-priority`. `/stream`
/// answers with 4 chunks `chunk_ms` apart and logs the tenant in `admitted`; `/hold`
/// streams until the test drops its sender.
async fn replica(
    url: &str,
    chunk_ms: u64,
    max_wait: Duration,
    ttl: Duration,
    admitted: &Admitted,
) -> (Replica, Streams) {
    replica_with(url, chunk_ms, max_wait, ttl, admitted, |layer| layer).await
}

/// A [`replica`] whose upstream answers at once, waiting up to 10 s, with 1 s leases.
async fn instant_replica(url: &str, admitted: &Admitted) -> (Replica, Streams) {
    replica(
        url,
        0,
        Duration::from_secs(10),
        Duration::from_secs(1),
        admitted,
    )
    .await
}

/// [`replica`] with its layer adjusted by `adjust`.
async fn replica_with(
    url: &str,
    chunk_ms: u64,
    max_wait: Duration,
    ttl: Duration,
    admitted: &Admitted,
    adjust: impl FnOnce(TenantTokenLayer) -> TenantTokenLayer,
) -> (Replica, Streams) {
    let (source, streams) = streams();
    // Tenant `capped` may have 400 tokens in flight, the others all they ask for.
    let tenants = builder(1_000_000)
        .cap_fn(|tenant| (tenant == "capped").then_some(400))
        .connect(url)
        .expect("url");
    let budget = builder(UPSTREAM)
        .lease_ttl(ttl)
        .key_prefix("budget:")
        .connect(url)
        .expect("url");
    let seen = admitted.clone();
    let router = routes(chunk_ms, seen, source).layer(adjust(
        TenantTokenLayer::new(tenants)
            .shared_budget(SharedBudget::new("upstream", budget.clone()))
            .wait_for_capacity(max_wait)
            .priority_header(HeaderName::from_static("x-priority")),
    ));
    let replica = Replica {
        server: Arc::new(serve(router).await),
        budget,
    };
    (replica, streams)
}

async fn budget_in_flight(replica: &Replica) -> u64 {
    replica
        .budget
        .in_flight("upstream")
        .await
        .expect("redis answers")
}

/// Polls until the budget counts `expected` tokens in flight, within `limit`.
async fn wait_for_budget(replica: &Replica, expected: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let now = budget_in_flight(replica).await;
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the budget counts {now}, expected {expected} within {limit:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// How many tickets wait for the budget, as Redis counts them (expired ones included
/// until a script sweeps them).
fn tickets(redis: &RedisServer) -> u64 {
    let reply = redis.command(&format!("ZCARD {TICKETS}"));
    reply.trim().trim_start_matches(':').parse().expect(&reply)
}

/// Polls until `expected` tickets wait, within `limit`.
async fn wait_for_tickets(redis: &RedisServer, expected: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while tickets(redis) != expected {
        assert!(
            Instant::now() < deadline,
            "{} tickets wait, expected {expected} within {limit:?}",
            tickets(redis)
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Runs `first` (a tenant and how many requests it keeps going) on replica `one` and
/// `second` on replica `two` for 3 s, sampling the budget all along (never over the
/// upstream, and saturated); returns `second`'s share of the admissions while both were
/// backlogged (after a warm-up, before the clients stop) and its waits.
async fn contend(
    one: &Replica,
    first: (&'static str, usize),
    two: &Replica,
    second: (&'static str, usize),
    admitted: &Admitted,
) -> (f64, Vec<Duration>) {
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let highest = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn({
        let (budget, stop, highest) = (one.budget.clone(), stop.clone(), highest.clone());
        async move {
            let mut samples = 0;
            while !stop.load(Ordering::Relaxed) {
                let now = budget.in_flight("upstream").await.expect("redis answers");
                highest.fetch_max(now, Ordering::Relaxed);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            samples
        }
    });
    let busy_one = tokio::spawn(keep_busy(
        one.server.clone(),
        first.0,
        first.1,
        stop.clone(),
    ));
    let busy_two = tokio::spawn(keep_busy(
        two.server.clone(),
        second.0,
        second.1,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stopped = Instant::now();
    stop.store(true, Ordering::Relaxed);
    within("the first tenant's clients to stop", busy_one)
        .await
        .unwrap();
    let waits = within("the second tenant's clients to stop", busy_two)
        .await
        .unwrap();
    let samples = sampler.await.unwrap();
    let highest = highest.load(Ordering::Relaxed);
    assert!(samples > 100, "too few samples of the budget: {samples}");
    assert!(highest <= UPSTREAM, "the budget was exceeded: {highest}");
    assert!(highest > UPSTREAM / 2, "never saturated: {highest}");

    let admitted = admitted.lock().unwrap().clone();
    let window = admitted
        .iter()
        .filter(|(_, at)| *at >= started + Duration::from_millis(300) && *at < stopped);
    let (mut count, mut total) = (0, 0);
    for (tenant, _) in window {
        total += 1;
        count += usize::from(tenant == second.0);
    }
    assert!(total >= 20, "too few admissions to judge: {total}");
    eprintln!("{total} admissions while both were backlogged");
    (count as f64 / total as f64, waits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_light_tenant_on_one_replica_gets_half_of_a_budget_a_heavy_one_saturates_from_another() {
    let _alone = MEASURING.lock().await;
    let redis = redis_or_skip!(
        "a_light_tenant_on_one_replica_gets_half_of_a_budget_a_heavy_one_saturates_from_another"
    );
    // Each request holds 400 of the upstream's 1,000 tokens for about 100 ms: two run at
    // once. `heavy` keeps 16 going through one replica, `light` 2 through the other.
    let admitted = Admitted::default();
    let (one, _one_streams) = replica(
        &redis.url(),
        25,
        Duration::from_secs(20),
        Duration::from_secs(1),
        &admitted,
    )
    .await;
    let (two, _two_streams) = replica(
        &redis.url(),
        25,
        Duration::from_secs(20),
        Duration::from_secs(1),
        &admitted,
    )
    .await;
    let (share, waits) = contend(&one, ("heavy", 16), &two, ("light", 2), &admitted).await;
    let waited = median(waits);
    eprintln!("two replicas: light's share {share:.3}, median wait {waited:?}");
    // Fair is half each: neither tenant takes much more, whichever replica it is on.
    assert!(
        (0.45..=0.55).contains(&share),
        "light's share of the upstream: {share:.3}"
    );
    assert!(
        waited <= Duration::from_millis(2 * 100),
        "light's median wait {waited:?}, a request runs ~100 ms"
    );
    wait_for_budget(&one, 0, WAIT).await;
    wait_for_tickets(&redis, 0, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_three_to_one_share_a_budget_three_to_one_across_replicas() {
    let _alone = MEASURING.lock().await;
    let redis = redis_or_skip!("weights_three_to_one_share_a_budget_three_to_one_across_replicas");
    let admitted = Admitted::default();
    let weights = |layer: TenantTokenLayer| {
        layer.tenant_weight(|tenant| if tenant == "gold" { 3 } else { 1 })
    };
    let wait = Duration::from_secs(20);
    let ttl = Duration::from_secs(1);
    let (one, _one_streams) = replica_with(&redis.url(), 10, wait, ttl, &admitted, weights).await;
    let (two, _two_streams) = replica_with(&redis.url(), 10, wait, ttl, &admitted, weights).await;
    let (gold, _) = contend(&one, ("basic", 8), &two, ("gold", 8), &admitted).await;
    eprintln!("two replicas: gold's share {gold:.3}");
    assert!((gold - 0.75).abs() <= 0.07, "gold's share: {gold:.3}");
    wait_for_budget(&one, 0, WAIT).await;
    wait_for_tickets(&redis, 0, WAIT).await;
}

/// Holds the whole upstream with one streaming request on `replica` until the test ends
/// its stream.
async fn fill_upstream(replica: &Replica) -> hyper::Response<hyper::body::Incoming> {
    let request = metered(&replica.server, "/hold", "holder", UPSTREAM);
    let response = send(&client(), request).await;
    assert_eq!(response.status(), StatusCode::OK);
    response
}

#[tokio::test]
async fn critical_from_one_replica_goes_before_standard_waiting_on_another_and_wakes_at_once() {
    let _alone = MEASURING.lock().await;
    let redis = redis_or_skip!(
        "critical_from_one_replica_goes_before_standard_waiting_on_another_and_wakes_at_once"
    );
    let admitted = Admitted::default();
    let (one, mut one_streams) = instant_replica(&redis.url(), &admitted).await;
    let (two, _two_streams) = instant_replica(&redis.url(), &admitted).await;
    let holding = fill_upstream(&one).await;
    let chunks = one_streams.next().await;

    // Standard requests wait on replica two, then a critical one arrives on replica one.
    let mut waiting = Vec::new();
    for tenant in ["a", "b", "a"] {
        waiting.push(spawn_request(&two.server, tenant, 600, "standard"));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    waiting.push(spawn_request(&one.server, "c", 600, "critical"));
    wait_for_tickets(&redis, 3, WAIT).await; // a's second waits behind its first, here
    assert!(admitted.lock().unwrap().is_empty(), "all wait");

    // A sheddable request is refused at once, on either replica, while others wait.
    for replica in [&one, &two] {
        let shed = within(
            "the shed request",
            spawn_request(&replica.server, "d", 100, "sheddable"),
        )
        .await
        .unwrap();
        assert_eq!(shed.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(shed.error_code(), "shed");
    }

    // The holder's stream ends on replica one: the critical request goes first, then the
    // others one by one (600 + 600 does not fit), each woken by the last one's release.
    let released = Instant::now();
    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    for request in waiting {
        assert_eq!(
            within("a waiting request", request).await.unwrap().status,
            StatusCode::OK
        );
    }
    let order = admitted.lock().unwrap().clone();
    let tenants: Vec<&str> = order.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(tenants.len(), 4, "{tenants:?}");
    assert_eq!(tenants[0], "c", "the critical request first: {tenants:?}");
    let handoffs: Vec<Duration> = std::iter::once(released)
        .chain(order.iter().map(|(_, at)| *at))
        .collect::<Vec<_>>()
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .collect();
    eprintln!("release to the next admission, across replicas: {handoffs:?}");
    wait_for_budget(&one, 0, WAIT).await;
    wait_for_tickets(&redis, 0, WAIT).await;
}

#[tokio::test]
async fn cancelled_and_timed_out_waits_leave_no_ticket_and_no_token() {
    let _alone = MEASURING.lock().await;
    let redis = redis_or_skip!("cancelled_and_timed_out_waits_leave_no_ticket_and_no_token");
    // Leases and tickets live a minute: expiry cannot be what cleans up here.
    let ttl = Duration::from_secs(60);
    let admitted = Admitted::default();
    let (one, mut one_streams) =
        replica(&redis.url(), 0, Duration::from_millis(600), ttl, &admitted).await;
    let (two, _two_streams) =
        replica(&redis.url(), 0, Duration::from_millis(600), ttl, &admitted).await;
    let holding = fill_upstream(&one).await;
    let chunks = one_streams.next().await;

    let started = Instant::now();
    let timing_out = [
        spawn_request(&one.server, "a", 500, "standard"),
        spawn_request(&two.server, "b", 500, "standard"),
    ];
    let cancelled = [
        spawn_request(&two.server, "c", 500, "standard"),
        spawn_request(&one.server, "d", 500, "critical"),
    ];
    wait_for_tickets(&redis, 4, WAIT).await;
    // Two clients go away while their requests wait.
    for request in &cancelled {
        request.abort();
    }
    wait_for_tickets(&redis, 2, Duration::from_millis(500)).await;
    // The other two time out at their deadline.
    for request in timing_out {
        let reply = within("a waiting request", request).await.unwrap();
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(reply.error_code(), "budget_exceeded");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_millis(1_500),
        "answered after {waited:?}, the deadline was 600 ms"
    );
    wait_for_tickets(&redis, 0, Duration::from_millis(500)).await;
    assert_eq!(
        budget_in_flight(&two).await,
        UPSTREAM,
        "only the holder's tokens"
    );
    assert!(admitted.lock().unwrap().is_empty());

    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    wait_for_budget(&one, 0, WAIT).await;
    // Nothing left queued: a sheddable request fits at once on either replica.
    for replica in [&one, &two] {
        let after = within(
            "a request after",
            spawn_request(&replica.server, "e", UPSTREAM, "sheddable"),
        )
        .await
        .unwrap();
        assert_eq!(after.status, StatusCode::OK);
    }
    wait_for_budget(&one, 0, WAIT).await;
}

/// The ids of the tickets waiting for the budget.
fn ticket_ids(redis: &RedisServer) -> Vec<String> {
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client.get_connection().expect("redis");
    redis::cmd("ZRANGE")
        .arg(TICKETS)
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .expect("redis answers")
}

#[tokio::test]
async fn a_tenants_next_request_takes_over_its_ticket_so_the_tenant_never_leaves_the_line() {
    let _alone = MEASURING.lock().await;
    let redis = redis_or_skip!(
        "a_tenants_next_request_takes_over_its_ticket_so_the_tenant_never_leaves_the_line"
    );
    let admitted = Admitted::default();
    let (one, mut one_streams) = instant_replica(&redis.url(), &admitted).await;
    let holding = fill_upstream(&one).await;
    let holder_chunks = one_streams.next().await;

    // a's first request waits with a ticket, its second behind it on the same replica.
    let first = tokio::spawn({
        let request = metered(&one.server, "/hold", "a", 600);
        async move { send(&client(), request).await }
    });
    wait_for_tickets(&redis, 1, WAIT).await;
    let ticket = ticket_ids(&redis);
    let second = spawn_request(&one.server, "a", 600, "standard");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        ticket_ids(&redis),
        ticket,
        "the second waits behind the first"
    );

    // The first gets in: the script that admits it keeps its ticket for the second, so
    // the tenant is in line all along, with its place; nothing is given up and taken
    // again a round trip later (while another replica could take its turn).
    drop(holder_chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    let first = within("the first request", first).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let first_chunks = one_streams.next().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        ticket_ids(&redis),
        ticket,
        "the second holds the first's ticket"
    );
    assert!(!second.is_finished());

    drop(first_chunks);
    assert_eq!(read(first).await.status, StatusCode::OK);
    let reply = within("the second request", second).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    wait_for_tickets(&redis, 0, WAIT).await;
    wait_for_budget(&one, 0, WAIT).await;
}

/// Tenant `tenant`'s virtual counter for the budget, as Redis keeps it.
async fn counter(redis: &RedisServer, tenant: &str) -> f64 {
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let value: Option<String> = redis::cmd("HGET")
        .arg("budget:{t:upstream}:q:vtc")
        .arg(format!("t:{tenant}"))
        .query_async(&mut conn)
        .await
        .expect("redis answers");
    value.map_or(0.0, |value| value.parse().expect("a number"))
}

#[tokio::test]
async fn a_tenant_at_its_own_cap_gives_up_its_turn_and_counts_only_what_it_was_served() {
    let _alone = MEASURING.lock().await;
    let redis = redis_or_skip!(
        "a_tenant_at_its_own_cap_gives_up_its_turn_and_counts_only_what_it_was_served"
    );
    let admitted = Admitted::default();
    let (one, mut one_streams) = instant_replica(&redis.url(), &admitted).await;
    let (two, mut two_streams) = instant_replica(&redis.url(), &admitted).await;
    let client = client();
    // `capped` holds its whole cap (400) on replica one, `filler` the rest of the budget on
    // replica two.
    let capped = send(&client, metered(&one.server, "/hold", "capped", 400)).await;
    assert_eq!(capped.status(), StatusCode::OK);
    let capped_chunks = one_streams.next().await;
    let filler = send(&client, metered(&two.server, "/hold", "filler", 600)).await;
    assert_eq!(filler.status(), StatusCode::OK);
    let filler_chunks = two_streams.next().await;
    assert_eq!(counter(&redis, "capped").await, 400.0);

    // Both wait: `capped` for its own cap and the budget, `other` for the budget.
    let waiting_capped = spawn_request(&one.server, "capped", 400, "standard");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiting_other = spawn_request(&two.server, "other", 600, "standard");
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The filler ends: `other` fits the budget and gets in, though `capped` came first,
    // because `capped` waits for its own cap and holds no turn meanwhile.
    drop(filler_chunks);
    assert_eq!(read(filler).await.status, StatusCode::OK);
    let other = within("the request waiting for the budget", waiting_other)
        .await
        .unwrap();
    assert_eq!(other.status, StatusCode::OK);
    // `capped` kept waiting for its cap without taking the budget it could not use: its
    // counter is what it was served, not what it tried.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting_capped.is_finished());
    assert_eq!(counter(&redis, "capped").await, 400.0);
    let budget_leases = one.budget.stats().admitted;

    drop(capped_chunks);
    assert_eq!(read(capped).await.status, StatusCode::OK);
    let reply = within("the capped request", waiting_capped).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(counter(&redis, "capped").await, 800.0);
    assert_eq!(
        one.budget.stats().admitted,
        budget_leases + 1,
        "one budget lease for the capped request, none while it waited for its cap"
    );
    let tenants: Vec<String> = admitted
        .lock()
        .unwrap()
        .iter()
        .map(|(t, _)| t.clone())
        .collect();
    assert_eq!(tenants, ["other", "capped"]);
    wait_for_budget(&one, 0, WAIT).await;
    wait_for_tickets(&redis, 0, WAIT).await;
}

#[tokio::test]
async fn waiting_requests_whose_tickets_redis_lost_still_get_in_and_the_order_holds_after() {
    let _alone = MEASURING.lock().await;
    let redis = redis_or_skip!(
        "waiting_requests_whose_tickets_redis_lost_still_get_in_and_the_order_holds_after"
    );
    let admitted = Admitted::default();
    let wait = Duration::from_secs(10);
    let ttl = Duration::from_secs(1);
    let (one, mut one_streams) = replica(&redis.url(), 0, wait, ttl, &admitted).await;
    let (two, _two_streams) = replica(&redis.url(), 0, wait, ttl, &admitted).await;
    for round in 0..2 {
        let holding = fill_upstream(&one).await;
        let chunks = one_streams.next().await;
        let waiting = [
            spawn_request(&two.server, "a", 600, "standard"),
            spawn_request(&one.server, "b", 600, "critical"),
        ];
        wait_for_tickets(&redis, 2, WAIT).await;
        if round == 0 {
            // What a restart without persistence, or a failover to a lagging replica, does:
            // tickets and counters gone, the holder's lease registered again within a
            // renewal period (until then, like any request, a waiting one may get in).
            assert_eq!(redis.command("FLUSHALL").trim(), "+OK");
        }
        drop(chunks);
        assert_eq!(read(holding).await.status, StatusCode::OK);
        for request in waiting {
            let reply = within("a waiting request", request).await.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "round {round}");
        }
        wait_for_budget(&one, 0, WAIT).await;
        wait_for_tickets(&redis, 0, WAIT).await;
    }
    // After the flush, the order across replicas works as before: the critical request of
    // the second round went first.
    let order: Vec<String> = admitted
        .lock()
        .unwrap()
        .iter()
        .map(|(t, _)| t.clone())
        .collect();
    assert_eq!(order.len(), 4, "{order:?}");
    assert_eq!(order[2], "b", "the critical request first: {order:?}");
}

/// Run by `a_killed_replica_leaves_no_ticket_beyond_one_ttl` in a child process: a replica
/// whose requests wait for the full budget, until killed.
#[tokio::test]
#[ignore = "run as a child process by a_killed_replica_leaves_no_ticket_beyond_one_ttl"]
async fn child_replica_waits_until_killed() {
    let Ok(url) = std::env::var("TTT_CHILD_REDIS_URL") else {
        return;
    };
    let admitted = Admitted::default();
    let (child, _streams) = replica(
        &url,
        0,
        Duration::from_secs(60),
        Duration::from_secs(1),
        &admitted,
    )
    .await;
    let waiting: Vec<_> = ["x", "y", "z"]
        .into_iter()
        .map(|tenant| spawn_request(&child.server, tenant, 500, "critical"))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("WAITING");
    tokio::time::sleep(Duration::from_secs(60)).await;
    drop(waiting);
}

#[tokio::test]
async fn a_killed_replica_leaves_no_ticket_beyond_one_ttl() {
    let _alone = MEASURING.lock().await;
    let redis = redis_or_skip!("a_killed_replica_leaves_no_ticket_beyond_one_ttl");
    let admitted = Admitted::default();
    let (survivor, mut streams) = instant_replica(&redis.url(), &admitted).await;
    let holding = fill_upstream(&survivor).await;
    let chunks = streams.next().await;
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["child_replica_waits_until_killed", "--exact", "--ignored"])
        .args(["--nocapture", "--test-threads", "1"])
        .env("TTT_CHILD_REDIS_URL", redis.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the child replica");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut reaped = scopeguard(&mut child);
    loop {
        let line = lines.next().expect("child output").expect("read");
        if line.contains("WAITING") {
            break;
        }
    }
    // Three critical tickets of the child wait; alive, it renews them past their TTL.
    wait_for_tickets(&redis, 3, WAIT).await;
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(tickets(&redis), 3, "a live replica's tickets expired");

    // A standard request here waits behind them; the holder's stream ends, then the child
    // is killed: its tickets expire within one TTL and the request here gets in.
    let behind = spawn_request(&survivor.server, "w", 600, "standard");
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    let killed = reaped.kill();
    let reply = within("the request behind the dead replica's tickets", behind)
        .await
        .unwrap();
    let after = killed.elapsed();
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        after <= Duration::from_millis(1_000 + 500),
        "admitted {after:?} after the kill: longer than one TTL"
    );
    eprintln!("admitted {after:?} after the waiting replica was killed (TTL 1 s)");
    assert_eq!(tickets(&redis), 0, "no ticket of the dead replica left");
    wait_for_budget(&survivor, 0, WAIT).await;
}

/// Kills and reaps the child replica when dropped, whatever happens to the test.
struct Reaper<'a>(&'a mut std::process::Child);

fn scopeguard(child: &mut std::process::Child) -> Reaper<'_> {
    Reaper(child)
}

impl Reaper<'_> {
    /// Kills the child now (SIGKILL); returns when.
    fn kill(&mut self) -> Instant {
        self.0.kill().expect("kill the child replica");
        self.0.wait().expect("reap");
        Instant::now()
    }
}

impl Drop for Reaper<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
