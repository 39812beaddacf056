//! The ledger boundary: where a tenant's (or a budget key's) tokens are counted.
//!
//! Two ledgers implement it: a [`TenantTokenTracker`] in this process, which answers at
//! once, and a Redis tracker shared by every replica (feature `redis`), which may need a
//! round trip. Every part of admission reserves, resizes and releases through [`Ledger`]
//! and [`Reservation`], and this file is the one place that names both.
//!
//! The boundary is an enum rather than a trait object: there are two ledgers, both known
//! when the crate is compiled, and an enum keeps a reservation in memory unboxed and its
//! calls inlined, which the plain path's cost depends on. Without the `redis` feature the
//! Redis variant holds a type that cannot be made (see `redis_off.rs`), so that no `cfg`
//! is needed here and the compiler removes the arm.

use std::fmt;
use std::sync::Arc;

use crate::fair::Priority;
use crate::fair::Queue;
use crate::redis::{RedisReservation, RedisTokenTracker};
use crate::step::{Pending, Step};
use crate::tracker::entry::Entry;
use crate::window::{charge_all, force_all, Charge, Charges, Sizing, TokenCharge};
use crate::{Error, TenantTokenTracker, TokenReservation, TokenWindow};

/// Where a layer, or a shared budget, counts tokens: a [`TenantTokenTracker`] in this
/// process (in an `Arc`), or a Redis tracker shared by every replica (feature `redis`:
/// `redis::RedisTokenTracker`). Made with `From`, so
/// [`TenantTokenLayer::new`](crate::TenantTokenLayer::new) and
/// [`SharedBudget::new`](crate::SharedBudget::new) take either.
///
/// With Redis, a shared budget's lease and the tenant's are two leases, each in its own
/// key (a Redis Cluster may keep them in different slots, on different masters): one is
/// reserved, then the other, and a refusal of either releases what was granted; a replica
/// that dies between the two leaves a lease that expires with its TTL, like any other.
#[derive(Clone, Debug)]
pub struct TokenLedger(pub(crate) Ledger);

impl From<Arc<TenantTokenTracker>> for TokenLedger {
    fn from(tracker: Arc<TenantTokenTracker>) -> Self {
        TokenLedger(Ledger::Local(tracker))
    }
}

/// A Redis tracker (feature `redis`). Without the feature the type cannot be made, and
/// this impl is neither public nor compiled into anything.
impl From<RedisTokenTracker> for TokenLedger {
    fn from(tracker: RedisTokenTracker) -> Self {
        TokenLedger(Ledger::Redis(tracker))
    }
}

/// A waiting request's place in the order Redis keeps, across replicas, for the budgets
/// in Redis it draws from.
pub(crate) type Turn = Arc<crate::redis::Turn>;

/// Where reservations are counted.
#[derive(Clone)]
pub(crate) enum Ledger {
    /// In this process: answered at once.
    Local(Arc<TenantTokenTracker>),
    /// In Redis, shared by every replica: one round trip.
    Redis(RedisTokenTracker),
}

impl Ledger {
    /// Reserves `tokens` for `tenant` against its cap.
    #[inline]
    pub(crate) fn reserve(&self, tenant: &str, tokens: u64) -> Step<Reservation> {
        match self {
            Ledger::Local(tracker) => {
                Step::Now(tracker.reserve_id(tenant, tokens).map(Reservation::Local))
            }
            Ledger::Redis(tracker) => tracker.reserve_step(tenant, tokens, Reservation::Redis),
        }
    }

    /// Reserves `tokens` for `tenant` with their charge to `window`, a window that
    /// [counts every token alike](TokenWindow::counts_every_token), all or nothing, in a
    /// ledger in this process. `None` for a ledger in Redis: its windows are charged
    /// there ([`reserve_charged`](Self::reserve_charged)).
    #[inline]
    pub(crate) fn reserve_counted(
        &self,
        tenant: &str,
        tokens: u64,
        window: &TokenWindow,
    ) -> Option<Result<(Reservation, TokenCharge), Error>> {
        let Ledger::Local(tracker) = self else {
            return None;
        };
        let reserved = tracker.reserve_id(tenant, tokens).and_then(|reservation| {
            // Refused here, the reservation is dropped: released.
            let charge = window.charge_tokens(tenant, tokens, reservation.kept_bucket())?;
            Ok((Reservation::Local(reservation), charge))
        });
        Some(reserved)
    }

    /// Reserves `tokens` for `tenant`, under its cap when `checked`, and charges them to
    /// `windows` (weighed by `sizing`) with it, all or nothing: next to the tracker in
    /// memory; in Redis in the same call as the lease, for every replica (charged here
    /// instead when the failure policy answered without Redis). Not `checked` (shadow
    /// mode), everything is charged whatever it holds.
    pub(crate) fn reserve_charged(
        &self,
        tenant: &str,
        tokens: u64,
        sizing: &Sizing,
        windows: &[TokenWindow],
        checked: bool,
    ) -> Step<(Reservation, Charges)> {
        if windows.is_empty() {
            // Nothing to charge: a Redis tracker may draw from its headroom.
            let reserved = match checked {
                true => self.reserve(tenant, tokens),
                false => self.reserve_unchecked(tenant, tokens),
            };
            return reserved.map(|reservation| (reservation, Charges::default()));
        }
        let tracker = match self {
            Ledger::Local(tracker) => {
                let reserved = match checked {
                    true => tracker.reserve_id(tenant, tokens),
                    false => Ok(tracker.reserve_unchecked(tenant, tokens)),
                };
                return Step::Now(reserved.and_then(|reservation| {
                    let charges = charge_here(windows, tenant, tokens, sizing, checked)?;
                    Ok((Reservation::Local(reservation), charges))
                }));
            }
            Ledger::Redis(tracker) => tracker,
        };
        let model = sizing.model.as_deref();
        let priced: Result<Vec<_>, Error> = windows
            .iter()
            .map(|window| {
                let tally = window.price(tokens, sizing)?;
                Ok((window.clone(), tally, window.bucket_name(model)))
            })
            .collect();
        let priced = match priced {
            Ok(priced) => priced,
            Err(error) => return Step::Now(Err(error)),
        };
        let reserved = tracker.reserve_charged_step(
            tenant,
            tokens,
            checked,
            priced,
            Reservation::Redis,
            Charge::elsewhere,
        );
        let (tenant, sizing, windows) = (tenant.to_owned(), sizing.clone(), windows.to_vec());
        reserved.then(move |reserved| {
            Step::Now(reserved.and_then(|(reservation, charged)| {
                let charges = match charged {
                    Some(charged) => charged.into_iter().collect(),
                    // Redis was not asked: charged here, as the failure policy counts.
                    None => charge_here(&windows, &tenant, tokens, &sizing, checked)?,
                };
                Ok((reservation, charges))
            }))
        })
    }

    /// Reserves `tokens` for `tenant` whatever its cap (shadow mode).
    pub(crate) fn reserve_unchecked(&self, tenant: &str, tokens: u64) -> Step<Reservation> {
        match self {
            Ledger::Local(tracker) => Step::Now(Ok(Reservation::Local(
                tracker.reserve_unchecked(tenant, tokens),
            ))),
            Ledger::Redis(tracker) => {
                tracker.reserve_unchecked_step(tenant, tokens, Reservation::Redis)
            }
        }
    }

    /// Reserves `tokens` for `key` in `turn`: in the order the ledger keeps across
    /// replicas for the requests waiting for it, when it keeps one and the request has a
    /// place in it; as [`reserve`](Self::reserve) otherwise.
    pub(crate) fn reserve_in_turn(
        &self,
        key: &str,
        tokens: u64,
        turn: Option<&Turn>,
    ) -> Step<Reservation> {
        match (self, turn) {
            (Ledger::Redis(tracker), Some(turn)) => {
                tracker.reserve_in_turn_step(key, tokens, turn, Reservation::Redis)
            }
            _ => self.reserve(key, tokens),
        }
    }

    /// A place in the order this ledger keeps across replicas for the requests waiting
    /// for it; `None` for a ledger in this process, whose waiting requests are ordered by
    /// the process's own queue.
    pub(crate) fn turn(
        &self,
        tenant: &str,
        class: Priority,
        weight: u32,
        queue: &Arc<Queue>,
    ) -> Option<Turn> {
        match self {
            Ledger::Local(_) => None,
            Ledger::Redis(tracker) => Some(tracker.turn(tenant, class, weight, queue)),
        }
    }

    /// The cap that applies to `tenant` (from this replica's settings, for Redis).
    pub(crate) fn cap(&self, tenant: &str) -> u64 {
        match self {
            Ledger::Local(tracker) => tracker.cap(tenant),
            Ledger::Redis(tracker) => tracker.cap(tenant),
        }
    }

    /// The tracker, when the ledger is in this process.
    pub(crate) fn local(&self) -> Option<&Arc<TenantTokenTracker>> {
        match self {
            Ledger::Local(tracker) => Some(tracker),
            Ledger::Redis(_) => None,
        }
    }

    /// The tracker, when the ledger is in Redis.
    pub(crate) fn redis(&self) -> Option<&RedisTokenTracker> {
        match self {
            Ledger::Local(_) => None,
            Ledger::Redis(tracker) => Some(tracker),
        }
    }

    /// The cap of `tenant` and what it has in flight here, for a refusal made without
    /// the ledger's own answer (a full queue). Redis is not asked: `0` in flight.
    pub(crate) fn overloaded(&self, tenant: &str, tokens: u64) -> Error {
        let in_flight = match self {
            Ledger::Local(tracker) => tracker.in_flight(tenant),
            Ledger::Redis(_) => 0,
        };
        let cap = self.cap(tenant);
        Error::TenantOverloaded {
            tenant_id: tenant.to_owned(),
            requested: tokens,
            in_flight,
            cap,
        }
    }
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ledger::Local(tracker) => f.debug_tuple("Local").field(tracker).finish(),
            Ledger::Redis(tracker) => f.debug_tuple("Redis").field(tracker).finish(),
        }
    }
}

/// Charges `tokens` to `tenant` in `windows` in this process, all or none when
/// `checked`, whatever they hold when not.
fn charge_here(
    windows: &[TokenWindow],
    tenant: &str,
    tokens: u64,
    sizing: &Sizing,
    checked: bool,
) -> Result<Charges, Error> {
    match checked {
        true => charge_all(windows, tenant, tokens, sizing),
        false => Ok(force_all(windows, tenant, tokens, sizing)),
    }
}

/// A reservation in the ledger it came from.
pub(crate) enum Reservation {
    Local(TokenReservation),
    Redis(RedisReservation),
}

/// The outcome of a resize that checks growth against the cap.
pub(crate) enum Resize {
    Done(Result<(), Error>),
    /// The growth is checked in Redis: wait for it without holding any lock.
    Later(Pending<()>),
}

/// The tenant's name, kept without a copy where the ledger has one.
#[derive(Clone)]
pub(crate) enum TenantName {
    Entry(crate::sync::Arc<Entry>),
    Shared(Arc<str>),
}

impl std::ops::Deref for TenantName {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            TenantName::Entry(entry) => &entry.id,
            TenantName::Shared(name) => name,
        }
    }
}

impl Reservation {
    pub(crate) fn tenant_id(&self) -> &str {
        match self {
            Reservation::Local(reservation) => reservation.tenant_id(),
            Reservation::Redis(reservation) => reservation.tenant_id(),
        }
    }

    /// The tenant, for a handle that outlives the reservation.
    pub(crate) fn tenant(&self) -> TenantName {
        match self {
            Reservation::Local(reservation) => TenantName::Entry(reservation.entry()),
            Reservation::Redis(reservation) => TenantName::Shared(reservation.tenant()),
        }
    }

    pub(crate) fn tokens(&self) -> u64 {
        match self {
            Reservation::Local(reservation) => reservation.tokens(),
            Reservation::Redis(reservation) => reservation.tokens(),
        }
    }

    /// Sets the tokens held, growth unchecked; returns what is held now.
    pub(crate) fn resize(&mut self, tokens: u64) -> u64 {
        match self {
            Reservation::Local(reservation) => reservation.resize(tokens),
            Reservation::Redis(reservation) => reservation.resize(tokens),
        }
    }

    /// Sets the tokens held, growing only within the cap.
    pub(crate) fn try_resize(&mut self, tokens: u64) -> Resize {
        match self {
            Reservation::Local(reservation) => Resize::Done(reservation.try_resize(tokens)),
            Reservation::Redis(reservation) => match reservation.try_resize_now(tokens) {
                Some(done) => Resize::Done(done),
                None => Resize::Later(reservation.growth(tokens)),
            },
        }
    }

    /// The tenant's cap and what is left of it now; `None` when unknown.
    pub(crate) fn limits(&self) -> Option<(u64, u64)> {
        match self {
            Reservation::Local(reservation) => Some(reservation.limits()),
            Reservation::Redis(reservation) => reservation.limits(),
        }
    }
}
