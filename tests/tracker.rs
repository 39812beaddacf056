//! The ledger on its own, through its public API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use tower_tenant_tokens::{Error, TenantScope, TenantTokenTracker};

fn scope(id: &str) -> TenantScope {
    TenantScope::new(id)
}

#[test]
fn reserve_within_cap_succeeds_and_drop_releases() {
    let tracker = Arc::new(TenantTokenTracker::new(1000));
    let reservation = tracker.reserve(&scope("a"), 700).unwrap();
    assert_eq!(reservation.tokens(), 700);
    assert_eq!(reservation.tenant_id(), "a");
    assert_eq!(tracker.in_flight("a"), 700);
    drop(reservation);
    assert_eq!(tracker.in_flight("a"), 0);
}

#[test]
fn reserve_beyond_what_is_left_is_tenant_overloaded_with_the_numbers() {
    let tracker = Arc::new(TenantTokenTracker::new(100));
    let _held = tracker.reserve(&scope("a"), 80).unwrap();
    let error = tracker.reserve(&scope("a"), 50).unwrap_err();
    assert_eq!(
        error,
        Error::TenantOverloaded {
            tenant_id: "a".into(),
            requested: 50,
            in_flight: 80,
            cap: 100,
        }
    );
    let message = error.to_string();
    assert!(message.contains("`a`") && message.contains("50") && message.contains("100"));
    assert_eq!(tracker.in_flight("a"), 80, "a refusal reserves nothing");
}

#[test]
fn request_larger_than_the_cap_is_request_too_large_even_when_idle() {
    let tracker = Arc::new(TenantTokenTracker::new(100));
    let error = tracker.reserve(&scope("a"), 101).unwrap_err();
    assert_eq!(
        error,
        Error::RequestTooLarge {
            tenant_id: "a".into(),
            tokens: 101,
            cap: 100,
        }
    );
    assert_eq!(error.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        tracker.tracked_tenants(),
        0,
        "a request that never fits leaves no entry behind"
    );
}

#[test]
fn zero_token_reservations_always_fit_and_zero_cap_admits_nothing_else() {
    let tracker = Arc::new(TenantTokenTracker::new(0));
    let zero = tracker.reserve(&scope("a"), 0).unwrap();
    assert!(matches!(
        tracker.reserve(&scope("a"), 1),
        Err(Error::RequestTooLarge { cap: 0, .. })
    ));
    drop(zero);
    assert_eq!(tracker.in_flight("a"), 0);
}

#[test]
fn tenants_are_isolated() {
    let tracker = Arc::new(TenantTokenTracker::new(100));
    let _a = tracker.reserve(&scope("a"), 90).unwrap();
    let _b = tracker.reserve(&scope("b"), 90).unwrap();
    let snapshot: HashMap<_, _> = tracker.snapshot().into_iter().collect();
    assert_eq!(snapshot["a"].in_flight, 90);
    assert_eq!(snapshot["b"].in_flight, 90);
}

#[test]
fn high_water_tracks_the_peak_and_reservations_count_live_ones() {
    let tracker = Arc::new(TenantTokenTracker::new(1000));
    let first = tracker.reserve(&scope("a"), 400).unwrap();
    let second = tracker.reserve(&scope("a"), 300).unwrap();
    drop(first);
    let state = tracker.tenant_state("a").unwrap();
    assert_eq!(state.in_flight, 300);
    assert_eq!(state.high_water, 700);
    assert_eq!(state.reservations, 1);
    assert_eq!(state.cap, 1000);
    drop(second);
    assert_eq!(tracker.tenant_state("a").unwrap().reservations, 0);
}

#[test]
fn resize_reconciles_through_the_reservation_so_release_is_exact() {
    let tracker = Arc::new(TenantTokenTracker::new(1000));
    let mut first = tracker.reserve(&scope("a"), 500).unwrap();
    let second = tracker.reserve(&scope("a"), 100).unwrap();
    assert_eq!(first.resize(200), 200);
    assert_eq!(tracker.in_flight("a"), 300);
    assert_eq!(first.resize(650), 650);
    assert_eq!(tracker.in_flight("a"), 750);
    drop(first);
    assert_eq!(
        tracker.in_flight("a"),
        100,
        "release returns what was held, not the estimate"
    );
    drop(second);
    assert_eq!(tracker.in_flight("a"), 0);
}

#[test]
fn growth_above_the_cap_is_allowed_counted_and_gates_new_work() {
    let tracker = Arc::new(TenantTokenTracker::new(1000));
    let mut reservation = tracker.reserve(&scope("a"), 800).unwrap();
    reservation.resize(1500);
    let state = tracker.tenant_state("a").unwrap();
    assert_eq!(state.in_flight, 1500);
    assert_eq!(state.overcommits, 1);
    assert_eq!(state.high_water, 1500);
    assert!(matches!(
        tracker.reserve(&scope("a"), 1),
        Err(Error::TenantOverloaded {
            in_flight: 1500,
            ..
        })
    ));
    drop(reservation);
    assert_eq!(tracker.in_flight("a"), 0);
    tracker.reserve(&scope("a"), 1000).unwrap();
}

#[test]
fn try_resize_grows_only_within_the_cap_and_changes_nothing_when_refused() {
    let tracker = Arc::new(TenantTokenTracker::new(1000));
    let _other = tracker.reserve(&scope("a"), 300).unwrap();
    let mut reservation = tracker.reserve(&scope("a"), 300).unwrap();
    reservation.try_resize(700).unwrap();
    assert_eq!(tracker.in_flight("a"), 1000);
    let error = reservation.try_resize(701).unwrap_err();
    assert!(matches!(
        error,
        Error::TenantOverloaded {
            requested: 1,
            in_flight: 1000,
            cap: 1000,
            ..
        }
    ));
    assert_eq!(reservation.tokens(), 700);
    assert_eq!(tracker.in_flight("a"), 1000);
    reservation.try_resize(10).unwrap();
    assert_eq!(tracker.in_flight("a"), 310);
    assert_eq!(tracker.tenant_state("a").unwrap().overcommits, 0);
}

#[test]
fn a_cap_of_u64_max_is_safe_everywhere() {
    let tracker = Arc::new(TenantTokenTracker::new(u64::MAX));
    let mut all = tracker.reserve(&scope("a"), u64::MAX).unwrap();
    assert!(matches!(
        tracker.reserve(&scope("a"), 1),
        Err(Error::TenantOverloaded { .. })
    ));
    let mut small = {
        drop(all);
        tracker.reserve(&scope("a"), 10).unwrap()
    };
    all = tracker.reserve(&scope("a"), u64::MAX - 10).unwrap();
    // Growth saturates at u64::MAX: the reservation holds only what it really added.
    assert_eq!(small.resize(u64::MAX), 10);
    assert_eq!(tracker.in_flight("a"), u64::MAX);
    drop(all);
    assert_eq!(tracker.in_flight("a"), 10);
    assert_eq!(small.resize(1_000), 1_000);
    drop(small);
    assert_eq!(tracker.in_flight("a"), 0);
}

#[test]
fn a_lowered_cap_revokes_nothing_and_gates_new_reservations() {
    let tracker = Arc::new(TenantTokenTracker::new(1000));
    let held = tracker.reserve(&scope("a"), 800).unwrap();
    tracker.set_cap("a", 500);
    assert_eq!(tracker.in_flight("a"), 800);
    assert_eq!(tracker.cap("a"), 500);
    assert!(matches!(
        tracker.reserve(&scope("a"), 1),
        Err(Error::TenantOverloaded { cap: 500, .. })
    ));
    drop(held);
    tracker.reserve(&scope("a"), 500).unwrap();
    assert!(tracker.reserve(&scope("a"), 501).is_err());
}

#[test]
fn set_cap_before_first_use_and_remove_cap_restores_the_default() {
    let tracker = Arc::new(TenantTokenTracker::new(100));
    tracker.set_cap("big", 10_000);
    assert_eq!(tracker.cap("big"), 10_000);
    tracker.reserve(&scope("big"), 5_000).unwrap();
    assert!(tracker.remove_cap("big"));
    assert!(!tracker.remove_cap("big"));
    assert_eq!(tracker.cap("big"), 100);
    assert!(matches!(
        tracker.reserve(&scope("big"), 5_000),
        Err(Error::RequestTooLarge { cap: 100, .. })
    ));
}

#[test]
fn cap_fn_supplies_caps_and_refresh_caps_asks_again() {
    let premium = Arc::new(AtomicUsize::new(5_000));
    let lookup = Arc::clone(&premium);
    let tracker = Arc::new(
        TenantTokenTracker::builder(100)
            .cap_fn(move |tenant| {
                (tenant == "premium").then(|| lookup.load(Ordering::SeqCst) as u64)
            })
            .build(),
    );
    let held = tracker.reserve(&scope("premium"), 4_000).unwrap();
    assert!(tracker.reserve(&scope("basic"), 101).is_err());
    premium.store(8_000, Ordering::SeqCst);
    assert_eq!(
        tracker.cap("premium"),
        5_000,
        "kept while the tenant is tracked"
    );
    tracker.refresh_caps();
    assert_eq!(tracker.cap("premium"), 8_000);
    tracker.set_cap("premium", 1);
    tracker.refresh_caps();
    assert_eq!(
        tracker.cap("premium"),
        1,
        "a set cap wins over the function"
    );
    drop(held);
}

#[test]
fn a_spray_of_tenant_ids_leaves_no_more_than_the_idle_bound() {
    let tracker = Arc::new(TenantTokenTracker::new(100));
    for i in 0..100_000 {
        drop(tracker.reserve(&scope(&format!("tenant-{i}")), 1).unwrap());
    }
    assert!(tracker.tracked_tenants() <= tracker.max_idle_tenants());
    assert!(
        tracker.tracked_tenants() > 0,
        "idle tenants are cached for reuse"
    );

    let small = Arc::new(
        TenantTokenTracker::builder(100)
            .max_idle_tenants(100)
            .build(),
    );
    for i in 0..10_000 {
        drop(small.reserve(&scope(&format!("tenant-{i}")), 1).unwrap());
    }
    assert!(
        small.tracked_tenants() <= 100,
        "{}",
        small.tracked_tenants()
    );
}

#[test]
fn tenants_held_at_once_are_all_tracked_then_trimmed_to_the_bound_when_released() {
    let tracker = Arc::new(
        TenantTokenTracker::builder(10)
            .max_idle_tenants(100)
            .build(),
    );
    let held: Vec<_> = (0..5_000)
        .map(|i| tracker.reserve(&scope(&format!("t{i}")), 1).unwrap())
        .collect();
    assert_eq!(
        tracker.tracked_tenants(),
        5_000,
        "work in flight is never forgotten"
    );
    drop(held);
    assert!(
        tracker.tracked_tenants() <= 100,
        "{}",
        tracker.tracked_tenants()
    );
    assert!(tracker.snapshot().iter().all(|(_, s)| s.in_flight == 0));
}

#[test]
fn a_steady_tenant_survives_a_spray_of_one_off_ids() {
    let tracker = Arc::new(
        TenantTokenTracker::builder(1000)
            .max_idle_tenants(100)
            .build(),
    );
    drop(tracker.reserve(&scope("steady"), 500).unwrap());
    for i in 0..10_000 {
        drop(tracker.reserve(&scope(&format!("spray-{i}")), 1).unwrap());
        if i % 5 == 0 {
            drop(tracker.reserve(&scope("steady"), 1).unwrap());
        }
    }
    // Evicted and re-created, the entry would have forgotten its high-water mark.
    assert_eq!(tracker.tenant_state("steady").unwrap().high_water, 500);
}

#[test]
fn set_caps_are_configuration_and_are_not_evicted() {
    let tracker = Arc::new(TenantTokenTracker::builder(10).max_idle_tenants(0).build());
    tracker.set_cap("configured", 77);
    for i in 0..1_000 {
        drop(tracker.reserve(&scope(&format!("t{i}")), 1).unwrap());
    }
    assert_eq!(tracker.cap("configured"), 77);
    assert_eq!(tracker.tracked_tenants(), 1);
    tracker.remove_cap("configured");
    assert_eq!(
        tracker.tracked_tenants(),
        0,
        "an unpinned idle tenant over the bound goes"
    );
}

#[test]
fn concurrent_reservations_never_exceed_the_cap_and_end_at_zero() {
    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let tracker = Arc::clone(&tracker);
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                let mut admitted = 0u32;
                for i in 0..20_000u64 {
                    let tokens = (i * 7 + t as u64 * 13) % 300 + 1;
                    if let Ok(mut reservation) = tracker.reserve_id("shared", tokens) {
                        admitted += 1;
                        assert!(tracker.in_flight("shared") <= 1_000);
                        if i % 3 == 0 {
                            reservation.resize(tokens / 2);
                        }
                    }
                }
                admitted
            })
        })
        .collect();
    let admitted: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(admitted > 0);
    let state = tracker.tenant_state("shared").unwrap();
    assert_eq!(state.in_flight, 0);
    assert_eq!(state.reservations, 0);
    assert!(state.high_water <= 1_000);
}

#[test]
fn a_tenant_with_work_in_flight_is_never_evicted_however_many_sweeps_run() {
    let tracker = Arc::new(TenantTokenTracker::builder(10).max_idle_tenants(0).build());
    let held = tracker.reserve_id("x", 10).unwrap();
    for i in 0..1_000 {
        drop(tracker.reserve_id(&format!("other-{i}"), 1).unwrap()); // each ends in a sweep
    }
    // Were "x" evicted, a fresh entry would admit a second full-cap reservation.
    assert!(matches!(
        tracker.reserve_id("x", 10),
        Err(Error::TenantOverloaded { in_flight: 10, .. })
    ));
    drop(held);
    assert_eq!(tracker.tracked_tenants(), 0);
}

#[test]
fn eviction_racing_admission_never_creates_a_second_entry_for_a_tenant() {
    // max_idle 0 evicts an entry the moment its last reservation ends, so every request
    // races an eviction. A cap that admits one reservation at a time makes a second live
    // entry for "x" visible as two reservations held at once.
    let tracker = Arc::new(TenantTokenTracker::builder(10).max_idle_tenants(0).build());
    let holding = Arc::new(AtomicUsize::new(0));
    let threads = 4;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (tracker, holding, barrier) = (
                Arc::clone(&tracker),
                Arc::clone(&holding),
                Arc::clone(&barrier),
            );
            thread::spawn(move || {
                barrier.wait();
                for i in 0..50_000 {
                    if let Ok(reservation) = tracker.reserve_id("x", 10) {
                        let before = holding.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(before, 0, "two reservations of a full cap held at once");
                        thread::yield_now(); // hold it while other threads sweep
                        holding.fetch_sub(1, Ordering::SeqCst);
                        drop(reservation);
                    }
                    if i % 2 == t % 2 {
                        drop(tracker.reserve_id(&format!("other-{t}-{i}"), 1));
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    assert_eq!(tracker.in_flight("x"), 0);
    assert_eq!(tracker.tracked_tenants(), 0);
}

#[test]
fn reservations_outlive_the_tracker_and_release_cleanly() {
    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let reservation = tracker.reserve(&scope("a"), 500).unwrap();
    drop(tracker);
    assert_eq!(reservation.tokens(), 500);
    drop(reservation);
}

#[tokio::test]
async fn reservation_moves_into_other_tasks() {
    let tracker = Arc::new(TenantTokenTracker::new(1000));
    let reservation = tracker.reserve(&scope("a"), 500).unwrap();
    tokio::task::spawn_blocking(move || drop(reservation))
        .await
        .unwrap();
    assert_eq!(tracker.in_flight("a"), 0);
}

#[test]
fn an_unchecked_reservation_is_counted_whatever_the_cap() {
    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let first = tracker.reserve_id("acme", 900).unwrap();
    // Over the cap next to `first`, and alone larger than the cap: both admitted, counted.
    let over = tracker.reserve_unchecked("acme", 400);
    let huge = tracker.reserve_unchecked("newcomer", 5_000);
    assert_eq!((over.tokens(), huge.tokens()), (400, 5_000));
    assert_eq!(tracker.in_flight("acme"), 1_300);
    assert_eq!(tracker.in_flight("newcomer"), 5_000);
    let state = tracker.tenant_state("acme").unwrap();
    assert_eq!((state.high_water, state.overcommits), (1_300, 1));
    // The ordinary path sees them: nothing fits until they end.
    assert!(matches!(
        tracker.reserve_id("acme", 1),
        Err(Error::TenantOverloaded {
            in_flight: 1_300,
            ..
        })
    ));
    drop((first, over, huge));
    assert_eq!(tracker.in_flight("acme"), 0);
    assert_eq!(tracker.in_flight("newcomer"), 0);
    assert_eq!(
        tracker.reserve_unchecked("acme", u64::MAX).tokens(),
        u64::MAX
    );
}
