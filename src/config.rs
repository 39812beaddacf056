//! The layer's settings, and the decisions they make about one request.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Extensions, HeaderMap, Response, StatusCode};

use crate::budget::Draws;
use crate::extract::{
    extension_tenant, find_pair, header_estimate, header_tenant, EstimateOrigin, Estimator, Found,
    MissingEstimate, MissingTenant, Plan, TenantOrigin, TenantSource,
};
use crate::handle::{Guard, Held, Ledgered};
use crate::reject::Rejection;
use crate::waiting::{Waiting, WakeOnRelease, RECHECK};
use crate::{Error, ShadowMode, SharedBudget, TenantTokenTracker, TokenReservation};

pub(crate) type RejectFn = dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync;

/// Everything a layer was configured with; shared by every service it makes.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) ledger: Ledger,
    pub(crate) tenant: TenantSource,
    pub(crate) estimator: Estimator,
    pub(crate) missing_tenant: MissingTenant,
    pub(crate) missing_estimate: MissingEstimate,
    pub(crate) max_tenant_len: usize,
    pub(crate) retry_after: Duration,
    /// Hold times and the longest `Retry-After` to derive from them, when switched on.
    pub(crate) adaptive_retry: Option<(Arc<crate::hold_time::HoldTimes>, Duration)>,
    pub(crate) on_rejection: Option<Arc<RejectFn>>,
    pub(crate) reservation_handle: bool,
    pub(crate) limit_headers: LimitHeaders,
    pub(crate) shadow: ShadowMode,
    /// Caps shared by every tenant that requests draw from too.
    pub(crate) budgets: Vec<SharedBudget>,
    /// Where requests over the cap wait for capacity, when they may.
    pub(crate) waiting: Option<Arc<Waiting>>,
    /// None of the options above that act on admitted reservations is on (no shadow, no
    /// budgets, no waiting, no hold times, no metrics): admissions take the short path.
    /// Kept up to date by [`Config::settle`].
    pub(crate) plain: bool,
    /// Requests admitted in shadow mode that would have been refused.
    pub(crate) shadowed: Arc<AtomicU64>,
    #[cfg(feature = "metrics")]
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

/// Which headers about the cap admitted responses carry.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct LimitHeaders {
    /// OpenAI's `x-ratelimit-limit-tokens` / `x-ratelimit-remaining-tokens`.
    pub(crate) openai: bool,
    /// The IETF draft's `RateLimit-Policy` / `RateLimit`.
    pub(crate) ietf: bool,
}

impl LimitHeaders {
    pub(crate) fn any(self) -> bool {
        self.openai || self.ietf
    }
}

/// Where reservations are counted.
#[derive(Clone)]
pub(crate) enum Ledger {
    /// In this process: decided at once.
    Local(Arc<TenantTokenTracker>),
    /// In Redis, shared by every replica: one round trip.
    #[cfg(feature = "redis")]
    Redis(crate::RedisTokenTracker),
}

/// A reservation decided later: in Redis, or once capacity comes back.
pub(crate) type Reserving = Pin<Box<dyn Future<Output = Result<Guard, Error>> + Send>>;

/// The outcome of asking the ledger for a reservation.
pub(crate) enum Admission {
    Now(Result<Guard, Error>),
    Later(Reserving),
}

/// Who a request is charged to.
pub(crate) enum Charge<'a> {
    Tenant(Cow<'a, str>),
    Unmetered,
}

/// What [`Config::quick`] made of a request.
pub(crate) enum Quick<'a> {
    /// Reserve these tokens for this tenant.
    Reserve(Cow<'a, str>, u64),
    /// Let it through without reserving.
    Unmetered,
    Refused(Error),
    /// A source needs the request's `Parts` (or its body): take the long way.
    NeedsParts,
}

/// How many tokens a request is charged.
pub(crate) enum Estimate {
    Tokens(u64),
    Unmetered,
    /// Read the body first.
    Body(crate::extract::BodyEstimate),
}

impl Config {
    /// Recomputes what follows from the settings; called after every change.
    pub(crate) fn settle(&mut self) {
        self.plain = matches!(self.shadow, ShadowMode::Off)
            && self.budgets.is_empty()
            && self.waiting.is_none()
            && self.adaptive_retry.is_none()
            && !cfg!(feature = "metrics");
    }

    /// The tenant to charge, or why there is none.
    pub(crate) fn charge<'a>(&'a self, parts: &'a Parts) -> Result<Charge<'a>, Error> {
        self.charge_found(self.tenant.extract(parts, self.max_tenant_len)?)
    }

    /// The tenant to charge, given the one the request names, if any.
    fn charge_found<'a>(&'a self, tenant: Option<Cow<'a, str>>) -> Result<Charge<'a>, Error> {
        match (tenant, &self.missing_tenant) {
            (Some(tenant), _) => Ok(Charge::Tenant(tenant)),
            (None, MissingTenant::DefaultTenant(id)) => Ok(Charge::Tenant(Cow::Borrowed(id))),
            (None, MissingTenant::Unmetered) => Ok(Charge::Unmetered),
            (None, MissingTenant::Reject | MissingTenant::Unauthorized) => {
                Err(Error::MissingTenant)
            }
        }
    }

    /// The estimate to reserve, or why there is none.
    pub(crate) fn estimate(&self, parts: &Parts) -> Result<Estimate, Error> {
        match self.estimator.plan(parts) {
            Plan::Ready(tokens) => self.estimate_found(tokens?),
            Plan::Body(body) => Ok(Estimate::Body(body)),
        }
    }

    /// The estimate to reserve, given the one the request carries, if any.
    fn estimate_found(&self, tokens: Option<u64>) -> Result<Estimate, Error> {
        match (tokens, &self.missing_estimate) {
            (Some(tokens), _) | (None, &MissingEstimate::Default(tokens)) => {
                Ok(Estimate::Tokens(tokens))
            }
            (None, MissingEstimate::Unmetered) => Ok(Estimate::Unmetered),
            (None, MissingEstimate::Reject) => Err(Error::MissingEstimate),
        }
    }

    /// The tenant and the estimate, read from the request's head in place, where the
    /// layer's sources allow (headers and extensions only, no shared budgets): then the
    /// request need not be taken apart into `Parts` and put together again. With two
    /// header sources, one walk over the headers finds both.
    pub(crate) fn quick<'a>(
        &'a self,
        headers: &'a HeaderMap,
        extensions: &'a Extensions,
    ) -> Quick<'a> {
        if !self.budgets.is_empty() {
            return Quick::NeedsParts;
        }
        let estimator = self.estimator.origin();
        let (tenant, estimate) = match (self.tenant.origin(), &estimator) {
            (TenantOrigin::Fn, _) | (_, EstimateOrigin::Parts) => return Quick::NeedsParts,
            (TenantOrigin::Header(t), EstimateOrigin::Header(e)) => {
                let (tenant, estimate) = find_pair(headers, t, e);
                (
                    header_tenant(tenant, t, self.max_tenant_len),
                    Some(estimate),
                )
            }
            (TenantOrigin::Header(t), _) => (
                header_tenant(Found::lookup(headers, t), t, self.max_tenant_len),
                None,
            ),
            (TenantOrigin::Extension, _) => (Ok(extension_tenant(extensions)), None),
        };
        let tenant = match tenant.and_then(|tenant| self.charge_found(tenant)) {
            Ok(Charge::Tenant(tenant)) => tenant,
            Ok(Charge::Unmetered) => return Quick::Unmetered,
            Err(error) => return Quick::Refused(error),
        };
        let tokens = match (estimator, estimate) {
            (EstimateOrigin::Header(e), found) => {
                header_estimate(found.unwrap_or_else(|| Found::lookup(headers, e)), e)
            }
            _ => match self.estimator.estimate_head(headers) {
                Some(tokens) => tokens,
                None => return Quick::NeedsParts,
            },
        };
        match tokens.and_then(|tokens| self.estimate_found(tokens)) {
            Ok(Estimate::Tokens(tokens)) => Quick::Reserve(tenant, tokens),
            Ok(Estimate::Unmetered) => Quick::Unmetered,
            Ok(Estimate::Body(_)) => Quick::NeedsParts,
            Err(error) => Quick::Refused(error),
        }
    }

    /// Reserves `tokens` for `tenant`, at once in memory, or in a future for Redis. The
    /// caller hands the request the guard's handle, if it has one.
    pub(crate) fn admit(self: &Arc<Self>, tenant: &str, tokens: u64, draws: Draws) -> Admission {
        let with_handle = self.reservation_handle;
        match &self.ledger {
            Ledger::Local(tracker) if self.plain => {
                let reserved = tracker.reserve_id(tenant, tokens).map(|reservation| {
                    tracing::debug!(tenant, tokens, "admitted token reservation");
                    Guard::new(Held::new(Ledgered::Local(reservation)), with_handle)
                });
                Admission::Now(reserved)
            }
            Ledger::Local(tracker) => {
                let held = match &self.waiting {
                    // Others are waiting for this tenant: queue behind them.
                    Some(waiting) if waiting.has_queue(tenant) => {
                        return self.wait(tracker, tenant, tokens, draws, None)
                    }
                    Some(_) => match self.admit_local(tracker, tenant, tokens, &draws) {
                        Err(error) if may_wait(&error) => {
                            return self.wait(tracker, tenant, tokens, draws, Some(error))
                        }
                        held => held,
                    },
                    None => self.admit_local(tracker, tenant, tokens, &draws),
                };
                Admission::Now(held.map(|held| {
                    tracing::debug!(tenant, tokens, "admitted token reservation");
                    Guard::new(held, with_handle)
                }))
            }
            #[cfg(feature = "redis")]
            Ledger::Redis(tracker) => {
                // The budgets first: they answer at once, so their refusals cost no round
                // trip. Should Redis refuse, they are released when dropped.
                let (budgets, shadowed) = match self.draw(tenant, tokens, &draws) {
                    Ok(drawn) => drawn,
                    Err(error) => return Admission::Now(Err(error)),
                };
                let (tracker, tenant, config) =
                    (tracker.clone(), tenant.to_owned(), Arc::clone(self));
                Admission::Later(Box::pin(async move {
                    let (reservation, refused) = match tracker.reserve(&tenant, tokens).await {
                        Ok(reservation) => (reservation, None),
                        Err(error) if config.shadow.covers(&tenant, &error) => (
                            tracker.reserve_unchecked(&tenant, tokens).await?,
                            Some(error),
                        ),
                        Err(error) => return Err(error),
                    };
                    let shadowed = refused.or(shadowed);
                    let reservation = Ledgered::Redis(reservation);
                    let held = config
                        .held(reservation, shadowed.as_ref())
                        .with_budgets(budgets);
                    tracing::debug!(tenant, tokens, "admitted token reservation");
                    Ok(Guard::new(held, with_handle))
                }))
            }
        }
    }

    /// Waits in the tenant's queue until the request is first in line and fits, or its
    /// time is up (then the last refusal stands). Dropping the future leaves the queue and
    /// holds nothing.
    fn wait(
        self: &Arc<Self>,
        tracker: &Arc<TenantTokenTracker>,
        tenant: &str,
        tokens: u64,
        draws: Draws,
        refused: Option<Error>,
    ) -> Admission {
        let waiting = Arc::clone(self.waiting.as_ref().expect("only called when waiting"));
        let (config, tracker, tenant) = (Arc::clone(self), Arc::clone(tracker), tenant.to_owned());
        let overloaded =
            move |tracker: &TenantTokenTracker, tenant: &str| Error::TenantOverloaded {
                tenant_id: tenant.to_owned(),
                requested: tokens,
                in_flight: tracker.in_flight(tenant),
                cap: tracker.cap(tenant),
            };
        Admission::Later(Box::pin(async move {
            let Some(ticket) = waiting.enqueue(&tenant) else {
                // The queue is full: refused at once.
                return Err(refused.unwrap_or_else(|| overloaded(&tracker, &tenant)));
            };
            let deadline = tokio::time::Instant::now() + waiting.max_wait;
            let mut refused = refused;
            loop {
                if ticket.is_first() {
                    match config.admit_local(&tracker, &tenant, tokens, &draws) {
                        Ok(held) => {
                            drop(ticket); // the next in line may fit too: it is woken
                            tracing::debug!(tenant, tokens, "admitted after waiting");
                            return Ok(Guard::new(held, config.reservation_handle));
                        }
                        Err(error) if may_wait(&error) => refused = Some(error),
                        Err(error) => return Err(error),
                    }
                }
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Err(refused.unwrap_or_else(|| overloaded(&tracker, &tenant)));
                }
                ticket.wait(RECHECK.min(deadline - now)).await;
            }
        }))
    }

    /// Reserves in memory against the tenant's cap, then the budgets: all or nothing.
    #[inline]
    fn admit_local(
        &self,
        tracker: &TenantTokenTracker,
        tenant: &str,
        tokens: u64,
        draws: &Draws,
    ) -> Result<Held, Error> {
        let (reservation, refused) = match tracker.reserve_id(tenant, tokens) {
            // The common case: admitted, and no budget to draw from.
            Ok(reservation) if draws.is_empty() => {
                return Ok(self.held(Ledgered::Local(reservation), None));
            }
            Ok(reservation) => (reservation, None),
            Err(error) if self.shadow.covers(tenant, &error) => {
                (tracker.reserve_unchecked(tenant, tokens), Some(error))
            }
            Err(error) => return Err(error),
        };
        // A budget's refusal drops `reservation`, which releases it.
        let (budgets, shadowed) = self.draw(tenant, tokens, draws)?;
        let shadowed = refused.or(shadowed);
        Ok(self
            .held(Ledgered::Local(reservation), shadowed.as_ref())
            .with_budgets(budgets))
    }

    /// Reserves in every budget the request draws from, with the refusal shadow mode
    /// overrode, if it did.
    fn draw(
        &self,
        tenant: &str,
        tokens: u64,
        draws: &Draws,
    ) -> Result<(Vec<TokenReservation>, Option<Error>), Error> {
        if draws.is_empty() {
            return Ok((Vec::new(), None));
        }
        match draws.reserve(tokens, false) {
            Ok(budgets) => Ok((budgets, None)),
            Err(error) if self.shadow.covers(tenant, &error) => {
                Ok((draws.reserve(tokens, true)?, Some(error)))
            }
            Err(error) => Err(error),
        }
    }

    /// An admitted reservation, counted and logged; `shadowed` is the refusal shadow mode
    /// overrode, if it did.
    #[inline]
    fn held(&self, reservation: Ledgered, shadowed: Option<&Error>) -> Held {
        let mut held = Held::new(reservation);
        if let Some((times, _)) = &self.adaptive_retry {
            held = held.timed(crate::hold_time::HoldClock::start(times));
        }
        if let Some(waiting) = &self.waiting {
            let tenant = Box::from(held.tenant_id());
            let waiting = Arc::clone(waiting);
            held = held.waking(WakeOnRelease { waiting, tenant });
        }
        if let Some(error) = shadowed {
            self.shadowed.fetch_add(1, Relaxed);
            tracing::info!(
                tenant = error.tenant_id(),
                code = error.code(),
                shadow = true,
                "shadow: would refuse ({error}); admitted"
            );
        }
        #[cfg(feature = "metrics")]
        let held = {
            let (tenant, tokens) = (held.tenant_id(), held.tokens());
            let tag = match shadowed {
                Some(error) => self.metrics.shadowed(tenant, tokens, error.code()),
                None => self.metrics.admitted(tenant, tokens),
            };
            held.tagged(tag)
        };
        held
    }

    /// The response for a refused request.
    pub(crate) fn reject(&self, error: Error) -> Response<Bytes> {
        let status = match (&error, &self.missing_tenant) {
            (Error::MissingTenant, MissingTenant::Unauthorized) => StatusCode::UNAUTHORIZED,
            _ => error.status(),
        };
        match &error {
            Error::TenantOverloaded {
                tenant_id,
                requested,
                in_flight,
                cap,
            } => tracing::info!(
                tenant = %tenant_id,
                tokens = requested,
                in_flight,
                cap,
                "refused: tenant over its in-flight token cap"
            ),
            Error::RequestTooLarge {
                tenant_id,
                tokens,
                cap,
            } => tracing::info!(
                tenant = %tenant_id,
                tokens,
                cap,
                "refused: request larger than the tenant's cap"
            ),
            Error::BackendUnavailable { reason } => tracing::info!(
                code = error.code(),
                %status,
                reason,
                "refused: the shared token ledger is unavailable"
            ),
            other => tracing::info!(code = other.code(), %status, "refused: {other}"),
        }
        #[cfg(feature = "metrics")]
        self.metrics.refused(error.tenant_id(), error.code());
        let retry_after = match (&error, &self.adaptive_retry) {
            (
                Error::TenantOverloaded {
                    requested,
                    in_flight,
                    cap,
                    ..
                },
                Some((times, max)),
            )
            | (
                Error::BudgetOverloaded {
                    requested,
                    in_flight,
                    cap,
                    ..
                },
                Some((times, max)),
            ) => times
                .retry_after(*requested, *in_flight, *cap, *max)
                .unwrap_or(self.retry_after),
            _ => self.retry_after,
        };
        let ietf = self.limit_headers.ietf;
        let rejection = Rejection::new(error, status, retry_after, ietf);
        match &self.on_rejection {
            Some(on_rejection) => on_rejection(&rejection),
            None => rejection.to_response(),
        }
    }
}

/// Whether a refusal may turn into a wait: over a cap now, not larger than one.
fn may_wait(error: &Error) -> bool {
    matches!(
        error,
        Error::TenantOverloaded { .. } | Error::BudgetOverloaded { .. }
    )
}
