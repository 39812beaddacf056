//! Admission: one sequence for every request and every ledger.
//!
//! A request the plan metered is admitted in this order, whether its tenant is counted in
//! memory or in Redis:
//!
//! 1. if others of its tenant are waiting for capacity, or others of its class or a higher
//!    one wait for a budget it draws from, it queues behind them (a sheddable request is
//!    refused instead);
//! 2. the shared budgets it draws from are reserved (all or nothing; shadow mode may
//!    override a refusal);
//! 3. the tenant's reservation is made in the ledger, and the windows over time are
//!    charged with it, all or nothing (at once in memory; in Redis, in one round trip for
//!    both; shadow mode likewise);
//! 4. what rides along is attached (budgets, window charges, hold-time clock, wake-up,
//!    metrics), and the guard takes it all.
//!
//! A refusal over a cap, with waiting on, queues the request and repeats 2–4 whenever it
//! is its turn (see [`queue`]) and capacity may have come back.
//!
//! In a layer that waits, a request drawing from a budget in Redis takes 3 before 2: the
//! budget admits it in its turn among the requests waiting on every replica, and a request
//! over its tenant's cap must not take that turn (see `redis::queue`).

pub(crate) mod body;
pub(crate) mod head;
mod refuse;

pub(crate) use self::refuse::reject;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::budget::BudgetKeys;
use crate::config::{Config, Options};
use crate::fair::{Arrival, Priority, Queue, Wake, RECHECK};
use crate::ledger::Reservation;
use crate::ledger::Turn;
use crate::reservation::{Attached, Guard};
use crate::retry_after::HoldClock;
use crate::step::Step;
use crate::window::{Charges, Sizing, TokenCharge};
use crate::{Error, ShadowMode};

/// The outcome of admitting a request: the guard holding its reservation, or why not.
pub(crate) type Admission = Step<Guard>;

/// What a request asks to reserve: its estimate, and what the windows weigh it by.
#[derive(Clone)]
struct Amount {
    tokens: u64,
    sizing: Sizing,
}

/// Admits `tokens` for `tenant` in `class`, drawing from the budgets under `keys`; the
/// windows weigh them by `sizing` when the estimator told it.
#[inline]
pub(crate) fn admit(
    config: &Arc<Config>,
    tenant: &str,
    tokens: u64,
    sizing: Option<&Sizing>,
    keys: BudgetKeys,
    class: Priority,
) -> Admission {
    let Some(options) = config.options.as_deref() else {
        if !config.windows.is_empty() {
            return admit_charged(config, tenant, tokens, sizing);
        }
        return admit_plain(config, tenant, tokens);
    };
    let sizing = sizing.cloned().unwrap_or_default();
    let amount = &Amount { tokens, sizing };
    if let Some(queue) = &options.queue {
        return admit_or_wait(config, tenant, amount, keys, class, queue);
    }
    try_admit(config, tenant, amount, &keys, None)
}

/// [`admit`] in a layer with windows and no other option: the ledger's reservation,
/// charged to the windows with it.
fn admit_charged(
    config: &Arc<Config>,
    tenant: &str,
    tokens: u64,
    sizing: Option<&Sizing>,
) -> Admission {
    if let [window] = &config.windows[..] {
        let unsplit = sizing.map_or(true, |sizing| sizing.prompt.is_none());
        if unsplit && window.counts_every_token() {
            if let Some(reserved) = config.ledger.reserve_counted(tenant, tokens, window) {
                return Step::Now(reserved.map(|(reservation, charge)| {
                    config.metrics.window_remaining(tenant, &charge);
                    record(config, reservation, None, Some(charge), None)
                }));
            }
        }
    }
    let sizing = sizing.cloned().unwrap_or_default();
    let windows = &config.windows;
    match config
        .ledger
        .reserve_charged(tenant, tokens, &sizing, windows, true)
    {
        Step::Now(reserved) => {
            Step::Now(reserved.map(|(r, charges)| hold_charged(config, r, charges)))
        }
        later => {
            let config = Arc::clone(config);
            later.map(move |(r, charges)| hold_charged(&config, r, charges))
        }
    }
}

/// A reservation with the windows' charges, in a layer with no other option.
fn hold_charged(config: &Config, reservation: Reservation, windows: Charges) -> Guard {
    tell_windows(config, reservation.tenant_id(), &windows);
    // Made in place: a reader's room makes `Attached` large to move.
    let mut attached = Box::<Attached>::default();
    attached.windows = windows;
    record(config, reservation, Some(attached), None, None)
}

/// Tells the metrics recorder what `tenant` has left in its windows.
fn tell_windows(config: &Config, tenant: &str, windows: &Charges) {
    for charge in windows.iter() {
        config.metrics.window_remaining(tenant, charge);
    }
}

/// [`admit`] in a plain layer: the ledger's answer is all there is.
#[inline]
fn admit_plain(config: &Arc<Config>, tenant: &str, tokens: u64) -> Admission {
    match config.ledger.reserve(tenant, tokens) {
        Step::Now(reserved) => {
            Step::Now(reserved.map(|reservation| record(config, reservation, None, None, None)))
        }
        later => {
            let config = Arc::clone(config);
            later.map(move |reservation| record(&config, reservation, None, None, None))
        }
    }
}

/// [`admit`](Self::admit) in a layer that lets requests wait.
fn admit_or_wait(
    config: &Arc<Config>,
    tenant: &str,
    amount: &Amount,
    keys: BudgetKeys,
    class: Priority,
    queue: &Arc<Queue>,
) -> Admission {
    match queue.arrival(tenant, class, &keys) {
        Arrival::Go => {}
        Arrival::Queue => return wait(config, tenant, amount.clone(), keys, class, None, None),
        Arrival::Shed(budget) => {
            return Step::Now(Err(Error::Shed {
                tenant_id: tenant.to_owned(),
                budget: budget.into(),
            }))
        }
    }
    let turn = turn_for(config, tenant, class, &keys, queue);
    match try_admit(config, tenant, amount, &keys, turn.as_ref()) {
        Step::Now(Err(error)) if may_wait(&error) => wait(
            config,
            tenant,
            amount.clone(),
            keys,
            class,
            Some(error),
            turn,
        ),
        Step::Now(admitted) => Step::Now(admitted),
        // Redis answers later; a refusal there may still turn into a wait.
        later => {
            let (config, tenant, amount) = (Arc::clone(config), tenant.to_owned(), amount.clone());
            later.then(move |admitted| match admitted {
                Err(error) if may_wait(&error) => {
                    wait(&config, &tenant, amount, keys, class, Some(error), turn)
                }
                admitted => Step::Now(admitted),
            })
        }
    }
}

/// The request's place in the order Redis keeps for the budgets it draws from there,
/// when it may wait and draws from one.
fn turn_for(
    config: &Config,
    tenant: &str,
    class: Priority,
    keys: &BudgetKeys,
    queue: &Arc<Queue>,
) -> Option<Turn> {
    let options = config.options.as_deref()?;
    let weight = options.weight.as_ref().map_or(1, |weight| weight(tenant));
    keys.turn(tenant, class, weight, queue)
}

/// Steps 2 to 4: the budgets, the tenant's reservation, what rides along.
#[inline]
fn try_admit(
    config: &Arc<Config>,
    tenant: &str,
    amount: &Amount,
    keys: &BudgetKeys,
    turn: Option<&Turn>,
) -> Step<Guard> {
    let tokens = amount.tokens;
    let Some(options) = config.options.as_deref() else {
        return admit_plain(config, tenant, tokens);
    };
    if let Some(turn) = turn {
        return try_admit_in_turn(config, tenant, amount, keys, turn);
    }
    let (budgets, shadowed) = match draw(options, tenant, tokens, keys, None) {
        Step::Now(Ok(drawn)) => drawn,
        Step::Now(Err(error)) => return Step::Now(Err(error)),
        drawing => {
            // A budget in Redis: the tenant's reservation once the budgets are held.
            let (config, tenant) = (Arc::clone(config), tenant.to_owned());
            let sizing = amount.sizing.clone();
            return drawing.then(move |drawn| {
                let (budgets, shadowed) = match drawn {
                    Ok(drawn) => drawn,
                    Err(error) => return Step::Now(Err(error)),
                };
                let options = config.options.as_deref().expect("checked above");
                let reserved =
                    reserve_or_shadow(&config, &tenant, tokens, &sizing, &options.shadow);
                let config = Arc::clone(&config);
                reserved.map(move |(reservation, windows, refused)| {
                    let options = config.options.as_deref().expect("checked above");
                    let shadowed = refused.or(shadowed);
                    hold(&config, options, reservation, windows, budgets, shadowed)
                })
            });
        }
    };
    match reserve_or_shadow(config, tenant, tokens, &amount.sizing, &options.shadow) {
        Step::Now(reserved) => Step::Now(reserved.map(|(reservation, windows, refused)| {
            hold(
                config,
                options,
                reservation,
                windows,
                budgets,
                refused.or(shadowed),
            )
        })),
        later => {
            let config = Arc::clone(config);
            later.map(move |(reservation, windows, refused)| {
                let options = config.options.as_deref().expect("checked above");
                let shadowed = refused.or(shadowed);
                hold(&config, options, reservation, windows, budgets, shadowed)
            })
        }
    }
}

/// Steps 2 to 4 for a request with a place in the order Redis keeps for its budgets:
/// the tenant's reservation first, then the budgets in its turn. A request over its
/// tenant's cap so never takes the budgets' turn, nor counts tokens it was not served,
/// nor wakes the others by giving back a budget it could not use.
fn try_admit_in_turn(
    config: &Arc<Config>,
    tenant: &str,
    amount: &Amount,
    keys: &BudgetKeys,
    turn: &Turn,
) -> Step<Guard> {
    let (config, tenant, keys) = (Arc::clone(config), tenant.to_owned(), keys.clone());
    let (turn, Amount { tokens, sizing }) = (turn.clone(), amount.clone());
    Step::later(async move {
        let config = &config;
        let options = config
            .options
            .as_deref()
            .expect("a turn comes with options");
        let reserved = reserve_or_shadow(config, &tenant, tokens, &sizing, &options.shadow);
        let (reservation, windows, refused) = reserved.resolve().await?;
        // Refused here, the tenant's reservation is dropped: released at once.
        let drawn = draw(options, &tenant, tokens, &keys, Some(&turn));
        let (budgets, shadowed) = drawn.resolve().await?;
        let shadowed = refused.or(shadowed);
        Ok(hold(
            config,
            options,
            reservation,
            windows,
            budgets,
            shadowed,
        ))
    })
}

/// Reserves `tokens` for `tenant` in the ledger, charged to the windows with it. A
/// refusal that `shadow` covers is reserved and charged regardless, and handed back
/// beside the reservation.
fn reserve_or_shadow(
    config: &Arc<Config>,
    tenant: &str,
    tokens: u64,
    sizing: &Sizing,
    shadow: &ShadowMode,
) -> Step<(Reservation, Charges, Option<Error>)> {
    let (ledger, windows) = (&config.ledger, &config.windows);
    match ledger.reserve_charged(tenant, tokens, sizing, windows, true) {
        Step::Now(Ok((reservation, charges))) => Step::Now(Ok((reservation, charges, None))),
        Step::Now(Err(error)) if shadow.covers(tenant, &error) => ledger
            .reserve_charged(tenant, tokens, sizing, windows, false)
            .map(|(reservation, charges)| (reservation, charges, Some(error))),
        Step::Now(Err(error)) => Step::Now(Err(error)),
        later => {
            let (config, tenant) = (Arc::clone(config), tenant.to_owned());
            let (sizing, shadow) = (sizing.clone(), shadow.clone());
            later.then(move |reserved| match reserved {
                Ok((reservation, charges)) => Step::Now(Ok((reservation, charges, None))),
                Err(error) if shadow.covers(&tenant, &error) => config
                    .ledger
                    .reserve_charged(&tenant, tokens, &sizing, &config.windows, false)
                    .map(|(reservation, charges)| (reservation, charges, Some(error))),
                Err(error) => Step::Now(Err(error)),
            })
        }
    }
}

/// A reservation the ledger granted, with what rides along with it (the windows'
/// charges among it); `shadowed` is the refusal shadow mode overrode, if it did.
fn hold(
    config: &Config,
    options: &Options,
    reservation: Reservation,
    windows: Charges,
    budgets: Vec<Reservation>,
    shadowed: Option<Error>,
) -> Guard {
    tell_windows(config, reservation.tenant_id(), &windows);
    let wake = options.queue.as_ref().map(|queue| {
        // What the fair share of the budgets counts.
        let counted = (!budgets.is_empty()).then(|| {
            let tenant = reservation.tenant_id();
            let weight = options.weight.as_ref().map_or(1, |weight| weight(tenant));
            queue.served(tenant, reservation.tokens(), weight);
            config.metrics.budget_served(tenant, reservation.tokens());
            Box::from(tenant)
        });
        Wake {
            queue: Arc::clone(queue),
            counted,
        }
    });
    // Made in place: a reader's room makes `Attached` large to move.
    let mut attached = Box::<Attached>::default();
    attached.budgets = budgets;
    attached.windows = windows;
    attached.clock = options
        .hold_times
        .as_ref()
        .map(|(times, _)| HoldClock::start(times));
    attached.wake = wake;
    if let Some(error) = &shadowed {
        options.shadowed.fetch_add(1, Relaxed);
        tracing::info!(
            tenant = error.tenant_id(),
            code = error.code(),
            shadow = true,
            "shadow: would refuse ({error}); admitted"
        );
    }
    record(config, reservation, Some(attached), None, shadowed.as_ref())
}

/// Logs the admission, and tells the metrics recorder.
#[inline]
fn record(
    config: &Config,
    reservation: Reservation,
    attached: Option<Box<Attached>>,
    window: Option<TokenCharge>,
    shadowed: Option<&Error>,
) -> Guard {
    let (tenant, tokens) = (reservation.tenant_id(), reservation.tokens());
    let tag = match shadowed {
        Some(error) => config.metrics.shadowed(tenant, tokens, error.code()),
        None => config.metrics.admitted(tenant, tokens),
    };
    Guard::new(
        reservation,
        attached,
        window,
        tag,
        config.reservation_handle,
    )
}

/// Waits in the queue until it is the request's turn and it fits, or its time is up
/// (then the last refusal stands). Dropping the future leaves the queue and holds
/// nothing.
fn wait(
    config: &Arc<Config>,
    tenant: &str,
    amount: Amount,
    keys: BudgetKeys,
    class: Priority,
    refused: Option<Error>,
    turn: Option<Turn>,
) -> Admission {
    let (config, tenant) = (Arc::clone(config), tenant.to_owned());
    Step::later(async move {
        let config = &config;
        let queue = config.options.as_ref().and_then(|o| o.queue.clone());
        let queue = queue.expect("only called with a queue");
        let turn = turn.or_else(|| turn_for(config, &tenant, class, &keys, &queue));
        // A budget in Redis orders its waiting requests there, across replicas.
        let here = refused
            .as_ref()
            .filter(|error| !orders(turn.as_ref(), error));
        let Some(ticket) = queue.enqueue(&tenant, class, here) else {
            // The queue is full: refused at once.
            return Err(refused.unwrap_or_else(|| config.ledger.overloaded(&tenant, amount.tokens)));
        };
        let started = tokio::time::Instant::now();
        let deadline = started + queue.max_wait;
        let _waiting = Waiting::start(&config.metrics, class, started);
        let mut refused = refused;
        loop {
            if ticket.may_try(&keys) {
                let tried = try_admit(config, &tenant, &amount, &keys, turn.as_ref());
                match tried.resolve().await {
                    Ok(held) => {
                        drop(ticket); // the next in line may fit too: it is woken
                        tracing::debug!(tenant, tokens = amount.tokens, "admitted after waiting");
                        return Ok(held);
                    }
                    Err(error) if may_wait(&error) => {
                        let ordered = orders(turn.as_ref(), &error);
                        if !ordered {
                            // Waiting for something else (its tenant's cap): no place
                            // held in Redis's order meanwhile.
                            give_up(turn.as_ref());
                        }
                        ticket.refused(&error, ordered);
                        refused = Some(error);
                    }
                    Err(error) => return Err(error),
                }
            } else {
                // Others go first here: no place held in Redis's order meanwhile.
                give_up(turn.as_ref());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(
                    refused.unwrap_or_else(|| config.ledger.overloaded(&tenant, amount.tokens))
                );
            }
            ticket.wait(RECHECK.min(deadline - now)).await;
        }
    })
}

/// Reserves in every budget the request draws from, with the refusal shadow mode
/// overrode, if it did.
fn draw(
    options: &Options,
    tenant: &str,
    tokens: u64,
    keys: &BudgetKeys,
    turn: Option<&Turn>,
) -> Step<(Vec<Reservation>, Option<Error>)> {
    if keys.is_empty() {
        return Step::Now(Ok((Vec::new(), None)));
    }
    match keys.reserve(tokens, false, turn) {
        Step::Now(Ok(budgets)) => Step::Now(Ok((budgets, None))),
        Step::Now(Err(error)) if options.shadow.covers(tenant, &error) => keys
            .reserve(tokens, true, None)
            .map(|budgets| (budgets, Some(error))),
        Step::Now(Err(error)) => Step::Now(Err(error)),
        later => {
            let (shadow, tenant, keys) = (options.shadow.clone(), tenant.to_owned(), keys.clone());
            later.then(move |drawn| match drawn {
                Ok(budgets) => Step::Now(Ok((budgets, None))),
                Err(error) if shadow.covers(&tenant, &error) => keys
                    .reserve(tokens, true, None)
                    .map(|budgets| (budgets, Some(error))),
                Err(error) => Step::Now(Err(error)),
            })
        }
    }
}

/// Tells the metrics recorder a request waits, and for how long once it stops.
struct Waiting<'a> {
    metrics: &'a crate::metrics::Metrics,
    class: Priority,
    started: tokio::time::Instant,
}

impl<'a> Waiting<'a> {
    fn start(
        metrics: &'a crate::metrics::Metrics,
        class: Priority,
        started: tokio::time::Instant,
    ) -> Self {
        metrics.waiting(class, 1.0);
        Self {
            metrics,
            class,
            started,
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.metrics.waiting(self.class, -1.0);
        let waited = self.started.elapsed().as_secs_f64();
        self.metrics.waited(self.class, waited);
    }
}

/// Whether `error` is the refusal of a budget that orders its waiters in Redis.
fn orders(turn: Option<&Turn>, error: &Error) -> bool {
    turn.is_some_and(|turn| turn.orders(error))
}

/// Gives up the places held in Redis's order.
fn give_up(turn: Option<&Turn>) {
    if let Some(turn) = turn {
        turn.give_up();
    }
}

/// Whether a refusal may turn into a wait: over a cap now, not larger than one.
fn may_wait(error: &Error) -> bool {
    matches!(
        error,
        Error::TenantOverloaded { .. } | Error::BudgetOverloaded { .. }
    )
}
