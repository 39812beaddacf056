//! The Redis side of the ledger boundary (`crate::ledger`): each answer a step, made now
//! from this replica's headroom when it can be, after a round trip otherwise. `wrap` turns
//! the lease into the boundary's reservation inside the one future, so that no answer is
//! boxed twice.

use std::sync::Arc;

use super::{RedisReservation, RedisTokenTracker, Turn};
use crate::fair::Priority;
use crate::fair::Queue;
use crate::step::Step;
use crate::window::{Charge, Remote, Tally};
use crate::TokenWindow;

impl RedisTokenTracker {
    /// Reserves `tokens` for `tenant` against its cap.
    pub(crate) fn reserve_step<R: Send + 'static>(
        &self,
        tenant: &str,
        tokens: u64,
        wrap: fn(RedisReservation) -> R,
    ) -> Step<R> {
        if let Some(drawn) = self.reserve_locally(tenant, tokens) {
            return Step::Now(Ok(wrap(drawn)));
        }
        let (tracker, tenant) = (self.clone(), tenant.to_owned());
        Step::later(async move {
            let reservation = tracker.reserve_in_redis(&tenant, tokens).await;
            reservation.map(wrap)
        })
    }

    /// Reserves `tokens` for `tenant`, under its cap when `checked`, and charges the
    /// `windows`, priced so, each in the bucket named last, in the same call (see
    /// `windows`); never from the headroom.
    pub(crate) fn reserve_charged_step<R: Send + 'static>(
        &self,
        tenant: &str,
        tokens: u64,
        checked: bool,
        windows: Vec<(TokenWindow, Tally, String)>,
        wrap: fn(RedisReservation) -> R,
        elsewhere: fn(Box<dyn Remote>, Tally) -> Charge,
    ) -> Step<(R, Option<Vec<Charge>>)> {
        let (tracker, tenant) = (self.clone(), tenant.to_owned());
        Step::later(async move {
            let reserved = tracker.reserve_charged(&tenant, tokens, checked, windows, elsewhere);
            let (reservation, charges) = reserved.await?;
            Ok((wrap(reservation), charges))
        })
    }

    /// Reserves `tokens` for `tenant` whatever its cap (shadow mode).
    pub(crate) fn reserve_unchecked_step<R: Send + 'static>(
        &self,
        tenant: &str,
        tokens: u64,
        wrap: fn(RedisReservation) -> R,
    ) -> Step<R> {
        let (tracker, tenant) = (self.clone(), tenant.to_owned());
        Step::later(async move {
            let reservation = tracker.reserve_unchecked(&tenant, tokens).await;
            reservation.map(wrap)
        })
    }

    /// Reserves `tokens` of the budget `key` in `turn` (see `queue`).
    pub(crate) fn reserve_in_turn_step<R: Send + 'static>(
        &self,
        key: &str,
        tokens: u64,
        turn: &Arc<Turn>,
        wrap: fn(RedisReservation) -> R,
    ) -> Step<R> {
        let (tracker, key, turn) = (self.clone(), key.to_owned(), Arc::clone(turn));
        Step::later(async move {
            let reserved = tracker.reserve_in_turn(&key, tokens, &turn).await;
            reserved.map(wrap)
        })
    }

    /// A place in the order this tracker keeps across replicas for the requests of
    /// `tenant` in `class`, weighing `weight`, waiting for its budgets.
    pub(crate) fn turn(
        &self,
        tenant: &str,
        class: Priority,
        weight: u32,
        queue: &Arc<Queue>,
    ) -> Arc<Turn> {
        Arc::new(Turn::new(tenant, class, weight, Arc::clone(queue)))
    }
}
