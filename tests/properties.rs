//! Property tests of the tracker's public API against a model.
//!
//! Random sequences of reservations, resizes, releases and cap changes run against a
//! `TenantTokenTracker` and, side by side, a plain model of what each tenant should hold:
//! the sum of its live reservations' tokens. After every step the tracker must agree with
//! the model for every tenant (tokens in flight, cap, live reservations, high water,
//! overcommits), every refusal must be the one the rules call for, and the idle cache must
//! stay within its bound. At the end every reservation is dropped and every tenant must be
//! back at 0 with at most `max_idle_tenants` idle tenants left (plus those with a set cap).
//!
//! Case counts are bounded so the file runs in seconds in debug; `PROPTEST_CASES` raises
//! them. Failures are not persisted to files: the panic message carries the minimal input.

mod common;

use std::cell::Cell;
use std::sync::Arc;

use common::runner;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use tower_tenant_tokens::{Error, TenantScope, TenantTokenTracker, TokenReservation};

/// Tenants the sequences draw from: few enough that they collide, more than the small idle
/// bounds so that evictions happen.
const TENANTS: usize = 6;

/// How many tokens an operation asks for, resolved against the tenant's cap (and, for a
/// resize, what the reservation holds) when the operation runs.
#[derive(Debug, Clone, Copy)]
enum Amount {
    Zero,
    Exactly(u64),
    /// The cap plus or minus a little (saturating).
    NearCap(i8),
    /// `cap * eighths / 8`.
    CapEighths(u8),
    /// What the reservation holds now, plus or minus a little (for a reserve: from 0).
    NearHeld(i8),
    /// `u64::MAX` minus a little.
    NearMax(u16),
    /// Half of `u64::MAX`, plus or minus a little.
    NearHalfMax(i8),
}

impl Amount {
    fn resolve(self, cap: u64, held: u64) -> u64 {
        match self {
            Amount::Zero => 0,
            Amount::Exactly(tokens) => tokens,
            Amount::NearCap(delta) => offset(cap, delta),
            Amount::CapEighths(eighths) => (u128::from(cap) * u128::from(eighths) / 8) as u64,
            Amount::NearHeld(delta) => offset(held, delta),
            Amount::NearMax(below) => u64::MAX - u64::from(below),
            Amount::NearHalfMax(delta) => offset(u64::MAX / 2, delta),
        }
    }
}

fn offset(base: u64, delta: i8) -> u64 {
    if delta >= 0 {
        base.saturating_add(delta as u64)
    } else {
        base.saturating_sub(u64::from(delta.unsigned_abs()))
    }
}

/// One step of a sequence. `Index` picks among the reservations alive at that moment.
#[derive(Debug, Clone)]
enum Op {
    Reserve { tenant: usize, amount: Amount },
    Resize { pick: Index, amount: Amount },
    TryResize { pick: Index, amount: Amount },
    Release { pick: Index },
    SetCap { tenant: usize, cap: u64 },
    RemoveCap { tenant: usize },
}

#[derive(Debug, Clone)]
struct Scenario {
    default_cap: u64,
    max_idle: usize,
    ops: Vec<Op>,
    /// The order in which what is still alive at the end is dropped (cycled through).
    final_order: Vec<Index>,
}

fn small_amount() -> BoxedStrategy<Amount> {
    prop_oneof![
        2 => Just(Amount::Zero),
        6 => (1u64..=40).prop_map(Amount::Exactly),
        3 => (-3i8..=3).prop_map(Amount::NearCap),
        2 => (0u8..=8).prop_map(Amount::CapEighths),
        3 => (-3i8..=3).prop_map(Amount::NearHeld),
        1 => (0u16..=2).prop_map(Amount::NearMax),
        1 => any::<u64>().prop_map(Amount::Exactly),
    ]
    .boxed()
}

fn huge_amount() -> BoxedStrategy<Amount> {
    prop_oneof![
        1 => Just(Amount::Zero),
        2 => (1u64..=1000).prop_map(Amount::Exactly),
        3 => (0u16..=1000).prop_map(Amount::NearMax),
        3 => (-3i8..=3).prop_map(Amount::NearHalfMax),
        2 => (-3i8..=3).prop_map(Amount::NearCap),
        2 => (0u8..=8).prop_map(Amount::CapEighths),
        2 => (-3i8..=3).prop_map(Amount::NearHeld),
        2 => any::<u64>().prop_map(Amount::Exactly),
    ]
    .boxed()
}

fn small_cap() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 0u64..=5,
        5 => 40u64..=150,
        1 => Just(u64::MAX),
    ]
}

fn huge_cap() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(u64::MAX),
        2 => (0u64..=1000).prop_map(|below| u64::MAX - below),
        2 => (0u64..=1000).prop_map(|above| u64::MAX / 2 + above),
    ]
}

fn op(
    amount: impl Strategy<Value = Amount> + Clone,
    cap: impl Strategy<Value = u64>,
) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..TENANTS, amount.clone()).prop_map(|(tenant, amount)| Op::Reserve { tenant, amount }),
        3 => (any::<Index>(), amount.clone()).prop_map(|(pick, amount)| Op::Resize { pick, amount }),
        3 => (any::<Index>(), amount).prop_map(|(pick, amount)| Op::TryResize { pick, amount }),
        4 => any::<Index>().prop_map(|pick| Op::Release { pick }),
        1 => (0..TENANTS, cap).prop_map(|(tenant, cap)| Op::SetCap { tenant, cap }),
        1 => (0..TENANTS).prop_map(|tenant| Op::RemoveCap { tenant }),
    ]
}

fn scenario(
    default_cap: impl Strategy<Value = u64>,
    amount: impl Strategy<Value = Amount> + Clone,
    cap: impl Strategy<Value = u64>,
) -> impl Strategy<Value = Scenario> {
    // Idle bounds below the number of tenants evict; 40 splits the tracker into shards.
    let max_idle = prop_oneof![6 => 0usize..=4, 1 => Just(40usize)];
    (
        default_cap,
        max_idle,
        prop::collection::vec(op(amount, cap), 1..=60),
        prop::collection::vec(any::<Index>(), 1..=8),
    )
        .prop_map(|(default_cap, max_idle, ops, final_order)| Scenario {
            default_cap,
            max_idle,
            ops,
            final_order,
        })
}

/// What the sequences exercised, to show the properties are not vacuous.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    admitted: usize,
    overloaded: usize,
    too_large: usize,
    try_resize_refused: usize,
    overcommits: usize,
    saturated: usize,
    evictions: usize,
}

impl Stats {
    fn add(&mut self, other: Stats) {
        self.admitted += other.admitted;
        self.overloaded += other.overloaded;
        self.too_large += other.too_large;
        self.try_resize_refused += other.try_resize_refused;
        self.overcommits += other.overcommits;
        self.saturated += other.saturated;
        self.evictions += other.evictions;
    }
}

/// A reservation alive in the test, with the tokens the model says it holds.
struct Live {
    tenant: usize,
    tokens: u64,
    reservation: TokenReservation,
}

/// The tracker under test and the model it is checked against.
struct Harness {
    tracker: Arc<TenantTokenTracker>,
    default_cap: u64,
    names: Vec<String>,
    /// Caps from `set_cap` not yet removed: these tenants are pinned.
    set_caps: Vec<Option<u64>>,
    /// Per tenant, since it was last (re)created in the tracker.
    high_water: Vec<u64>,
    overcommits: Vec<u64>,
    live: Vec<Live>,
    /// Tenants the tracker held after the previous step.
    tracked: Vec<bool>,
    stats: Stats,
}

fn fail(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

impl Harness {
    fn new(default_cap: u64, max_idle: usize) -> Self {
        let tracker = Arc::new(
            TenantTokenTracker::builder(default_cap)
                .max_idle_tenants(max_idle)
                .build(),
        );
        assert_eq!(tracker.max_idle_tenants(), max_idle);
        Self {
            tracker,
            default_cap,
            // Ids of different lengths and shapes; all visible ASCII.
            names: (0..TENANTS)
                .map(|i| format!("tenant-{i}{}", "x".repeat(i * 3)))
                .collect(),
            set_caps: vec![None; TENANTS],
            high_water: vec![0; TENANTS],
            overcommits: vec![0; TENANTS],
            live: Vec::new(),
            tracked: vec![false; TENANTS],
            stats: Stats::default(),
        }
    }

    fn cap(&self, tenant: usize) -> u64 {
        self.set_caps[tenant].unwrap_or(self.default_cap)
    }

    /// What the model says the tenant has in flight: the sum of its live reservations.
    fn in_flight(&self, tenant: usize) -> u64 {
        let sum: u128 = self
            .live
            .iter()
            .filter(|live| live.tenant == tenant)
            .map(|live| u128::from(live.tokens))
            .sum();
        u64::try_from(sum).expect("the model never holds more than u64::MAX for a tenant")
    }

    fn live_count(&self, tenant: usize) -> u64 {
        self.live.iter().filter(|l| l.tenant == tenant).count() as u64
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Reserve { tenant, amount } => self.reserve(tenant, amount),
            Op::Resize { pick, amount } => self.resize(pick, amount, false),
            Op::TryResize { pick, amount } => self.resize(pick, amount, true),
            Op::Release { pick } => {
                if !self.live.is_empty() {
                    let live = self.live.remove(pick.index(self.live.len()));
                    if live.reservation.tokens() != live.tokens {
                        return Err(fail("a reservation changed on its own".into()));
                    }
                    if pick.index(2) == 0 {
                        drop(live.reservation);
                    } else {
                        live.reservation.release();
                    }
                }
                Ok(())
            }
            Op::SetCap { tenant, cap } => {
                self.tracker.set_cap(&self.names[tenant], cap);
                self.set_caps[tenant] = Some(cap);
                Ok(())
            }
            Op::RemoveCap { tenant } => {
                let was_set = self.tracker.remove_cap(&self.names[tenant]);
                prop_assert_eq!(was_set, self.set_caps[tenant].take().is_some());
                Ok(())
            }
        }
    }

    fn reserve(&mut self, tenant: usize, amount: Amount) -> Result<(), TestCaseError> {
        let cap = self.cap(tenant);
        let before = self.in_flight(tenant);
        let tokens = amount.resolve(cap, 0);
        let name = self.names[tenant].clone();
        let result = self
            .tracker
            .reserve(&TenantScope::new(name.clone()), tokens);
        let fits_alone = tokens <= cap;
        let fits_now = u128::from(before) + u128::from(tokens) <= u128::from(cap);
        match result {
            Ok(reservation) => {
                prop_assert!(
                    fits_alone && fits_now,
                    "admitted {} tokens for {} with {} of {} in flight",
                    tokens,
                    name,
                    before,
                    cap
                );
                prop_assert_eq!(reservation.tokens(), tokens);
                prop_assert_eq!(reservation.tenant_id(), name.as_str());
                let after = before + tokens;
                prop_assert!(
                    self.tracker.in_flight(&name) <= cap,
                    "reserve went above the cap"
                );
                prop_assert_eq!(self.tracker.in_flight(&name), after);
                self.high_water[tenant] = self.high_water[tenant].max(after);
                self.stats.admitted += 1;
                self.live.push(Live {
                    tenant,
                    tokens,
                    reservation,
                });
            }
            Err(error) => {
                let expected = if !fits_alone {
                    self.stats.too_large += 1;
                    Error::RequestTooLarge {
                        tenant_id: name,
                        tokens,
                        cap,
                    }
                } else if !fits_now {
                    self.stats.overloaded += 1;
                    Error::TenantOverloaded {
                        tenant_id: name,
                        requested: tokens,
                        in_flight: before,
                        cap,
                    }
                } else {
                    return Err(fail(format!(
                        "refused {tokens} tokens with {before} of {cap} in flight: {error}"
                    )));
                };
                prop_assert_eq!(error, expected);
            }
        }
        Ok(())
    }

    fn resize(
        &mut self,
        pick: Index,
        amount: Amount,
        only_within_cap: bool,
    ) -> Result<(), TestCaseError> {
        if self.live.is_empty() {
            return Ok(());
        }
        let index = pick.index(self.live.len());
        let tenant = self.live[index].tenant;
        let held = self.live[index].tokens;
        let cap = self.cap(tenant);
        let before = self.in_flight(tenant);
        let tokens = amount.resolve(cap, held);
        let name = self.names[tenant].clone();

        if only_within_cap {
            let result = self.live[index].reservation.try_resize(tokens);
            let delta = tokens.saturating_sub(held);
            let fits = u128::from(before) + u128::from(delta) <= u128::from(cap);
            match result {
                Ok(()) => {
                    prop_assert!(tokens <= held || fits, "try_resize grew past the cap");
                    self.live[index].tokens = tokens;
                    if tokens > held {
                        let after = before + delta;
                        prop_assert!(
                            self.tracker.in_flight(&name) <= cap,
                            "try_resize exceeded the cap"
                        );
                        self.high_water[tenant] = self.high_water[tenant].max(after);
                    }
                }
                Err(error) => {
                    prop_assert!(tokens > held && !fits, "try_resize refused: {}", error);
                    self.stats.try_resize_refused += 1;
                    prop_assert_eq!(
                        error,
                        Error::TenantOverloaded {
                            tenant_id: name.clone(),
                            requested: delta,
                            in_flight: before,
                            cap,
                        }
                    );
                }
            }
            prop_assert_eq!(
                self.live[index].reservation.tokens(),
                self.live[index].tokens
            );
        } else {
            let returned = self.live[index].reservation.resize(tokens);
            let expected = if tokens >= held {
                // Growth saturates the tenant's total at u64::MAX.
                held + (tokens - held).min(u64::MAX - before)
            } else {
                tokens
            };
            prop_assert_eq!(returned, expected, "resize({}) from {}", tokens, held);
            prop_assert_eq!(
                self.live[index].reservation.tokens(),
                returned,
                "a resize returns what is held"
            );
            self.live[index].tokens = returned;
            if returned < tokens {
                self.stats.saturated += 1;
            }
            let after = self.in_flight(tenant);
            if tokens > held {
                self.high_water[tenant] = self.high_water[tenant].max(after);
                // Crossing the cap counts; growing while already above it does not.
                if after > cap && before <= cap && returned > held {
                    self.overcommits[tenant] += 1;
                    self.stats.overcommits += 1;
                }
            }
        }

        Ok(())
    }

    /// Compares every tenant's state with the model.
    fn check(&mut self) -> Result<(), TestCaseError> {
        let snapshot = self.tracker.snapshot();
        prop_assert_eq!(self.tracker.tracked_tenants(), snapshot.len());
        let mut idle_unpinned = 0;
        for tenant in 0..TENANTS {
            let name = &self.names[tenant];
            let in_flight = self.in_flight(tenant);
            let cap = self.cap(tenant);
            let count = self.live_count(tenant);
            prop_assert_eq!(
                self.tracker.in_flight(name),
                in_flight,
                "in_flight({})",
                name
            );
            prop_assert_eq!(self.tracker.cap(name), cap, "cap({})", name);
            match self.tracker.tenant_state(name) {
                None => {
                    prop_assert_eq!(count, 0, "{} has live reservations but is untracked", name);
                    prop_assert!(
                        self.set_caps[tenant].is_none(),
                        "{} has a set cap but was evicted",
                        name
                    );
                    // Forgotten: a new entry starts from scratch.
                    self.high_water[tenant] = 0;
                    self.overcommits[tenant] = 0;
                    if std::mem::take(&mut self.tracked[tenant]) {
                        self.stats.evictions += 1;
                    }
                }
                Some(state) => {
                    prop_assert_eq!(state.in_flight, in_flight, "state.in_flight of {}", name);
                    prop_assert_eq!(state.cap, cap, "state.cap of {}", name);
                    prop_assert_eq!(state.reservations, count, "state.reservations of {}", name);
                    prop_assert_eq!(
                        state.high_water,
                        self.high_water[tenant],
                        "high_water of {}",
                        name
                    );
                    prop_assert_eq!(
                        state.overcommits,
                        self.overcommits[tenant],
                        "overcommits of {}",
                        name
                    );
                    prop_assert!(
                        snapshot.iter().any(|(id, s)| id == name && *s == state),
                        "snapshot disagrees with tenant_state for {}",
                        name
                    );
                    self.tracked[tenant] = true;
                    if count == 0 && self.set_caps[tenant].is_none() {
                        idle_unpinned += 1;
                    }
                }
            }
        }
        prop_assert!(
            snapshot.iter().all(|(id, _)| self.names.contains(id)),
            "a tenant nobody reserved for is tracked"
        );
        prop_assert!(
            idle_unpinned <= self.tracker.max_idle_tenants(),
            "{} idle tenants kept with a bound of {}",
            idle_unpinned,
            self.tracker.max_idle_tenants()
        );
        for live in &self.live {
            prop_assert_eq!(live.reservation.tokens(), live.tokens);
            prop_assert_eq!(
                live.reservation.tenant_id(),
                self.names[live.tenant].as_str()
            );
        }
        Ok(())
    }

    /// Drops everything still alive, checking after each drop, then the end state.
    fn finish(&mut self, order: &[Index]) -> Result<(), TestCaseError> {
        let mut order = order.iter().cycle();
        while !self.live.is_empty() {
            let pick = order.next().expect("cycled");
            drop(self.live.remove(pick.index(self.live.len())));
            self.check()?;
        }
        let pinned = self.set_caps.iter().filter(|cap| cap.is_some()).count();
        let snapshot = self.tracker.snapshot();
        for (id, state) in &snapshot {
            prop_assert_eq!(state.in_flight, 0, "{} still holds tokens", id);
            prop_assert_eq!(state.reservations, 0, "{} still has reservations", id);
        }
        for (tenant, cap) in self.set_caps.iter().enumerate() {
            if let Some(cap) = cap {
                let state = self.tracker.tenant_state(&self.names[tenant]);
                prop_assert_eq!(state.map(|s| s.cap), Some(*cap), "pinned {} lost", tenant);
            }
        }
        let tracked = self.tracker.tracked_tenants();
        prop_assert!(
            tracked <= self.tracker.max_idle_tenants() + pinned,
            "{} tenants tracked at rest, {} of them pinned, bound {}",
            tracked,
            pinned,
            self.tracker.max_idle_tenants()
        );
        // With the caps removed, every tenant is ordinary idle cache.
        for tenant in 0..TENANTS {
            if self.set_caps[tenant].take().is_some() {
                prop_assert!(self.tracker.remove_cap(&self.names[tenant]));
            }
        }
        self.check()?;
        let tracked = self.tracker.tracked_tenants();
        prop_assert!(
            tracked <= self.tracker.max_idle_tenants(),
            "{} tenants tracked at rest with no cap set, bound {}",
            tracked,
            self.tracker.max_idle_tenants()
        );
        Ok(())
    }
}

fn run_scenario(scenario: &Scenario, stats: &Cell<Stats>) -> Result<(), TestCaseError> {
    let mut harness = Harness::new(scenario.default_cap, scenario.max_idle);
    harness.check()?;
    for (step, op) in scenario.ops.iter().enumerate() {
        harness
            .apply(op)
            .and_then(|()| harness.check())
            .map_err(|e| fail(format!("step {step} ({op:?}): {e}")))?;
    }
    harness.finish(&scenario.final_order)?;
    let mut total = stats.get();
    total.add(harness.stats);
    stats.set(total);
    Ok(())
}

fn run_property(name: &str, cases: u32, strategy: impl Strategy<Value = Scenario>) {
    let mut runner = runner(cases);
    let ran = Cell::new(0usize);
    let steps = Cell::new(0usize);
    let stats = Cell::new(Stats::default());
    let result = runner.run(&strategy, |scenario| {
        ran.set(ran.get() + 1);
        steps.set(steps.get() + scenario.ops.len());
        run_scenario(&scenario, &stats)
    });
    if let Err(error) = result {
        panic!("{name}: {error}");
    }
    eprintln!(
        "properties::{name}: {} cases, {} operations; {:?}",
        ran.get(),
        steps.get(),
        stats.get()
    );
}

#[test]
fn the_tracker_matches_its_model_through_any_sequence() {
    run_property(
        "the_tracker_matches_its_model_through_any_sequence",
        256,
        scenario(
            prop_oneof![1 => Just(0u64), 1 => 1u64..=10, 4 => 80u64..=120],
            small_amount(),
            small_cap(),
        ),
    );
}

#[test]
fn huge_caps_and_token_counts_saturate_and_account_exactly() {
    run_property(
        "huge_caps_and_token_counts_saturate_and_account_exactly",
        256,
        scenario(Just(u64::MAX), huge_amount(), huge_cap()),
    );
}

// ---------------------------------------------------------------------------------------
// Pinned cases
// ---------------------------------------------------------------------------------------

/// `overcommits` counts "how many times growth took `in_flight` from within the cap to
/// above it". A resize to the size already held pushes nothing, `try_resize` never grows
/// past the cap at all, and growing while already above it crosses nothing, so none may
/// count.
#[test]
fn a_resize_that_changes_nothing_is_not_an_overcommit() {
    let tracker = Arc::new(TenantTokenTracker::new(100));
    let acme = TenantScope::new("acme");
    let mut big = tracker.reserve(&acme, 100).unwrap();
    let mut empty = tracker.reserve(&acme, 0).unwrap();
    assert_eq!(big.resize(150), 150); // real growth past the cap
    let overcommits = || tracker.tenant_state("acme").unwrap().overcommits;
    assert_eq!(overcommits(), 1);

    assert_eq!(big.resize(150), 150);
    assert_eq!(big.resize(170), 170); // growing further while above the cap
    assert_eq!(empty.resize(0), 0);
    empty.try_resize(0).unwrap();
    assert_eq!(tracker.in_flight("acme"), 170, "nothing else changed");
    assert_eq!(
        overcommits(),
        1,
        "resizes that left in_flight where it was were counted as overcommits"
    );
}

/// The saturation the huge-cap property relies on, spelled out.
#[test]
fn growth_saturates_at_u64_max_and_the_release_is_exact() {
    let tracker = Arc::new(TenantTokenTracker::new(u64::MAX));
    let acme = TenantScope::new("acme");
    let mut first = tracker.reserve(&acme, u64::MAX - 10).unwrap();
    let mut second = tracker.reserve(&acme, 10).unwrap();
    assert!(matches!(
        tracker.reserve(&acme, 1),
        Err(Error::TenantOverloaded {
            in_flight: u64::MAX,
            cap: u64::MAX,
            ..
        })
    ));
    assert_eq!(second.resize(u64::MAX), 10, "no room left to grow into");
    assert_eq!(first.resize(5), 5);
    assert_eq!(second.resize(u64::MAX), u64::MAX - 5);
    assert_eq!(tracker.in_flight("acme"), u64::MAX);
    drop(second);
    assert_eq!(tracker.in_flight("acme"), 5);
    drop(first);
    assert_eq!(tracker.in_flight("acme"), 0);
    assert_eq!(tracker.tenant_state("acme").unwrap().overcommits, 0);
}
