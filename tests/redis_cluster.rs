//! The Redis ledger on a real Redis Cluster and behind real Sentinels (no mocks): a
//! three-master cluster (`redis-server --cluster-enabled yes` three times, joined by
//! `redis-cli --cluster create`) holding many tenants' caps and a shared budget in
//! different slots; and a master, its replica and a Sentinel, with the master killed while
//! a stream is held.
//!
//! Each test starts its own servers on loopback ports. Without `redis-server` and
//! `redis-cli` installed, each says loudly that it was skipped, and fails instead when
//! `CI=true`.
#![cfg(feature = "redis")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use common::*;
use http::StatusCode;
use tower_tenant_tokens::redis::{RedisReservation, RedisTokenTracker, RedisTokenTrackerBuilder};
use tower_tenant_tokens::{Error, SharedBudget, TenantTokenLayer};

// ---------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------

/// Whether `redis-server` and `redis-cli` are installed; where not, says so loudly (or
/// fails the test with `CI=true`).
fn tools_or_skip(test: &str) -> bool {
    let found = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok()
    };
    if found("redis-server") && found("redis-cli") {
        return true;
    }
    let how = "install them with `apt-get install -y redis-server` (Debian/Ubuntu; redis-cli \
               comes with it) or `brew install redis` (macOS)";
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("{test} needs redis-server and redis-cli on the PATH; {how}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {test}: redis-server or redis-cli is not on the PATH; {how}. ***\n"
    );
    false
}

/// A server process, killed (SIGKILL) when dropped.
struct Process(Option<Child>);

impl Process {
    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A directory for the servers' files, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        // One per test: tests run at once in one process.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ttt-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr").port()
}

/// A port `p` with `p + 10000` free too (a cluster node's bus), both below Linux's
/// ephemeral range.
fn free_cluster_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let next = NEXT.fetch_add(1, SeqCst) + u64::from(std::process::id()) * 7;
        let candidate = 10_000 + (next * 97 % 9_000) as u16;
        let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free(candidate) && free(candidate + 10_000) {
            return candidate;
        }
    }
}

/// Starts `redis-server` with `args` and waits until it answers on `port`.
fn start_server(port: u16, args: &[&str]) -> Process {
    let child = Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let process = Process(Some(child));
    wait_for("the server to answer PING", Duration::from_secs(10), || {
        cli(port, &["PING"]) == "PONG"
    });
    process
}

/// `redis-cli -p port args…`: its output, trimmed.
fn cli(port: u16, args: &[&str]) -> String {
    let mut command = Command::new("redis-cli");
    command
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args);
    run(command, 2 * WAIT).1
}

/// Keys on the server on `port` besides idle tenants' lease hashes: a tenant's hash
/// outlives its last lease (holding no lease and `=sum` 0) until it expires, and anything
/// else should be gone once everything ends.
fn leftover_keys(port: u16) -> u64 {
    let keys = cli(port, &["--scan"]);
    let idle = |key: &str| {
        key.ends_with(":tokens")
            && cli(port, &["HLEN", key]) == "3"
            && cli(port, &["HGET", key, "=sum"]) == "0"
    };
    keys.lines().filter(|key| !idle(key)).count() as u64
}

/// Runs `command` to its end (killed, failing the test, if it takes longer than
/// `limit`): whether it succeeded, and its output, trimmed.
fn run(mut command: Command, limit: Duration) -> (bool, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run redis-cli");
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut output = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut output);
        output
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for redis-cli") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let output = reader.join().expect("read redis-cli's output");
    (status.success(), output.trim().to_owned())
}

/// Waits (blocking) until `condition` holds, failing the test after `limit`.
fn wait_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long `redis-cli --cluster create` may take to form a cluster: the harness's
/// patience with the tool, not a bound on anything the crate does.
const CLUSTER_FORMS_WITHIN: Duration = Duration::from_secs(60);

/// Three masters, every slot assigned; with replicas, one replica each, listed after the
/// masters in `ports`.
struct Cluster {
    ports: Vec<u16>,
    servers: Vec<Process>,
    _scratch: Scratch,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(false)
    }

    /// With `replicas`, each master has one, writable (so a test can make it lag behind
    /// its master), and a master is failed over one second after it stops answering.
    fn start_with(replicas: bool) -> Cluster {
        let scratch = Scratch::new("cluster");
        let nodes = if replicas { 6 } else { 3 };
        let ports: Vec<u16> = (0..nodes).map(|_| free_cluster_port()).collect();
        let dir = scratch.0.to_str().expect("a UTF-8 temp dir").to_owned();
        let servers = ports
            .iter()
            .map(|port| {
                let (port_arg, conf) = (port.to_string(), format!("nodes-{port}.conf"));
                let mut args = vec![
                    "--port",
                    &port_arg,
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--dir",
                    &dir,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--loglevel",
                    "warning",
                ];
                if replicas {
                    args.extend([
                        "--cluster-node-timeout",
                        "1000",
                        "--replica-read-only",
                        "no",
                        "--repl-diskless-sync-delay",
                        "0",
                    ]);
                }
                start_server(*port, &args)
            })
            .collect();
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]).args(&addresses).args([
            "--cluster-replicas",
            if replicas { "1" } else { "0" },
            "--cluster-yes",
        ]);
        // redis-cli polls once a second until every node agrees on the slots; with the
        // other tests' clusters forming on the same cores at once, that can take a while.
        let (created, output) = run(create, CLUSTER_FORMS_WITHIN);
        assert!(created, "redis-cli --cluster create failed: {output}");
        let known = format!("cluster_known_nodes:{nodes}");
        for port in &ports {
            wait_for("cluster_state:ok", Duration::from_secs(20), || {
                let info = cli(*port, &["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains(&known)
            });
        }
        let mut cluster = Cluster {
            ports,
            servers,
            _scratch: scratch,
        };
        if replicas {
            // Masters first, in the order of `ports`, then their replicas.
            let mut masters = Vec::new();
            let mut replicas = Vec::new();
            for (port, server) in cluster.ports.iter().zip(cluster.servers.drain(..)) {
                if cli(*port, &["ROLE"]).starts_with("master") {
                    masters.push((*port, server));
                } else {
                    replicas.push((*port, server));
                }
            }
            for (port, _) in &replicas {
                wait_for("the replica to sync", Duration::from_secs(20), || {
                    cli(*port, &["INFO", "replication"]).contains("master_link_status:up")
                });
            }
            (cluster.ports, cluster.servers) = masters.into_iter().chain(replicas).unzip();
        }
        cluster
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The port of the master serving `key`'s slot.
    fn owner(&self, key: &str) -> u16 {
        Self::owner_by(self.ports[0], key).expect("a master serves every slot")
    }

    /// The port of the master serving `key`'s slot, as the node on `port` knows it.
    fn owner_by(port: u16, key: &str) -> Option<u16> {
        let slot: u16 = cli(port, &["CLUSTER", "KEYSLOT", key])
            .parse()
            .expect("a slot");
        let nodes = cli(port, &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .expect("host:port@bus");
            for range in &fields[8..] {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                let (start, end): (u16, u16) = (start.parse().unwrap(), end.parse().unwrap());
                if (start..=end).contains(&slot) {
                    return Some(port);
                }
            }
        }
        None
    }

    /// Keys on each master besides idle tenants' lease hashes (see [`leftover_keys`]).
    fn key_counts(&self) -> Vec<u64> {
        self.ports.iter().map(|port| leftover_keys(*port)).collect()
    }
}

// ---------------------------------------------------------------------------------------
// A three-master cluster
// ---------------------------------------------------------------------------------------

/// Test-sized leases: several renewals within a second.
fn builder(cap: u64) -> RedisTokenTrackerBuilder {
    RedisTokenTracker::builder(cap)
        .lease_ttl(Duration::from_millis(1_000))
        .renew_every(Duration::from_millis(250))
        .call_timeout(Duration::from_millis(500))
}

fn tenant_key(tenant: &str) -> String {
    format!("tenant-tokens:{{t:{tenant}}}:tokens")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_master_cluster_holds_every_cap_and_leaves_nothing_behind() {
    if !tools_or_skip("a_three_master_cluster_holds_every_cap_and_leaves_nothing_behind") {
        return;
    }
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let ready = started.elapsed();
    const CAP: u64 = 1_000;
    let tracker = builder(CAP).connect_cluster(cluster.urls()).expect("urls");
    let other = builder(CAP)
        .connect_cluster(cluster.urls().split_off(2))
        .expect("one node is enough");

    // Forty tenants, landing on every master.
    let tenants: Vec<String> = (0..40).map(|n| format!("tenant-{n}")).collect();
    let owners: BTreeSet<u16> = tenants
        .iter()
        .map(|t| cluster.owner(&tenant_key(t)))
        .collect();
    assert_eq!(
        owners.len(),
        3,
        "the tenants' slots are spread over the masters"
    );
    let mut held = Vec::new();
    for (n, tenant) in tenants.iter().enumerate() {
        let by = if n % 2 == 0 { &tracker } else { &other };
        held.push(by.reserve(tenant, 600).await.expect("fits"));
        match by.reserve(tenant, 500).await {
            Err(Error::TenantOverloaded { in_flight, cap, .. }) => {
                assert_eq!((in_flight, cap), (600, CAP));
            }
            other => panic!("{tenant}: expected a refusal over the cap, got {other:?}"),
        }
        held.push(other.reserve(tenant, 400).await.expect("fits exactly"));
    }
    assert!(
        cluster.key_counts().iter().all(|&keys| keys > 0),
        "every master holds some tenants' keys: {:?}",
        cluster.key_counts()
    );

    // Renewal crosses slots (one pipeline per slot): held past the TTL, nothing is lost.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    for tenant in &tenants {
        assert_eq!(tracker.in_flight(tenant).await.unwrap(), CAP, "{tenant}");
    }
    assert_eq!(tracker.stats().lost_leases + other.stats().lost_leases, 0);
    assert!(held.iter().all(|r| !r.is_lost()));

    // Every master forgets the scripts: renewals and reservations load them again.
    for port in &cluster.ports {
        assert_eq!(cli(*port, &["SCRIPT", "FLUSH"]), "OK");
    }
    // Past a whole TTL: the leases live only if the renewals reloaded the script.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    for tenant in &tenants {
        assert_eq!(other.in_flight(tenant).await.unwrap(), CAP, "{tenant}");
    }
    assert_eq!(tracker.stats().lost_leases + other.stats().lost_leases, 0);

    // The listing walks every master.
    let listed = tracker.tenants_in_flight(100).await.expect("listed");
    let expected: Vec<(String, u64)> = {
        let mut all: Vec<_> = tenants.iter().map(|t| (t.clone(), CAP)).collect();
        all.sort();
        all
    };
    assert_eq!(listed, expected);
    let few = tracker.tenants_in_flight(5).await.expect("listed");
    assert_eq!(few.len(), 5);

    // Forty tenants reserving at once: batched together, each call kept to one slot.
    let burst: Vec<_> = tenants
        .iter()
        .map(|tenant| {
            let (tracker, tenant) = (tracker.clone(), format!("burst-{tenant}"));
            tokio::spawn(async move { tracker.reserve(&tenant, 10).await })
        })
        .collect();
    for reservation in burst {
        let reservation = reservation.await.unwrap().expect("admitted");
        reservation.release().await;
    }

    // Two trackers racing for four tenants: never over the cap.
    let peak = Arc::new(Mutex::new(BTreeMap::<usize, (u64, u64)>::new()));
    let workers: Vec<_> = (0..16_u64)
        .map(|worker| {
            let by = if worker % 2 == 0 {
                tracker.clone()
            } else {
                other.clone()
            };
            let peak = peak.clone();
            tokio::spawn(async move {
                for round in 0..20_u64 {
                    let tenant = ((worker + round) % 4) as usize;
                    let name = format!("racer-{tenant}");
                    let tokens = 100 + (worker * 37 + round * 91) % 300;
                    let reservation = match by.reserve(&name, tokens).await {
                        Ok(reservation) => reservation,
                        Err(Error::TenantOverloaded { .. }) => continue,
                        Err(other) => panic!("{name}: {other}"),
                    };
                    {
                        let mut peak = peak.lock().unwrap();
                        let (now, max) = peak.entry(tenant).or_default();
                        *now += tokens;
                        *max = (*max).max(*now);
                    }
                    tokio::time::sleep(Duration::from_millis(round % 3)).await;
                    peak.lock().unwrap().get_mut(&tenant).unwrap().0 -= tokens;
                    reservation.release().await;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    for (tenant, (_, max)) in peak.lock().unwrap().iter() {
        assert!(*max <= CAP, "racer-{tenant} held {max} on a cap of {CAP}");
        assert!(*max > 0);
    }

    // Headroom on a cluster: each tenant's its own lease on its own master, counted there,
    // and released when the tracker goes.
    let with_headroom = builder(CAP)
        .local_headroom(20)
        .connect_cluster(cluster.urls())
        .expect("urls");
    let roomy: Vec<String> = (0..6).map(|n| format!("roomy-{n}")).collect();
    let mut drawn_here = Vec::new();
    for tenant in &roomy {
        drawn_here.push(drawn(&with_headroom, tenant, 50).await);
        let counted = tracker.in_flight(tenant).await.unwrap();
        assert!((50..=CAP).contains(&counted), "{tenant} counts {counted}");
    }
    let masters: BTreeSet<u16> = roomy
        .iter()
        .map(|t| cluster.owner(&tenant_key(t)))
        .collect();
    assert!(masters.len() > 1, "the headrooms are on one master only");
    drop(drawn_here);
    drop(with_headroom);
    for tenant in &roomy {
        wait_shared(&tracker, tenant, 0).await;
    }

    // Released: nothing left on any master.
    for reservation in held {
        reservation.release().await;
    }
    let mut keys = cluster.key_counts();
    let deadline = Instant::now() + WAIT;
    while keys.iter().any(|&k| k > 0) && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
        keys = cluster.key_counts();
    }
    assert_eq!(keys, [0, 0, 0], "no key left on any master");
    assert!(tracker.tenants_in_flight(100).await.unwrap().is_empty());
    println!(
        "cluster: 3 masters ready in {ready:?}; whole test {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_on_another_master_stays_all_or_nothing_with_the_tenant() {
    if !tools_or_skip("a_budget_on_another_master_stays_all_or_nothing_with_the_tenant") {
        return;
    }
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let tenants = builder(1_000)
        .connect_cluster(cluster.urls())
        .expect("urls");
    let budget = || {
        builder(1_500)
            .key_prefix("budget:")
            .connect_cluster(cluster.urls())
            .expect("urls")
    };
    let (upstream, observer) = (budget(), budget());
    let budget_master = cluster.owner("budget:{t:upstream}:tokens");
    // Three tenants whose keys live on masters other than the budget's.
    let names: Vec<String> = (0..)
        .map(|n| format!("tenant-{n}"))
        .filter(|t| cluster.owner(&tenant_key(t)) != budget_master)
        .take(3)
        .collect();
    let (acme, globex, initech) = (&names[0], &names[1], &names[2]);

    let (source, mut streams) = streams();
    let app = Router::new()
        .route(
            "/stream",
            post(move || {
                let source = source.clone();
                async move { source.body() }
            }),
        )
        .layer(
            TenantTokenLayer::new(tenants.clone())
                .shared_budget(SharedBudget::new("upstream", upstream)),
        );
    let server = serve(app).await;
    let client = client();

    let first = send(&client, metered(&server, "/stream", acme, 600)).await;
    assert_eq!(first.status(), StatusCode::OK);
    let first_chunks = streams.next().await;
    let second = send(&client, metered(&server, "/stream", globex, 800)).await;
    assert_eq!(second.status(), StatusCode::OK);
    let second_chunks = streams.next().await;
    assert_eq!(observer.in_flight("upstream").await.unwrap(), 1_400);

    // The tenant fits, the budget does not: nothing held for the tenant.
    let refused = call(&client, metered(&server, "/stream", initech, 200)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "budget_exceeded");
    assert_eq!(tenants.in_flight(initech).await.unwrap(), 0);
    assert_eq!(observer.in_flight("upstream").await.unwrap(), 1_400);

    // The budget fits, the tenant does not: the budget's lease is undone.
    drop(second_chunks);
    assert_eq!(read(second).await.status, StatusCode::OK);
    wait_shared(&observer, "upstream", 600).await;
    let refused = call(&client, metered(&server, "/stream", acme, 450)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "rate_limit_exceeded");
    wait_shared(&observer, "upstream", 600).await;
    assert_eq!(tenants.in_flight(acme).await.unwrap(), 600);

    drop(first_chunks);
    assert_eq!(read(first).await.status, StatusCode::OK);
    wait_shared(&observer, "upstream", 0).await;
    wait_shared(&tenants, acme, 0).await;
    assert_eq!(cluster.key_counts(), [0, 0, 0], "no key left on any master");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_on_two_replicas_keep_one_order_on_the_budgets_master() {
    if !tools_or_skip("waiting_requests_on_two_replicas_keep_one_order_on_the_budgets_master") {
        return;
    }
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let budget_master = cluster.owner("budget:{t:upstream}:tokens");
    // Each replica: its own trackers on the cluster, a layer that waits, classes from a
    // header; every request admitted is logged with the time.
    let admitted: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let (source, mut streams) = streams();
    let replica = |source: StreamSource| {
        let tenants = builder(1_000_000)
            .connect_cluster(cluster.urls())
            .expect("urls");
        let upstream = builder(1_000)
            .key_prefix("budget:")
            .connect_cluster(cluster.urls())
            .expect("urls");
        let seen = admitted.clone();
        Router::new()
            .route(
                "/stream",
                post(move |headers: http::HeaderMap| {
                    let tenant = headers["x-tenant-id"].to_str().unwrap().to_owned();
                    seen.lock().unwrap().push((tenant, Instant::now()));
                    async { "answer" }
                }),
            )
            .route(
                "/hold",
                post(move || {
                    let body = source.body();
                    async move { body }
                }),
            )
            .layer(
                TenantTokenLayer::new(tenants)
                    .shared_budget(SharedBudget::new("upstream", upstream))
                    .wait_for_capacity(Duration::from_secs(10))
                    .priority_header(http::HeaderName::from_static("x-priority")),
            )
    };
    let (one, two) = (
        serve(replica(source.clone())).await,
        serve(replica(source)).await,
    );
    let observer = builder(1_000)
        .key_prefix("budget:")
        .connect_cluster(cluster.urls())
        .expect("urls");
    let holding = send(&client(), metered(&one, "/hold", "holder", 1_000)).await;
    assert_eq!(holding.status(), StatusCode::OK);
    let chunks = streams.next().await;

    let spawn = |server: &TestServer, tenant: &'static str, class: &'static str| {
        let mut request = metered(server, "/stream", tenant, 600);
        request
            .headers_mut()
            .insert("x-priority", class.parse().unwrap());
        tokio::spawn(async move { call(&client(), request).await })
    };
    let mut waiting = vec![spawn(&two, "a", "standard")];
    tokio::time::sleep(Duration::from_millis(30)).await;
    waiting.push(spawn(&two, "b", "standard"));
    tokio::time::sleep(Duration::from_millis(30)).await;
    waiting.push(spawn(&one, "c", "critical"));
    // The tickets wait on the budget's master, next to its leases.
    let deadline = Instant::now() + WAIT;
    while cli(budget_master, &["ZCARD", "budget:{t:upstream}:q:deadlines"]) != "3" {
        assert!(
            Instant::now() < deadline,
            "three tickets on the budget's master"
        );
        tokio::time::sleep(POLL).await;
    }

    let released = Instant::now();
    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    for request in waiting {
        let reply = within("a waiting request", request).await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
    }
    let order = admitted.lock().unwrap().clone();
    let tenants: Vec<&str> = order.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(tenants.len(), 3, "{tenants:?}");
    assert_eq!(tenants[0], "c", "the critical request first: {tenants:?}");
    eprintln!(
        "cluster: release to the critical request's admission on the other replica {:?}",
        order[0].1 - released
    );
    wait_shared(&observer, "upstream", 0).await;
    // Nothing left but the tenants' counters on the budget's master (they expire).
    let deadline = Instant::now() + WAIT;
    while cli(
        budget_master,
        &["EXISTS", "budget:{t:upstream}:q:deadlines"],
    ) != "0"
    {
        assert!(Instant::now() < deadline, "a ticket left behind");
        tokio::time::sleep(POLL).await;
    }
    let counts = cluster.key_counts();
    assert_eq!(counts.iter().sum::<u64>(), 1, "{counts:?}");
    assert_eq!(
        cli(budget_master, &["EXISTS", "budget:{t:upstream}:q:vtc"]),
        "1"
    );
}

/// Polls the shared count of `tenant` until it is `expected`.
async fn wait_shared(tracker: &RedisTokenTracker, tenant: &str, expected: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = tracker.in_flight(tenant).await.ok();
        if now == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "in_flight({tenant}) is {now:?}, expected {expected}"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test]
async fn cluster_and_sentinel_addresses_are_checked_when_built() {
    let empty: [&str; 0] = [];
    assert!(RedisTokenTracker::builder(1)
        .connect_cluster(empty)
        .is_err());
    assert!(RedisTokenTracker::builder(1)
        .connect_cluster(["redis://127.0.0.1:1", "not a url"])
        .is_err());
    assert!(RedisTokenTracker::builder(1)
        .connect_sentinel(empty, "main")
        .is_err());
    assert!(RedisTokenTracker::builder(1)
        .connect_sentinel(["redis://127.0.0.1:1"], "")
        .is_err());
    // Nothing listens there: built all the same (connected on first use), and the
    // failure policy answers.
    let nobody = RedisTokenTracker::builder(1_000)
        .call_timeout(Duration::from_millis(300))
        .connect_sentinel(["redis://127.0.0.1:1"], "main")
        .expect("a valid address");
    assert!(matches!(
        nobody.reserve("acme", 10).await,
        Err(Error::BackendUnavailable { .. })
    ));
}

#[test]
fn cluster_and_sentinel_need_a_runtime() {
    let error = RedisTokenTracker::builder(1)
        .connect_cluster(["redis://127.0.0.1:1"])
        .unwrap_err();
    assert!(error.to_string().contains("tokio runtime"), "{error}");
    let error = RedisTokenTracker::builder(1)
        .connect_sentinel(["redis://127.0.0.1:1"], "main")
        .unwrap_err();
    assert!(error.to_string().contains("tokio runtime"), "{error}");
}

// ---------------------------------------------------------------------------------------
// A master, a replica and a Sentinel
// ---------------------------------------------------------------------------------------

const MASTER_NAME: &str = "ttt";

struct Sentinelled {
    master: u16,
    replica: u16,
    sentinel: u16,
    master_process: Process,
    _replica_process: Process,
    _sentinel_process: Process,
    _scratch: Scratch,
}

impl Sentinelled {
    fn start() -> Sentinelled {
        let scratch = Scratch::new("sentinel");
        let (master, replica, sentinel) = (free_port(), free_port(), free_port());
        let dir = scratch.0.to_str().expect("a UTF-8 temp dir").to_owned();
        let common = [
            "--dir",
            &dir,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
        ];
        let master_process = start_server(
            master,
            // The replica syncs at once (no wait for more replicas to sync with).
            &[
                &[
                    "--port",
                    &master.to_string(),
                    "--repl-diskless-sync-delay",
                    "0",
                ][..],
                &common,
            ]
            .concat(),
        );
        let upstream = master.to_string();
        // Writable, so the test can make it lag behind the master (see below).
        let replica_args = [
            "--port",
            &replica.to_string(),
            "--replicaof",
            "127.0.0.1",
            &upstream,
            "--replica-read-only",
            "no",
        ];
        let replica_process = start_server(replica, &[&replica_args[..], &common].concat());
        wait_for("the replica to sync", Duration::from_secs(10), || {
            cli(replica, &["INFO", "replication"]).contains("master_link_status:up")
        });
        let conf = scratch.0.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {sentinel}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 200\n\
                 sentinel failover-timeout {MASTER_NAME} 1000\n\
                 sentinel known-replica {MASTER_NAME} 127.0.0.1 {replica}\n",
                dir = scratch.0.display(),
            ),
        )
        .expect("write sentinel.conf");
        let sentinel_process = start_server(
            sentinel,
            &[
                conf.to_str().expect("a UTF-8 path"),
                "--sentinel",
                "--loglevel",
                "warning",
            ],
        );
        wait_for(
            "the sentinel to know the replica",
            Duration::from_secs(15),
            || cli(sentinel, &["SENTINEL", "REPLICAS", MASTER_NAME]).contains(&replica.to_string()),
        );
        Sentinelled {
            master,
            replica,
            sentinel,
            master_process,
            _replica_process: replica_process,
            _sentinel_process: sentinel_process,
            _scratch: scratch,
        }
    }

    /// The master's port, as the Sentinel names it.
    fn named_master(&self) -> Option<u16> {
        Self::probe(self.sentinel)()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed_and_lost_leases_are_registered_again() {
    if !tools_or_skip("a_sentinel_failover_is_followed_and_lost_leases_are_registered_again") {
        return;
    }
    let started = Instant::now();
    let mut redis = tokio::task::spawn_blocking(Sentinelled::start)
        .await
        .unwrap();
    let ready = started.elapsed();
    assert_eq!(redis.named_master(), Some(redis.master));
    const CAP: u64 = 1_000;
    const RENEW_EVERY: Duration = Duration::from_millis(250);
    let sentinel_url = format!("redis://127.0.0.1:{}", redis.sentinel);
    let tracker = RedisTokenTracker::builder(CAP)
        .lease_ttl(Duration::from_secs(5))
        .renew_every(RENEW_EVERY)
        .call_timeout(Duration::from_millis(300))
        .circuit_breaker(3, Duration::from_millis(100))
        .connect_sentinel([sentinel_url.as_str()], MASTER_NAME)
        .expect("a sentinel url");

    // Two streams held: one the replica has, one it lacks when promoted.
    let (kept, lagged) = ("kept", "lagged");
    let kept_stream = tracker.reserve(kept, 600).await.expect("fits");
    let lagged_stream = tracker.reserve(lagged, 600).await.expect("fits");
    let replicated =
        |tenant: &str| cli(redis.replica, &["HGET", &tenant_key(tenant), "=sum"]) == "600";
    wait_for("replication", WAIT, || {
        replicated(kept) && replicated(lagged)
    });

    // What the test holds per tenant: the streams, and contenders that come and go.
    let held: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(600), AtomicU64::new(600)]);
    let samples = Arc::new(Mutex::new(Vec::<(Instant, [u64; 2])>::new()));
    let answered = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let over_cap_admissions = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let contenders: Vec<_> = [kept, lagged]
        .into_iter()
        .enumerate()
        .map(|(index, tenant)| {
            let (tracker, held, answered) = (tracker.clone(), held.clone(), answered.clone());
            let (over, stop) = (over_cap_admissions.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(SeqCst) {
                    match tracker.reserve(tenant, 500).await {
                        Ok(reservation) => {
                            answered.lock().unwrap().push(Instant::now());
                            if held[index].fetch_add(500, SeqCst) + 500 > CAP {
                                over.fetch_add(1, SeqCst);
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            held[index].fetch_sub(500, SeqCst);
                            reservation.release().await;
                        }
                        Err(Error::TenantOverloaded { .. }) => {
                            answered.lock().unwrap().push(Instant::now());
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect();
    let sampler = {
        let (held, samples, stop) = (held.clone(), samples.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(SeqCst) {
                let now = [held[0].load(SeqCst), held[1].load(SeqCst)];
                samples.lock().unwrap().push((Instant::now(), now));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        over_cap_admissions.load(SeqCst),
        0,
        "nothing over the cap before the failover"
    );

    // A replica lagging behind its master: it never got `lagged`'s lease. The master takes
    // no more writes (a renewal would carry the lease over again) before it dies.
    assert_eq!(
        cli(redis.master, &["CLIENT", "PAUSE", "60000", "WRITE"]),
        "OK"
    );
    assert_eq!(cli(redis.replica, &["DEL", &tenant_key(lagged)]), "1");

    // The master dies; the Sentinel promotes the replica; the tracker follows.
    let killed = Instant::now();
    redis.master_process.kill();
    let promoted = promotion(&redis).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tracker.stats().lost_leases == 0 || !lagged_stream.is_lost() {
        assert!(
            Instant::now() < deadline,
            "the lost lease was never registered again"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let registered = Instant::now();
    // The contenders' first answer from the new master (they may still be backing off
    // from the dead one's errors when the lease is registered again).
    let deadline = Instant::now() + Duration::from_secs(10);
    let followed = loop {
        let first = answered
            .lock()
            .unwrap()
            .iter()
            .copied()
            .find(|at| *at > killed);
        if let Some(first) = first {
            break first;
        }
        assert!(
            Instant::now() < deadline,
            "the tracker never answered after the failover"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    // One renewal period after the promotion (plus the hold of a contender admitted just
    // before, and the round trips), nothing is over the cap any more; Redis counts every
    // stream.
    const SETTLE: Duration = Duration::from_millis(250 + 50 + 200);
    tokio::time::sleep(SETTLE).await;
    stop.store(true, SeqCst);
    for contender in contenders {
        contender.await.unwrap();
    }
    sampler.await.unwrap();
    let settled = promoted + SETTLE;
    let late: Vec<_> = samples
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, held)| *at > settled && held.iter().any(|&h| h > CAP))
        .cloned()
        .collect();
    assert!(
        late.is_empty(),
        "over the cap after one renewal period: {late:?}"
    );
    assert_eq!(tracker.in_flight(kept).await.unwrap(), 600);
    assert_eq!(tracker.in_flight(lagged).await.unwrap(), 600);
    assert!(
        !kept_stream.is_lost(),
        "the replica had it: nothing to register again"
    );
    assert!(lagged_stream.is_lost());
    match tracker.reserve(lagged, 500).await {
        Err(Error::TenantOverloaded { in_flight, .. }) => assert_eq!(in_flight, 600),
        other => panic!("expected a refusal over the cap, got {other:?}"),
    }

    // Released: nothing left on the new master.
    kept_stream.release().await;
    lagged_stream.release().await;
    wait_for("no key left behind", WAIT, || {
        leftover_keys(redis.replica) == 0
    });
    assert_eq!(redis.named_master(), Some(redis.replica));
    let ms = |at: Instant| at.duration_since(killed).as_millis();
    println!(
        "sentinel failover (ready in {ready:?}): master killed → promoted {} ms → tracker \
         answering {} ms → lost lease registered again {} ms; admissions over the cap in \
         the window: {}; whole test {:?}",
        ms(promoted),
        ms(followed),
        ms(registered),
        over_cap_admissions.load(SeqCst),
        started.elapsed()
    );
}

impl Sentinelled {
    /// Asks the Sentinel on `port` which master it names, from any thread.
    fn probe(port: u16) -> impl Fn() -> Option<u16> {
        move || {
            let reply = cli(port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]);
            reply.lines().nth(1)?.trim().parse().ok()
        }
    }
}

/// Whether a client other than the Sentinels, the link to a master and the `redis-cli`
/// asking is connected to
/// the server on `port`: the tracker, once it found its way there.
/// When the Sentinel names `redis`'s replica as the master (within 20 s), on a blocking
/// task of its own.
fn promotion(redis: &Sentinelled) -> tokio::task::JoinHandle<Instant> {
    let (sentinel, replica) = (redis.sentinel, redis.replica);
    tokio::task::spawn_blocking(move || {
        let probe = Sentinelled::probe(sentinel);
        wait_for(
            "the sentinel to promote the replica",
            Duration::from_secs(20),
            || probe() == Some(replica),
        );
        Instant::now()
    })
}

/// When `reservation`'s lease, which Redis lost, is registered again (within 30 s).
async fn registered_again(reservation: &RedisReservation) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reservation.is_lost() {
        assert!(
            Instant::now() < deadline,
            "the lost lease was never registered again"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Instant::now()
}

fn tracker_connected(port: u16) -> bool {
    cli(port, &["CLIENT", "LIST"]).lines().any(|client| {
        client.contains(" flags=N ")
            && !client.contains(" name=sentinel")
            && !client.contains(" cmd=client")
    })
}

/// The scenario as a gateway meets it, with the default lease settings (renewal every
/// 10 s): a stream of 800 on a cap of 1,000, the replica lacking its lease, the master
/// killed, the replica promoted. With `requests`, a contender asks for 800 every 100 ms
/// throughout; without, nothing but the tracker itself talks to Redis. Either way the
/// stream is counted again within moments of the promotion, and then a second 800 is
/// refused. Returns promotion → the tracker connected to the new master → the lease
/// registered again.
async fn sentinel_failover_with_default_leases(test: &str, requests: bool) -> Option<String> {
    if !tools_or_skip(test) {
        return None;
    }
    let mut redis = tokio::task::spawn_blocking(Sentinelled::start)
        .await
        .unwrap();
    const CAP: u64 = 1_000;
    let sentinel_url = format!("redis://127.0.0.1:{}", redis.sentinel);
    let tracker = RedisTokenTracker::builder(CAP)
        .connect_sentinel([sentinel_url.as_str()], MASTER_NAME)
        .expect("a sentinel url");
    let stream = tracker.reserve("acme", 800).await.expect("fits");
    wait_for("replication", WAIT, || {
        cli(redis.replica, &["HGET", &tenant_key("acme"), "=sum"]) == "800"
    });
    assert!(
        !tracker_connected(redis.replica),
        "{}",
        cli(redis.replica, &["CLIENT", "LIST"])
    );

    let admitted = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let contender = requests.then(|| {
        let (tracker, admitted, stop) = (tracker.clone(), admitted.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(SeqCst) {
                if let Ok(reservation) = tracker.reserve("acme", 800).await {
                    admitted.lock().unwrap().push(Instant::now());
                    reservation.release().await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });

    // The replica lags: it never got the stream's lease.
    assert_eq!(
        cli(redis.master, &["CLIENT", "PAUSE", "60000", "WRITE"]),
        "OK"
    );
    assert_eq!(cli(redis.replica, &["DEL", &tenant_key("acme")]), "1");
    // When the Sentinel announces the promotion, as the tracker may hear it.
    let announced = {
        let client = redis::Client::open(sentinel_url.as_str()).expect("url");
        let mut pubsub = client.get_async_pubsub().await.expect("subscribe");
        pubsub.subscribe("+switch-master").await.expect("subscribe");
        tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            futures_util::StreamExt::next(&mut messages).await;
            Instant::now()
        })
    };
    redis.master_process.kill();
    let replica = redis.replica;
    let named = promotion(&redis);
    let connected = tokio::task::spawn_blocking(move || {
        wait_for(
            "the tracker to connect to the new master",
            Duration::from_secs(30),
            || tracker_connected(replica),
        );
        Instant::now()
    });
    let registered = registered_again(&stream).await;
    named.await.unwrap();
    let (promoted, connected) = (announced.await.unwrap(), connected.await.unwrap());
    let after = |at: Instant| {
        at.saturating_duration_since(promoted).as_millis() as i128
            - promoted.saturating_duration_since(at).as_millis() as i128
    };
    let window = registered.saturating_duration_since(promoted);
    assert!(
        window <= Duration::from_secs(3),
        "counted again {window:?} after the promotion"
    );

    // Counted again: nothing more fits, whoever asks.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, SeqCst);
    if let Some(contender) = contender {
        contender.await.unwrap();
    }
    let late: Vec<_> = admitted
        .lock()
        .unwrap()
        .iter()
        .filter(|at| **at > registered + Duration::from_millis(100))
        .map(|at| at.duration_since(registered))
        .collect();
    assert!(late.is_empty(), "admitted over the cap after: {late:?}");
    assert_eq!(tracker.in_flight("acme").await.unwrap(), 800);
    assert_eq!(
        cli(redis.replica, &["HGET", &tenant_key("acme"), "=sum"]),
        "800"
    );
    match tracker.reserve("acme", 800).await {
        Err(Error::TenantOverloaded { in_flight, .. }) => assert_eq!(in_flight, 800),
        other => panic!("expected a refusal over the cap, got {other:?}"),
    }
    let in_window = admitted
        .lock()
        .unwrap()
        .iter()
        .filter(|at| **at > promoted && **at <= registered)
        .count();
    stream.release().await;
    wait_for("no key left behind", WAIT, || {
        leftover_keys(redis.replica) == 0
    });
    let figures = format!(
        "promotion → tracker connected {} ms → stream counted again {} ms \
         (admissions of 800 in the window: {in_window})",
        after(connected),
        after(registered),
    );
    println!("sentinel failover, default leases, requests {requests}: {figures}");
    Some(figures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_default_leases_a_sentinel_failover_counts_the_stream_again_within_moments() {
    sentinel_failover_with_default_leases(
        "with_default_leases_a_sentinel_failover_counts_the_stream_again_within_moments",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_default_leases_an_idle_replica_follows_a_sentinel_failover() {
    sentinel_failover_with_default_leases(
        "with_default_leases_an_idle_replica_follows_a_sentinel_failover",
        false,
    )
    .await;
}

impl Cluster {
    /// The port of `master`'s replica, once the node on `port` knows it.
    fn replica_of(port: u16, master: u16) -> u16 {
        let mut found = None;
        wait_for(
            "the master's replica to be known",
            Duration::from_secs(10),
            || {
                found = Self::known_replica_of(port, master);
                found.is_some()
            },
        );
        found.expect("found")
    }

    fn known_replica_of(port: u16, master: u16) -> Option<u16> {
        let nodes = cli(port, &["CLUSTER", "NODES"]);
        let lines: Vec<Vec<&str>> = nodes
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        let port_of = |fields: &[&str]| -> u16 {
            fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .expect("host:port@bus")
        };
        let id = lines
            .iter()
            .find(|fields| port_of(fields) == master)
            .map(|fields| fields[0])?;
        lines
            .iter()
            .find(|fields| fields[2].contains("slave") && fields[3] == id)
            .map(|fields| port_of(fields))
    }
}

/// `HGET key field` on a cluster replica (which answers reads once told `READONLY`).
fn read_on_replica(port: u16, key: &str, field: &str) -> Option<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("url");
    let mut conn = client.get_connection().expect("connect");
    redis::cmd("READONLY")
        .query::<()>(&mut conn)
        .expect("READONLY");
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query(&mut conn)
        .expect("HGET")
}

/// A master of a three-master cluster (one replica each) killed while a stream is held on
/// a tenant of its slots, its replica lacking the stream's lease, with the default lease
/// settings: once the cluster has promoted the replica (a `cluster-node-timeout` of one
/// second here), the stream is counted again within moments, on the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_default_leases_a_cluster_failover_counts_the_stream_again_within_moments() {
    let test = "with_default_leases_a_cluster_failover_counts_the_stream_again_within_moments";
    if !tools_or_skip(test) {
        return;
    }
    const NODE_TIMEOUT: Duration = Duration::from_millis(1_000);
    const CAP: u64 = 1_000;
    let started = Instant::now();
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start_with(true))
        .await
        .unwrap();
    let ready = started.elapsed();
    let tracker = RedisTokenTracker::builder(CAP)
        .connect_cluster(cluster.urls())
        .expect("cluster urls");
    let key = tenant_key("acme");
    let master = cluster.owner(&key);
    let index = cluster.ports.iter().position(|p| *p == master).unwrap();
    let survivor = cluster.ports[(index + 1) % 3];
    let replica = Cluster::replica_of(survivor, master);

    let stream = tracker.reserve("acme", 800).await.expect("fits");
    wait_for("replication", WAIT, || {
        read_on_replica(replica, &key, "=sum").as_deref() == Some("800")
    });
    // The replica lags: it never got the stream's lease.
    assert_eq!(cli(master, &["CLIENT", "PAUSE", "60000", "WRITE"]), "OK");
    assert_eq!(cli(replica, &["FLUSHALL"]), "OK");
    assert_eq!(read_on_replica(replica, &key, "=sum"), None);

    cluster.servers[index].kill();
    let killed = Instant::now();
    let promoted = tokio::task::spawn_blocking({
        let key = key.clone();
        move || {
            wait_for(
                "the cluster to promote the replica",
                Duration::from_secs(20),
                || Cluster::owner_by(survivor, &key) == Some(replica),
            );
            Instant::now()
        }
    });
    let registered = registered_again(&stream).await;
    let promoted = promoted.await.unwrap();
    // How long the cluster takes to promote the replica is its own affair (the node
    // timeout, then an election); the tracker's part is what follows.
    let since_promotion = registered.saturating_duration_since(promoted);
    assert!(
        since_promotion <= Duration::from_secs(2),
        "counted again {since_promotion:?} after the promotion was seen"
    );
    assert_eq!(tracker.in_flight("acme").await.unwrap(), 800);
    assert_eq!(cli(replica, &["HGET", &key, "=sum"]), "800");
    match tracker.reserve("acme", 800).await {
        Err(Error::TenantOverloaded { in_flight, .. }) => assert_eq!(in_flight, 800),
        other => panic!("expected a refusal over the cap, got {other:?}"),
    }
    stream.release().await;
    wait_for("no key left behind", WAIT, || leftover_keys(replica) == 0);
    let ms = |at: Instant| at.duration_since(killed).as_millis();
    println!(
        "cluster failover (ready in {ready:?}, cluster-node-timeout {NODE_TIMEOUT:?}), \
         default leases: master killed → replica promoted {} ms → stream counted again {} ms \
         ({} ms after the promotion was seen); whole test {:?}",
        ms(promoted),
        ms(registered),
        since_promotion.as_millis(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_are_charged_with_each_tenants_lease_in_its_slot() {
    if !tools_or_skip("windows_are_charged_with_each_tenants_lease_in_its_slot") {
        return;
    }
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let tracker = builder(100_000)
        .connect_cluster(cluster.urls())
        .expect("urls");
    let window = tower_tenant_tokens::TokenWindow::per_30_days(1_000);
    let app = Router::new()
        .route("/ok", post(|| async { "ok" }))
        .layer(TenantTokenLayer::new(tracker.clone()).window(window.clone()));
    let server = serve(app).await;
    let client = pooled_client();

    // Tenants on every master: each batch call carries only one slot's keys.
    let tenants: Vec<String> = (0..12).map(|n| format!("tenant-{n}")).collect();
    let masters: BTreeSet<_> = tenants
        .iter()
        .map(|t| cluster.owner(&tenant_key(t)))
        .collect();
    assert_eq!(masters.len(), 3, "the tenants span every master");
    let requests = tenants.iter().flat_map(|tenant| {
        (0..3).map(|_| {
            let (client, request) = (client.clone(), metered(&server, "/ok", tenant, 400));
            tokio::spawn(async move { call(&client, request).await.status })
        })
    });
    let statuses = futures_util::future::join_all(requests).await;
    let admitted = statuses
        .iter()
        .filter(|status| *status.as_ref().unwrap() == StatusCode::OK)
        .count();
    // Two of each tenant's three fit its 1,000 tokens.
    assert_eq!(admitted, 2 * tenants.len());
    for tenant in &tenants {
        let left = tracker.window_remaining(&window, tenant).await.unwrap();
        assert_eq!(left, 200, "{tenant}");
    }
}
