//! Without the `redis` feature there is no ledger in Redis. The same names as the `redis`
//! module's, as types that cannot be made, so that the ledger's one dispatch needs no
//! `cfg` and the compiler removes its Redis arms.

use std::sync::Arc;

use crate::fair::Priority;
use crate::fair::Queue;
use crate::step::{Pending, Step};
use crate::Error;

/// Never made: there is no Redis ledger without the feature.
#[derive(Debug, Clone)]
pub(crate) enum RedisTokenTracker {}

/// Never made: there is no Redis ledger without the feature.
pub(crate) enum RedisReservation {}

/// Never made: only a Redis ledger orders waiting requests across replicas.
pub(crate) enum Turn {}

impl RedisTokenTracker {
    pub(crate) fn reserve_step<R>(
        &self,
        _tenant: &str,
        _tokens: u64,
        _wrap: fn(RedisReservation) -> R,
    ) -> Step<R> {
        match *self {}
    }

    pub(crate) fn reserve_charged_step<R>(
        &self,
        _tenant: &str,
        _tokens: u64,
        _checked: bool,
        _windows: Vec<(crate::TokenWindow, crate::window::Tally, String)>,
        _wrap: fn(RedisReservation) -> R,
        _elsewhere: fn(
            Box<dyn crate::window::Remote>,
            crate::window::Tally,
        ) -> crate::window::Charge,
    ) -> Step<(R, Option<Vec<crate::window::Charge>>)> {
        match *self {}
    }

    pub(crate) fn reserve_unchecked_step<R>(
        &self,
        _tenant: &str,
        _tokens: u64,
        _wrap: fn(RedisReservation) -> R,
    ) -> Step<R> {
        match *self {}
    }

    pub(crate) fn reserve_in_turn_step<R>(
        &self,
        _key: &str,
        _tokens: u64,
        _turn: &Arc<Turn>,
        _wrap: fn(RedisReservation) -> R,
    ) -> Step<R> {
        match *self {}
    }

    pub(crate) fn turn(
        &self,
        _tenant: &str,
        _class: Priority,
        _weight: u32,
        _queue: &Arc<Queue>,
    ) -> Arc<Turn> {
        match *self {}
    }

    pub(crate) fn cap(&self, _tenant: &str) -> u64 {
        match *self {}
    }
}

impl RedisReservation {
    pub(crate) fn tenant_id(&self) -> &str {
        match *self {}
    }

    pub(crate) fn tenant(&self) -> Arc<str> {
        match *self {}
    }

    pub(crate) fn tokens(&self) -> u64 {
        match *self {}
    }

    pub(crate) fn resize(&mut self, _tokens: u64) -> u64 {
        match *self {}
    }

    pub(crate) fn try_resize_now(&mut self, _tokens: u64) -> Option<Result<(), Error>> {
        match *self {}
    }

    pub(crate) fn growth(&self, _tokens: u64) -> Pending<()> {
        match *self {}
    }

    pub(crate) fn limits(&self) -> Option<(u64, u64)> {
        match *self {}
    }
}

impl Turn {
    pub(crate) fn orders(&self, _error: &Error) -> bool {
        match *self {}
    }

    pub(crate) fn give_up(&self) {
        match *self {}
    }
}
