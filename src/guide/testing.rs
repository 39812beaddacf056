//! The test suite, and what CI runs.
//!
//! # Running the tests
//!
//! ```text
//! cargo test --all-features          # the test suite (what CI runs)
//! ```
//!
//! This runs the unit, integration and doc tests (the samples in these guides among
//! them). The Redis tests start `redis-server` themselves on free loopback ports. Where it
//! is not installed (`apt-get install -y redis-server`, or `brew install redis`), each of
//! them prints `*** SKIPPED <test>: redis-server is not on the PATH …` and the rest of the
//! suite runs; with `CI=true` a missing server fails those tests instead.
//!
//! # What the tests cover
//!
//! Every behaviour in these guides goes through real HTTP on 127.0.0.1 (axum and plain
//! hyper): streams held to their last chunk, clients that disconnect mid-stream, cancelled
//! and panicking handlers, bursts of distinct tenant ids and concurrent stress against the
//! cap, and every refusal of the [bad-input table](super::refusals#bad-input-one-row-per-case).
//! Besides:
//!
//! - shared budgets (`tests/budgets.rs`);
//! - waiting, with hundreds of concurrent requests that are served, time out or give up
//!   (`tests/waiting.rs`);
//! - metrics read back as Prometheus text (`tests/metrics.rs`);
//! - the OpenAI estimator on a fixed corpus (`tests/estimator_corpus.rs`) and against the
//!   serde-based walk it replaced, on generated, mutated and truncated bodies
//!   (`tests/estimator_differential.rs`);
//! - the property, arbitrary-input, interleaving, soak and allocation tests described in
//!   [guarantees](super::guarantees#how-they-are-checked);
//! - Redis, below.
//!
//! # Redis
//!
//! `tests/redis.rs` runs against real `redis-server`s, each test its own server:
//!
//! - two replicas under many concurrent workers never exceed the cap (Redis's count sampled
//!   as it runs, and what the workers hold) and end at 0 with no lease left (a tenant's
//!   idle hash stays until it expires);
//! - two replicas behind the layer over real HTTP share one cap (429 from the other
//!   replica, reconciliation both ways);
//! - a replica process killed with `SIGKILL` while holding most of a cap: its lease stays
//!   counted across several TTLs while it lives, and is back within one TTL of the kill;
//! - each failure policy with Redis killed and restarted (recovery without restarting the
//!   application);
//! - repeated `SCRIPT FLUSH`es mid-run;
//! - a stream outliving several TTLs stays counted;
//! - a reserve that timed out behind a `DEBUG SLEEP`, or whose request was cancelled there,
//!   leaves nothing behind (both fail if the release by id is taken out);
//! - the OpenAI body estimator in front of Redis;
//! - a Redis that loses its data (`FLUSHALL`, a restart) counts the running work again
//!   within one renewal period; with the default lease settings, a server restarted empty
//!   counts it again within moments of answering, whether or not requests come, and a
//!   replica holding no lease sends nothing; a lease that expired while its work ran is
//!   registered again;
//! - a shared budget in Redis holds across replicas, all or nothing with the tenant's lease;
//! - waiting on one replica for capacity another releases; the tenants listed across
//!   replicas.
//!
//! `tests/redis_cluster.rs` starts a real Redis Cluster (three `redis-server
//! --cluster-enabled yes` joined by `redis-cli --cluster create`) and a real master, replica
//! and Sentinel (`redis-server --sentinel`):
//!
//! - forty tenants spread over the three masters, each held to its cap by two trackers,
//!   renewed past the TTL with nothing lost, listed by `tenants_in_flight` across masters,
//!   raced by concurrent workers without exceeding a cap, and no lease left on any master;
//! - a shared budget on another master than its tenants stays all or nothing both ways;
//! - requests waiting for a budget on two replicas keep one order (a critical one first),
//!   their tickets on the budget's master, and nothing but the counters is left;
//! - the master SIGKILLed while two streams are held, one of which the replica lacks (it
//!   was deleted there, with the master's writes paused, as a lagging replica would miss
//!   it): the Sentinel promotes the
//!   replica, the tracker follows, the missing lease is registered again, nothing is over
//!   a cap one renewal period after the promotion, and nothing is left once released. With
//!   `--nocapture` it prints the timeline (kill → promoted → answering → registered again);
//! - the same failover with the default lease settings and a stream of 800 on a cap of
//!   1,000, with a contender asking for 800 throughout and with no request at all: the
//!   stream is counted again within moments of the Sentinel's announcement, then a second
//!   800 is refused;
//! - a cluster with one replica per master, a master SIGKILLed while a stream is held on
//!   one of its slots and its replica lacking the lease: once the cluster promotes the
//!   replica, the stream is counted again within moments, on the new master.
//!
//! `tests/redis_soak.rs` soaks the Redis path under faults (20 s, `TTT_REDIS_SOAK_SECS` for
//! longer): two replicas over real HTTP and a third in a child process, clients streaming
//! (some for seconds) and disconnecting, Redis flushed, then restarted empty, then the child
//! SIGKILLed. The work running, as the handlers count it, never exceeds a cap outside one
//! renewal period (plus the short streams' length) after each fault, and once everything
//! ends no token is left, and no key once the tenants' idle hashes have expired (two TTLs
//! at most). It fails if lost leases are not registered again.
//!
//! `tests/fair_redis.rs` checks the one fair order across replicas for a budget in Redis,
//! each replica its own layer and server on one `redis-server`: a tenant keeping two
//! streams going on one replica gets half of a budget that one keeping sixteen saturates
//! from the other (its waits within twice a request's run time), weights three to one share
//! it three to one, a critical request on one replica goes before standard ones waiting on
//! the other, sheddable ones are shed on either, the budget is never exceeded (sampled),
//! cancelled and timed-out waits leave no ticket and no token, a replica SIGKILLed while
//! its requests wait leaves no ticket beyond one TTL, a tenant at its own cap gives up its
//! turn and counts only what it was served, and waiting requests whose tickets a flushed
//! Redis lost still get in, with the order holding after.
//!
//! `tests/fairness.rs` measures fair shares of a saturated budget over real HTTP, by class,
//! weight and tenant; `tests/contract.rs` checks the tower contract with `tower_test`'s mock
//! service (readiness, nothing reserved before `call`, release when the future is dropped in
//! each state, errors passed through).
//!
//! # CI
//!
//! `.ci/run` is the whole check, on a fresh machine. It installs `redis-server` if it is
//! missing (with `redis-cli`, and the Sentinel mode of the server itself), then runs:
//!
//! - `cargo fmt --check`;
//! - clippy with `-D warnings` on all targets and features, and on the library without
//!   default features (so the MSRV lint, `incompatible_msrv`, is an error);
//! - the docs with `-D warnings`, with all features and with the default ones;
//! - a build of every example;
//! - the `gateway` example against the official OpenAI Python SDK
//!   (`.ci/openai_sdk_check.py`: a 429 must reach the SDK as its `RateLimitError`), alone
//!   and as two replicas sharing one Redis (the 429 then comes from the other replica);
//! - the shuttle exploration of the tracker's interleavings;
//! - `cargo test --all-features`.
//!
//! Benchmarks are not run by CI; the repository's `benches/README.md` lists them, with the
//! figures they measured and the commands that reproduce them.
