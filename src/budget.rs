//! Shared budgets: caps every tenant draws from together, next to each tenant's own.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;

use crate::fair::{Draws, Priority, Queue};
use crate::ledger::Turn;
use crate::ledger::{Ledger, Reservation, TokenLedger};
use crate::step::Step;
use crate::{Error, TenantTokenTracker};

/// Finds a request's key from its head, its body when the estimator read it, and the
/// model the estimator found there.
type KeyFn = dyn Fn(&Parts, Option<&Bytes>, Option<&str>) -> Option<String> + Send + Sync;

/// A cap all tenants share, such as the upstream provider's capacity, or one per model,
/// that each request draws from next to its tenant's own cap
/// ([`TenantTokenLayer::shared_budget`](crate::TenantTokenLayer::shared_budget)).
///
/// The budget's ledger is a tracker whose "tenants" are the budget's keys (`"upstream"`,
/// `"gpt-4o"`, …): its default cap and cap function set the budgets' caps. In this
/// process, a [`TenantTokenTracker`] (its snapshot shows what each key has in flight);
/// shared by every replica, a Redis tracker (feature `redis`; give it its own key prefix,
/// apart from the tenants'), so that replicas together never draw more than the upstream
/// takes. See [`TokenLedger`](crate::TokenLedger).
///
/// A request reserves against its tenant and every budget it draws from, all or nothing:
/// when one refuses, what the others granted is released at once and the refusal names
/// the budget ([`Error::BudgetOverloaded`], 429; [`Error::BudgetTooLarge`], 413). The
/// reservations are released together, and a handler's reconciliation resizes them all.
///
/// ```
/// use std::sync::Arc;
/// use tower_tenant_tokens::{SharedBudget, TenantTokenLayer, TenantTokenTracker};
///
/// let tenants = Arc::new(TenantTokenTracker::new(20_000));
/// // The provider takes 200,000 tokens in flight from all tenants together.
/// let upstream = Arc::new(TenantTokenTracker::new(200_000));
/// let layer = TenantTokenLayer::new(tenants)
///     .shared_budget(SharedBudget::new("upstream", upstream));
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct SharedBudget {
    ledger: Ledger,
    key: Key,
}

#[derive(Clone)]
enum Key {
    Fixed(Arc<str>),
    Fn {
        find: Arc<KeyFn>,
        /// Whether it keys by the model, which the estimator is then asked for.
        by_model: bool,
    },
}

impl SharedBudget {
    /// The longest model name [`per_model`](Self::per_model) keys a budget by, in bytes.
    pub const MAX_MODEL_KEY_LEN: usize = crate::window::MAX_MODEL_KEY_LEN;

    /// One budget, `name`, in `ledger` (a `TenantTokenTracker` in an `Arc`, or a Redis
    /// tracker), that every request draws from.
    pub fn new(name: impl Into<String>, ledger: impl Into<TokenLedger>) -> Self {
        Self {
            ledger: ledger.into().0,
            key: Key::Fixed(Arc::from(name.into())),
        }
    }

    /// One budget per key `f` finds on the request (a model, a region, an upstream), in
    /// `tracker`; a request for which `f` finds none does not draw from this budget.
    ///
    /// `f` sees the request head, and the body when the layer's estimator read it (`None`
    /// otherwise). It runs once the estimate is known, before anything is reserved.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tower_tenant_tokens::{SharedBudget, TenantTokenTracker};
    ///
    /// let models = Arc::new(TenantTokenTracker::new(100_000));
    /// models.set_cap("gpt-4o", 40_000);
    /// let per_model = SharedBudget::keyed(models, |parts, _body| {
    ///     let model = parts.headers.get("x-model")?.to_str().ok()?;
    ///     Some(model.to_owned())
    /// });
    /// # let _ = per_model;
    /// ```
    pub fn keyed<F>(ledger: impl Into<TokenLedger>, f: F) -> Self
    where
        F: Fn(&Parts, Option<&Bytes>) -> Option<String> + Send + Sync + 'static,
    {
        let find = move |parts: &Parts, body: Option<&Bytes>, _: Option<&str>| f(parts, body);
        Self::with_key_fn(ledger, Arc::new(find), false)
    }

    /// A budget keyed by `find`, which is given the model when `by_model`.
    pub(crate) fn with_key_fn(
        ledger: impl Into<TokenLedger>,
        find: Arc<KeyFn>,
        by_model: bool,
    ) -> Self {
        Self {
            ledger: ledger.into().0,
            key: Key::Fn { find, by_model },
        }
    }

    /// The ledger of this budget's keys, when it counts in this process.
    pub fn tracker(&self) -> Option<&Arc<TenantTokenTracker>> {
        self.ledger.local()
    }

    /// The key this request draws from, if any; `model` is the one the estimator found.
    fn key(&self, parts: &Parts, body: Option<&Bytes>, model: Option<&str>) -> Option<String> {
        match &self.key {
            Key::Fixed(name) => Some(name.to_string()),
            Key::Fn { find, .. } => find(parts, body, model),
        }
    }

    /// Whether this budget is keyed by the model, which the estimator is then asked for.
    pub(crate) fn by_model(&self) -> bool {
        matches!(self.key, Key::Fn { by_model: true, .. })
    }
}

impl fmt::Debug for SharedBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = match &self.key {
            Key::Fixed(name) => name.to_string(),
            Key::Fn {
                by_model: false, ..
            } => "<per request>".to_owned(),
            Key::Fn { by_model: true, .. } => "<model>".to_owned(),
        };
        f.debug_struct("SharedBudget")
            .field("key", &key)
            .field("ledger", &self.ledger)
            .finish()
    }
}

/// The budget keys one request draws from, found before anything is reserved; `None` for
/// the many layers without budgets, so that nothing is built or dropped for them.
#[derive(Default, Clone)]
pub(crate) struct BudgetKeys(Option<Vec<(Ledger, String)>>);

impl BudgetKeys {
    #[inline]
    pub(crate) fn find(
        budgets: &[SharedBudget],
        parts: &Parts,
        body: Option<&Bytes>,
        model: Option<&str>,
    ) -> Self {
        let key = |budget: &SharedBudget| budget.key(parts, body, model);
        BudgetKeys(Some(
            budgets
                .iter()
                .filter_map(|budget| Some((budget.ledger.clone(), key(budget)?)))
                .collect(),
        ))
    }

    /// Reserves `tokens` under every key, or none: the first refusal releases what the
    /// others granted. `unchecked` reserves whatever the caps (shadow mode). At once when
    /// every budget counts in this process; after the round trips when one is in Redis.
    ///
    /// With `turn`, a budget in Redis admits the request in its turn among the requests
    /// waiting for it on every replica.
    pub(crate) fn reserve(
        &self,
        tokens: u64,
        unchecked: bool,
        turn: Option<&Turn>,
    ) -> Step<Vec<Reservation>> {
        let keys = self.0.as_deref().unwrap_or_default();
        let mut held = Vec::with_capacity(keys.len());
        for (at, (ledger, key)) in keys.iter().enumerate() {
            match reserve_key(ledger, key, tokens, unchecked, turn) {
                Step::Now(Ok(reservation)) => held.push(reservation),
                Step::Now(Err(error)) => return Step::Now(Err(budget_error(key, error))),
                Step::Later(pending) => {
                    // A budget in Redis: the rest in order, after it answers.
                    let rest = keys[at + 1..].to_vec();
                    let (key, turn) = (key.clone(), turn.cloned());
                    return Step::later(async move {
                        held.push(pending.await.map_err(|error| budget_error(&key, error))?);
                        for (ledger, key) in rest {
                            let reserved =
                                reserve_key(&ledger, &key, tokens, unchecked, turn.as_ref());
                            let reserved = reserved.resolve().await;
                            held.push(reserved.map_err(|error| budget_error(&key, error))?);
                        }
                        Ok(held)
                    });
                }
            }
        }
        Step::Now(Ok(held))
    }

    /// The smallest cap among the budgets the request draws from, if it draws from any.
    pub(crate) fn smallest_cap(&self) -> Option<u64> {
        let keys = self.0.as_deref().unwrap_or_default();
        keys.iter().map(|(ledger, key)| ledger.cap(key)).min()
    }

    /// A place in the order kept across replicas by the first budget it draws from that
    /// keeps one (a budget in Redis); `None` when none does.
    pub(crate) fn turn(
        &self,
        tenant: &str,
        class: Priority,
        weight: u32,
        queue: &Arc<Queue>,
    ) -> Option<Turn> {
        let keys = self.0.as_deref().unwrap_or_default();
        keys.iter()
            .find_map(|(ledger, _)| ledger.turn(tenant, class, weight, queue))
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.0.as_ref().map_or(true, Vec::is_empty)
    }
}

impl Draws for BudgetKeys {
    fn draws_from(&self, key: &str) -> bool {
        let keys = self.0.as_deref().unwrap_or_default();
        keys.iter().any(|(_, drawn)| drawn == key)
    }

    fn ordered_here(&self) -> bool {
        let keys = self.0.as_deref().unwrap_or_default();
        !keys.is_empty() && !keys.iter().any(|(ledger, _)| ledger.redis().is_some())
    }
}

/// Reserves `tokens` under `key` in `ledger`: in `turn` when the ledger keeps an order
/// across replicas and the request has a place in it; whatever the cap when `unchecked`.
fn reserve_key(
    ledger: &Ledger,
    key: &str,
    tokens: u64,
    unchecked: bool,
    turn: Option<&Turn>,
) -> Step<Reservation> {
    match unchecked {
        true => ledger.reserve_unchecked(key, tokens),
        false => ledger.reserve_in_turn(key, tokens, turn),
    }
}

/// A tracker's refusal of a budget's key, as the budget's refusal.
pub(crate) fn budget_error(budget: &str, error: Error) -> Error {
    match error {
        Error::TenantOverloaded {
            requested,
            in_flight,
            cap,
            ..
        } => Error::BudgetOverloaded {
            budget: budget.to_owned(),
            requested,
            in_flight,
            cap,
        },
        Error::RequestTooLarge { tokens, cap, .. } => Error::BudgetTooLarge {
            budget: budget.to_owned(),
            tokens,
            cap,
        },
        other => other,
    }
}
