//! The tracker's hot path under shuttle: thousands of randomly scheduled interleavings
//! (and PCT schedules, which find bugs of a given depth with a known probability) of a few
//! threads reserving, resizing, releasing and evicting.
//!
//! Runs only when the crate is built for shuttle:
//!
//! ```text
//! RUSTFLAGS="--cfg tower_tenant_tokens_shuttle" cargo test --release --test shuttle
//! ```
#![cfg(tower_tenant_tokens_shuttle)]

use std::sync::Arc;

use shuttle::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use shuttle::thread;
use tower_tenant_tokens::{Error, TenantTokenTracker};

/// Explores `f` under random schedules, then under PCT schedules of depth 3.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let f = std::sync::Arc::new(f);
    let random = std::sync::Arc::clone(&f);
    shuttle::check_random(move || random(), 20_000);
    shuttle::check_pct(move || f(), 20_000, 3);
}

#[test]
fn concurrent_reservations_never_exceed_the_cap_and_end_at_zero() {
    model(|| {
        let tracker = Arc::new(TenantTokenTracker::new(10));
        let threads: Vec<_> = [6, 7]
            .into_iter()
            .map(|tokens| {
                let tracker = Arc::clone(&tracker);
                thread::spawn(move || match tracker.reserve_id("a", tokens) {
                    Ok(reservation) => {
                        assert!(tracker.in_flight("a") <= 10, "over the cap");
                        drop(reservation);
                        true
                    }
                    Err(Error::TenantOverloaded { .. }) => false,
                    Err(other) => panic!("unexpected refusal: {other}"),
                })
            })
            .collect();
        let admitted = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|&a| a);
        assert!(admitted.count() >= 1, "the first to arrive always fits");
        let state = tracker.tenant_state("a").expect("tracked while cached");
        assert_eq!((state.in_flight, state.reservations), (0, 0));
        assert!(state.high_water <= 10);
    });
}

#[test]
fn eviction_racing_admission_never_creates_a_second_entry_for_a_tenant() {
    // An idle bound of 0 evicts a tenant as soon as its last reservation ends, so each
    // release races the other thread's admission. Two reservations of the full cap held at
    // once would mean two live entries for one tenant.
    model(|| {
        let tracker = Arc::new(TenantTokenTracker::builder(10).max_idle_tenants(0).build());
        let holding = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (tracker, holding) = (Arc::clone(&tracker), Arc::clone(&holding));
                thread::spawn(move || {
                    if let Ok(reservation) = tracker.reserve_id("x", 10) {
                        assert_eq!(holding.fetch_add(1, SeqCst), 0, "two full-cap holders");
                        holding.fetch_sub(1, SeqCst);
                        drop(reservation);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(tracker.in_flight("x"), 0);
        assert_eq!(
            tracker.tracked_tenants(),
            0,
            "nothing idle is kept with a bound of 0"
        );
    });
}

#[test]
fn resizes_racing_reservations_release_exactly() {
    model(|| {
        let tracker = Arc::new(TenantTokenTracker::new(10));
        let mut held = tracker.reserve_id("a", 4).unwrap();
        let other = {
            let tracker = Arc::clone(&tracker);
            thread::spawn(move || {
                if let Ok(mut reservation) = tracker.reserve_id("a", 3) {
                    // Within the cap, or refused with nothing changed.
                    match reservation.try_resize(6) {
                        Ok(()) => assert_eq!(reservation.tokens(), 6),
                        Err(_) => assert_eq!(reservation.tokens(), 3),
                    }
                }
            })
        };
        held.resize(1);
        held.resize(8); // growth is allowed and counted, even above the cap
        drop(held);
        other.join().unwrap();
        let state = tracker.tenant_state("a").unwrap();
        assert_eq!((state.in_flight, state.reservations), (0, 0));
    });
}

#[test]
fn a_sweep_never_evicts_a_tenant_with_work_in_flight() {
    model(|| {
        let tracker = Arc::new(TenantTokenTracker::builder(10).max_idle_tenants(0).build());
        let held = tracker.reserve_id("busy", 10).unwrap();
        let sweeper = {
            let tracker = Arc::clone(&tracker);
            // Each release of an idle tenant sweeps the (single) shard.
            thread::spawn(move || drop(tracker.reserve_id("other", 1).unwrap()))
        };
        let refused = tracker.reserve_id("busy", 10);
        assert!(
            matches!(refused, Err(Error::TenantOverloaded { .. })),
            "the busy entry was replaced by a fresh one: {refused:?}"
        );
        sweeper.join().unwrap();
        drop(held);
        assert_eq!(tracker.tracked_tenants(), 0);
    });
}
