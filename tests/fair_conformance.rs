//! One fair order, stated once (the module notes of `src/admit/queue.rs`, "The fair
//! order"), kept by two queues: the one in this process and the one Redis keeps for a
//! budget shared by replicas. Each script below runs against both, through the layer's
//! public API, and both must admit the same requests in the same order: the order the
//! script spells out, derived from the rule.
//!
//! The budget admits one request at a time, admitted requests hold it until the script
//! releases them, and every step waits until both queues have taken it in (the request is
//! admitted, refused, or counted as waiting, and in Redis each tenant waiting holds its
//! ticket), so the order depends on the rule alone, not on timing.
//!
//! Each run starts its own `redis-server`. Without one installed, the test says loudly that
//! it was skipped, and fails instead when `CI=true`.
#![cfg(all(feature = "redis", feature = "metrics"))]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use common::redis_server::RedisServer;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::BodyExt;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::{Layer, ServiceExt};
use tower_tenant_tokens::body::{RequestBody, ResponseBody};
use tower_tenant_tokens::redis::RedisTokenTracker;
use tower_tenant_tokens::{SharedBudget, TenantTokenLayer, TenantTokenTracker};

/// The budget. Every script keeps to one request running at a time: what runs leaves no
/// room for any request waiting.
const CAP: u64 = 100;
/// The longest a step may take to settle.
const SETTLE: Duration = Duration::from_secs(10);

/// The scripts share the process's one metrics recorder (its gauge of waiting requests
/// is how a step sees a request queued), so they run one at a time.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One step of a script.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Request `id` of `tenant`, in class `class`, for `tokens`, arrives.
    Arrive {
        id: &'static str,
        tenant: &'static str,
        class: &'static str,
        tokens: u64,
    },
    /// The admitted request `id` ends: the budget is free for the next in turn.
    Release(&'static str),
    /// The client of the waiting request `id` goes away.
    Cancel(&'static str),
}

use Step::{Cancel, Release};

/// A standard request.
const fn arrive(id: &'static str, tenant: &'static str, tokens: u64) -> Step {
    Step::Arrive {
        id,
        tenant,
        class: "standard",
        tokens,
    }
}

/// A request in `class`.
const fn arrive_as(
    id: &'static str,
    tenant: &'static str,
    class: &'static str,
    tokens: u64,
) -> Step {
    Step::Arrive {
        id,
        tenant,
        class,
        tokens,
    }
}

struct Script<'a> {
    /// Each tenant's weight; 1 for the others.
    weights: &'a [(&'static str, u32)],
    steps: &'a [Step],
    /// What happened, in order: the ids admitted, and `"<id> <code>"` for a request refused
    /// (`"s1 shed"`). Once the steps are done, the running request is released until none
    /// waits, so every request admitted is listed.
    expected: &'a [&'static str],
}

/// Where the budget is counted, and so which queue orders its waiting requests.
#[derive(Clone, Copy, Debug)]
enum Ledger {
    InProcess,
    Redis,
}

/// Runs `script` against the in-process queue and the Redis queue: both must give what it
/// expects.
async fn conform(name: &str, script: &Script<'_>) {
    let _alone = ALONE.lock().await;
    let Some(redis) = RedisServer::start(name) else {
        return;
    };
    let in_process = run(script, Ledger::InProcess, &redis).await;
    let in_redis = run(script, Ledger::Redis, &redis).await;
    assert_eq!(
        in_process, in_redis,
        "{name}: the two queues disagree (left: in process, right: in Redis)"
    );
    assert_eq!(in_process, script.expected, "{name}: not the rule's order");
}

/// A request's task, which holds its response once admitted until told to release it.
struct Running {
    task: JoinHandle<()>,
    release: Option<oneshot::Sender<()>>,
}

/// What a run has seen so far, and where to look.
struct Run<'a> {
    ledger: Ledger,
    redis: &'a RedisServer,
    log: Arc<Mutex<Vec<String>>>,
    requests: HashMap<&'static str, Running>,
    /// The requests waiting, with their tenants.
    waiting: Vec<(&'static str, &'static str)>,
    /// The requests admitted and not released, in the order admitted.
    running: Vec<&'static str>,
    /// How many were admitted.
    admitted: usize,
}

async fn run(script: &Script<'_>, ledger: Ledger, redis: &RedisServer) -> Vec<String> {
    recorder();
    let budget = match ledger {
        Ledger::InProcess => SharedBudget::new("upstream", Arc::new(TenantTokenTracker::new(CAP))),
        Ledger::Redis => {
            assert_eq!(redis.command("FLUSHALL"), "+OK");
            let tracker = RedisTokenTracker::builder(CAP)
                .key_prefix("budget:")
                .lease_ttl(Duration::from_secs(10))
                .renew_every(Duration::from_secs(1))
                .call_timeout(Duration::from_secs(2))
                .connect(redis.url())
                .expect("url");
            SharedBudget::new("upstream", tracker)
        }
    };
    let weights: HashMap<&str, u32> = script.weights.iter().copied().collect();
    let layer = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(1_000_000)))
        .shared_budget(budget)
        .wait_for_capacity(Duration::from_secs(60))
        .priority_header(HeaderName::from_static("x-priority"))
        .tenant_weight(move |tenant| weights.get(tenant).copied().unwrap_or(1));
    let log = Arc::new(Mutex::new(Vec::new()));
    let admitted = log.clone();
    // Answers at once with a body that streams until dropped: the reservation is held
    // until the script releases the response.
    let service = layer.layer(tower::service_fn(
        move |request: Request<RequestBody<Body>>| {
            let id = request.headers()["x-request"].to_str().unwrap().to_owned();
            admitted.lock().unwrap().push(id);
            let body = futures_util::stream::pending::<Result<Bytes, Infallible>>();
            async move { Ok::<_, Infallible>(Response::new(Body::from_stream(body))) }
        },
    ));
    let mut run = Run {
        ledger,
        redis,
        log,
        requests: HashMap::new(),
        waiting: Vec::new(),
        running: Vec::new(),
        admitted: 0,
    };
    for step in script.steps {
        match *step {
            Step::Arrive {
                id,
                tenant,
                class,
                tokens,
            } => {
                let request = Request::post("/")
                    .header("x-tenant-id", tenant)
                    .header("x-token-estimate", tokens)
                    .header("x-priority", class)
                    .header("x-request", id)
                    .body(Body::empty())
                    .unwrap();
                let (release, released) = oneshot::channel();
                let (service, log) = (service.clone(), run.log.clone());
                let task = tokio::spawn(async move {
                    let response: Response<ResponseBody<Body>> =
                        service.oneshot(request).await.unwrap();
                    if response.status() == StatusCode::TOO_MANY_REQUESTS {
                        let body = response.into_body().collect().await.unwrap().to_bytes();
                        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let code = error["error"]["code"].as_str().unwrap().to_owned();
                        log.lock().unwrap().push(format!("{id} {code}"));
                        return;
                    }
                    assert_eq!(response.status(), StatusCode::OK, "{id}");
                    let _ = released.await;
                    drop(response);
                });
                let release = Some(release);
                run.requests.insert(id, Running { task, release });
                run.arrived(id, tenant).await;
            }
            Release(id) => run.release(id).await,
            Cancel(id) => run.cancel(id).await,
        }
    }
    while let Some(&id) = run.running.first() {
        run.release(id).await;
    }
    assert!(
        run.waiting.is_empty(),
        "{ledger:?}: still waiting: {:?}",
        run.waiting
    );
    let log = run.log.lock().unwrap().clone();
    log
}

impl Run<'_> {
    fn logged(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until request `id` of `tenant` is admitted, refused or waiting.
    async fn arrived(&mut self, id: &'static str, tenant: &'static str) {
        self.waiting.push((id, tenant));
        let deadline = Instant::now() + SETTLE;
        loop {
            let log = self.logged();
            if log.iter().any(|seen| *seen == id) {
                self.waiting.pop();
                self.running.push(id);
                self.admitted += 1;
                break;
            }
            if log.iter().any(|seen| {
                seen.strip_prefix(id)
                    .is_some_and(|code| code.starts_with(' '))
            }) {
                self.waiting.pop();
                self.requests.remove(id).unwrap().task.await.unwrap();
                break;
            }
            if self.is_settled() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{:?}: {id} neither got in nor waits: {}",
                self.ledger,
                self.state()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.settle().await;
    }

    /// Releases the admitted request `id`, and waits until the next in turn, if any, is
    /// admitted.
    async fn release(&mut self, id: &'static str) {
        let at = self.running.iter().position(|running| *running == id);
        let at = at
            .unwrap_or_else(|| panic!("{:?}: {id} is not running: {}", self.ledger, self.state()));
        self.running.remove(at);
        let mut request = self.requests.remove(id).expect("arrived");
        let before = self.logged().len();
        let _ = request.release.take().expect("held").send(());
        request.task.await.unwrap();
        if !self.waiting.is_empty() {
            let deadline = Instant::now() + SETTLE;
            loop {
                let log = self.logged();
                if let Some(next) = log.get(before) {
                    let at = self.waiting.iter().position(|(id, _)| **id == **next);
                    let at = at.unwrap_or_else(|| panic!("{next} got in, but was not waiting"));
                    self.running.push(self.waiting.remove(at).0);
                    self.admitted += 1;
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{:?}: nothing got in after {id} ended: {}",
                    self.ledger,
                    self.state()
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        self.settle().await;
    }

    /// The client of the waiting request `id` goes away.
    async fn cancel(&mut self, id: &'static str) {
        let at = self.waiting.iter().position(|(waiting, _)| *waiting == id);
        let at = at
            .unwrap_or_else(|| panic!("{:?}: {id} is not waiting: {}", self.ledger, self.state()));
        self.waiting.remove(at);
        let request = self.requests.remove(id).expect("arrived");
        request.task.abort();
        assert!(request.task.await.unwrap_err().is_cancelled());
        self.settle().await;
    }

    /// Whether both queues have taken in what happened: as many requests wait as the
    /// script has waiting, and in Redis each tenant waiting holds one ticket.
    fn is_settled(&self) -> bool {
        if waiting_gauge() != self.waiting.len() as f64 {
            return false;
        }
        match self.ledger {
            Ledger::InProcess => true,
            Ledger::Redis => {
                let tenants: BTreeSet<_> = self.waiting.iter().map(|(_, tenant)| tenant).collect();
                tickets(self.redis) == tenants.len() as u64
            }
        }
    }

    async fn settle(&self) {
        let deadline = Instant::now() + SETTLE;
        while !self.is_settled() {
            assert!(
                Instant::now() < deadline,
                "{:?}: never settled: {}",
                self.ledger,
                self.state()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Nothing got in that the script did not see get in.
        let log = self.logged();
        let admitted = log.iter().filter(|seen| !seen.contains(' ')).count();
        assert_eq!(
            admitted,
            self.admitted,
            "{:?}: more got in than one at a time: {}",
            self.ledger,
            self.state()
        );
    }

    fn state(&self) -> String {
        let tickets = match self.ledger {
            Ledger::InProcess => String::new(),
            Ledger::Redis => format!(", {} tickets in Redis", tickets(self.redis)),
        };
        format!(
            "the script has {:?} waiting and {:?} running, the layer counts {} waiting{tickets}; \
             so far: {:?}",
            self.waiting,
            self.running,
            waiting_gauge(),
            self.logged()
        )
    }
}

/// The process's metrics recorder.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("the only recorder")
    })
}

/// The requests waiting in the layer, every class together.
fn waiting_gauge() -> f64 {
    let prefix = format!("{}{{", tower_tenant_tokens::metrics::WAITING);
    recorder()
        .render()
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many tickets wait for the budget in Redis.
fn tickets(redis: &RedisServer) -> u64 {
    let reply = redis.command("ZCARD budget:{t:upstream}:q:deadlines");
    reply.trim_start_matches(':').parse().expect(&reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_tenants_take_turns_and_each_is_served_in_its_order() {
    // a and b start level (each lifted to the last admitted, h1): a's place is earlier,
    // so a goes first; then they alternate, each tenant's requests in their order, a
    // tenant's place passing to its next request.
    conform(
        "equal_tenants_take_turns_and_each_is_served_in_its_order",
        &Script {
            weights: &[],
            steps: &[
                arrive("h1", "h", 100),
                arrive("a1", "a", 100),
                arrive("a2", "a", 100),
                arrive("b1", "b", 100),
                arrive("b2", "b", 100),
                arrive("a3", "a", 100),
            ],
            expected: &["h1", "a1", "b1", "a2", "b2", "a3"],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_three_to_one_admit_three_to_one_and_ties_go_to_the_earlier_place() {
    // Counters after each admission: g1 g=120; b1 b=180; g2 g=150; g3 g=180; then g and b
    // tie at 180 and g's place (taken by g1, passed on) is earlier.
    conform(
        "weights_three_to_one_admit_three_to_one_and_ties_go_to_the_earlier_place",
        &Script {
            weights: &[("g", 3)],
            steps: &[
                arrive("h1", "h", 90),
                arrive("g1", "g", 90),
                arrive("g2", "g", 90),
                arrive("g3", "g", 90),
                arrive("g4", "g", 90),
                arrive("b1", "b", 90),
                arrive("b2", "b", 90),
            ],
            expected: &["h1", "g1", "b1", "g2", "g3", "g4", "b2"],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_back_from_idle_starts_at_the_least_counter_waiting() {
    // z is served once and goes idle while a and b are served. Back, z starts at the
    // least counter waiting (a's 300): not its own 100, nor 260, the counter of b, which
    // was admitted last. b2 goes first: b has a request running, so it is not idle and
    // keeps its 260. Then a3 and z2 tie at 300, and a's place is the earlier.
    conform(
        "a_tenant_back_from_idle_starts_at_the_least_counter_waiting",
        &Script {
            weights: &[],
            steps: &[
                arrive("z1", "z", 100),
                Release("z1"),
                arrive("a1", "a", 100),
                arrive("a2", "a", 100),
                arrive("b1", "b", 60),
                arrive("a3", "a", 100),
                Release("a1"),
                Release("a2"),
                arrive("z2", "z", 100),
                arrive("b2", "b", 100),
            ],
            expected: &["z1", "a1", "a2", "b1", "b2", "a3", "z2"],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nobody_waiting_a_tenant_back_from_idle_starts_at_the_last_admitted() {
    // m is new: it starts at k's 100 (k was admitted last), so after m1 it has 160, not
    // 60. k comes back while m1 runs and nobody waits: it starts at m's 160 (the last
    // admitted), not its own 100, and its place is earlier than m2's.
    conform(
        "with_nobody_waiting_a_tenant_back_from_idle_starts_at_the_last_admitted",
        &Script {
            weights: &[],
            steps: &[
                arrive("k1", "k", 100),
                Release("k1"),
                arrive("m1", "m", 60),
                arrive("k2", "k", 100),
                arrive("m2", "m", 60),
            ],
            expected: &["k1", "m1", "k2", "m2"],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classes_go_first_sheddable_is_refused_and_a_new_class_takes_a_new_place() {
    // c1 (critical) goes before every standard request. c2, standard, is next of c: of
    // another class, it takes a new place, after a's and b's, before a2's.
    conform(
        "classes_go_first_sheddable_is_refused_and_a_new_class_takes_a_new_place",
        &Script {
            weights: &[],
            steps: &[
                arrive("h1", "h", 100),
                arrive("a1", "a", 100),
                arrive_as("s1", "s", "sheddable", 60),
                arrive_as("c1", "c", "critical", 100),
                arrive("b1", "b", 100),
                arrive("c2", "c", 100),
                Release("h1"),
                Release("c1"),
                arrive("a2", "a", 100),
                Release("a1"),
            ],
            expected: &["h1", "s1 shed", "c1", "a1", "b1", "c2", "a2"],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_pass_their_place_on_or_leave_the_line() {
    // a1 is cancelled: a2 keeps a's place, ahead of c. b1 is cancelled with nothing of b
    // behind it: b leaves the line, and b2 comes back at the least counter waiting with
    // the last place.
    conform(
        "cancelled_requests_pass_their_place_on_or_leave_the_line",
        &Script {
            weights: &[],
            steps: &[
                arrive("h1", "h", 100),
                arrive("a1", "a", 100),
                arrive("a2", "a", 100),
                arrive("b1", "b", 100),
                Cancel("a1"),
                arrive("c1", "c", 100),
                Cancel("b1"),
                Release("h1"),
                arrive("b2", "b", 100),
            ],
            expected: &["h1", "a2", "c1", "b2"],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_turn_is_kept_for_a_large_request_while_a_small_one_would_fit() {
    // While h1 holds 60 of 100, l1 (100) waits; s1 (30) would fit, but l1 has the turn.
    conform(
        "the_turn_is_kept_for_a_large_request_while_a_small_one_would_fit",
        &Script {
            weights: &[],
            steps: &[
                arrive("h1", "h", 60),
                arrive("l1", "l", 100),
                arrive("s1", "s", 30),
            ],
            expected: &["h1", "l1", "s1"],
        },
    )
    .await;
}
