//! Limits over time: how many tokens a tenant may use per minute, per day, per 30 days.
//!
//! A window is a bucket per tenant that refills continuously, as OpenAI's own limits do:
//! it holds at most the tenant's limit, and refills at the limit divided by the period.
//! A request is charged its estimate when it is admitted, next to its in-flight
//! reservation and all or nothing with it; a refused request charges nothing. A response
//! that outgrows its estimate is charged as it grows (never refused mid-stream), and the
//! usage the upstream reports settles the charge, down or up. A request whose usage is
//! never reported stays charged at the most it held.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::WindowRefusal;
use crate::table::{Keyed, Table};
use crate::Error;

mod charge;
mod price;

use self::charge::Place;
pub(crate) use self::charge::{
    charge_all, force_all, Charge, Charged, Charges, Remote, Standing, Tally, TokenCharge,
};
use self::price::{Measure, Weights};
pub use self::price::{Price, Prices};
pub(crate) use self::price::{Sizing, Usage};

type LimitFn = dyn Fn(&str) -> Option<u64> + Send + Sync;

/// A limit on the tokens each tenant uses over time (per minute, per day, per 30 days),
/// charged in the same admission as the in-flight cap
/// ([`TenantTokenLayer::window`](crate::TenantTokenLayer::window)).
///
/// Each tenant has a bucket that holds at most its limit and refills continuously at
/// `limit ÷ period` (so in any one period a tenant may use at most its limit plus one
/// period's refill, when it starts with a full bucket). A request is admitted only if its
/// estimate fits the bucket now, as well as the tenant's in-flight cap and every shared
/// budget; one that does not is refused with 429 and a `Retry-After` computed from the
/// refill rate, and one larger than the limit itself with 413.
///
/// Limits: a default for every tenant, a limit function (plans, looked up once per tenant
/// and again on [`refresh_limits`](Self::refresh_limits)), and limits set at run time
/// ([`set_limit`](Self::set_limit)), in that order of precedence from last to first.
///
/// Clones share the window, and a layer can hold several (a minute's and a day's). A
/// layer whose ledger is in this process counts the window here; a layer whose ledger is
/// a Redis tracker (feature `redis`) keeps each tenant's bucket in Redis beside its
/// leases, for every replica, and charges it in the same call as the tenant's lease
/// (read it with `RedisTokenTracker::window_remaining`). Replicas configure a window
/// alike, as they do caps: its name and what it counts name its buckets there.
///
/// ```
/// use std::sync::Arc;
/// use tower_tenant_tokens::{TenantTokenLayer, TenantTokenTracker, TokenWindow};
///
/// let per_minute = TokenWindow::per_minute(50_000);
/// per_minute.set_limit("enterprise", 1_000_000);
/// let layer = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(20_000)))
///     .window(per_minute.clone())
///     .window(TokenWindow::per_day(2_000_000));
/// assert_eq!(per_minute.remaining("enterprise"), 1_000_000);
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct TokenWindow {
    inner: Arc<Inner>,
}

struct Inner {
    /// Tells this window's buckets from others' ([`KeptBucket`]): never reused.
    id: u64,
    period: Duration,
    name: String,
    /// What a token of each kind counts for.
    measure: Measure,
    default: AtomicU64,
    lookup: RwLock<Option<Arc<LimitFn>>>,
    /// The limits set per tenant ([`TokenWindow::set_limit`]).
    set: RwLock<HashMap<Box<str>, u64, foldhash::fast::RandomState>>,
    /// Whether each tenant has a bucket per model its requests name.
    by_model: bool,
    /// Whether every token counts alike, one bucket per tenant
    /// ([`TokenWindow::counts_every_token`]).
    every_token: bool,
    /// The buckets, by tenant (and model: see [`scope`]), spread over shards so that
    /// requests of different tenants on different cores seldom share a lock.
    shards: Box<[Shard]>,
    /// Picks a bucket's shard.
    spread: foldhash::fast::RandomState,
}

/// Some of a window's buckets.
struct Shard {
    buckets: RwLock<Table<Arc<Bucket>>>,
    /// The number of buckets above which idle full ones are dropped.
    prune_at: std::sync::atomic::AtomicUsize,
}

/// How many shards a window's buckets are spread over (a power of two).
const SHARDS: usize = 16;

/// One tenant's bucket.
struct Bucket {
    /// The window's [id](Inner::id).
    owner: u64,
    /// What the bucket is kept under ([`scope`]).
    scope: Box<str>,
    level: Mutex<Level>,
    /// The window's period, so that a charge needs only its bucket.
    period: Duration,
    /// Whether the window counts tokens (not spend).
    tokens: bool,
    /// The window's name, for the metrics.
    window: Arc<str>,
}

struct Level {
    /// Tokens left; below zero when responses outgrew their charges.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
    limit: u64,
    /// The limit as a float, and the tokens it refills a second: worked out when the
    /// limit is set, not on every charge.
    full: f64,
    rate: f64,
}

/// The longest model name a bucket is kept under, as a shared budget's
/// ([`SharedBudget::MAX_MODEL_KEY_LEN`](crate::SharedBudget::MAX_MODEL_KEY_LEN)): a client
/// can neither escape a limit with a long name nor make a long key.
pub(crate) const MAX_MODEL_KEY_LEN: usize = 256;

/// Buckets a shard keeps before idle full ones are dropped (a full bucket is a fresh
/// one).
const PRUNE_AT: usize = 64;

impl TokenWindow {
    /// A window of `period` in which each tenant may use `limit` tokens by default.
    ///
    /// A period of zero is taken as one nanosecond.
    pub fn new(limit: u64, period: Duration) -> Self {
        Self::measuring(limit, period, Measure::Tokens(Weights::ALL), false)
    }

    /// A spend window: each tenant may spend `limit` (in the currency unit `prices` are
    /// in) per `period`, each request priced by its model ([`Prices`]).
    ///
    /// It counts in millionths of the currency unit: [`limit`](Self::limit),
    /// [`remaining`](Self::remaining) and [`set_limit`](Self::set_limit) are in millionths
    /// (a limit of 1.00 is 1,000,000). A negative or non-finite `limit` is 0.
    pub fn spend(limit: f64, period: Duration, prices: Prices) -> Self {
        Self::measuring(millionths(limit), period, Measure::Spend(prices), false)
    }

    /// A spend window of `limit` per day; see [`spend`](Self::spend).
    pub fn spend_per_day(limit: f64, prices: Prices) -> Self {
        Self::spend(limit, Duration::from_secs(24 * 3600), prices)
    }

    /// A spend window of `limit` per 30 days; see [`spend`](Self::spend).
    pub fn spend_per_30_days(limit: f64, prices: Prices) -> Self {
        Self::spend(limit, Duration::from_secs(30 * 24 * 3600), prices)
    }

    /// This window counting input (prompt) tokens only. Call it when building the
    /// window: it starts again with no tenant's usage.
    pub fn input_only(self) -> Self {
        self.weighing(|weights| weights.output = 0.0)
    }

    /// This window counting output tokens only (reasoning included, as upstreams bill
    /// it). Call it when building the window: it starts again with no tenant's usage.
    pub fn output_only(self) -> Self {
        self.weighing(|weights| {
            weights.input = 0.0;
            weights.cached_input = 0.0;
        })
    }

    /// This window counting each cached input token (OpenAI's
    /// `prompt_tokens_details.cached_tokens`, Anthropic's `cache_read_input_tokens`) as
    /// `weight` tokens (default 1; 0 counts them not at all). Cached tokens are known
    /// only from the usage reported, so a request is charged at full weight until its
    /// usage settles it. A negative or non-finite `weight` is 1. Call it when building
    /// the window: it starts again with no tenant's usage.
    pub fn cached_input_weight(self, weight: f64) -> Self {
        let weight = if weight.is_finite() && weight >= 0.0 {
            weight
        } else {
            1.0
        };
        self.weighing(|weights| weights.cached_input = weight.min(weights.input))
    }

    /// The window again, its token weights changed by `change` (a spend window's prices
    /// are its weights: it is left as it is).
    fn weighing(self, change: impl FnOnce(&mut Weights)) -> Self {
        let Measure::Tokens(mut weights) = self.inner.measure.clone() else {
            return self;
        };
        change(&mut weights);
        let by_model = self.inner.by_model;
        self.rebuilt(Measure::Tokens(weights), by_model)
    }

    /// A tenant's bucket per model its requests name (OpenAI's own limits are per model):
    /// each model its own, all with the tenant's limit. A request that names no model
    /// (an estimate from a header) counts in a bucket of its own. A model name longer than
    /// [`SharedBudget::MAX_MODEL_KEY_LEN`](crate::SharedBudget::MAX_MODEL_KEY_LEN) bytes
    /// counts in the bucket of its first that many bytes. Models are what clients send:
    /// each one a tenant names takes a bucket until it is full again. Call it when
    /// building the window: it starts again with no tenant's usage.
    pub fn per_model(self) -> Self {
        let measure = self.inner.measure.clone();
        self.rebuilt(measure, true)
    }

    /// This window's settings, measuring `measure`, no tenant's usage.
    fn rebuilt(self, measure: Measure, by_model: bool) -> Self {
        let limit = self.default_limit();
        let window = Self::measuring(limit, self.inner.period, measure, by_model);
        *write(&window.inner.lookup) = read(&self.inner.lookup).clone();
        *write(&window.inner.set) = read(&self.inner.set).clone();
        window
    }

    fn measuring(limit: u64, period: Duration, measure: Measure, by_model: bool) -> Self {
        let period = period.max(Duration::from_nanos(1));
        let name = match measure {
            Measure::Tokens(_) => name_of("tokens", period),
            Measure::Spend(_) => name_of("spend", period),
        };
        static WINDOWS: AtomicU64 = AtomicU64::new(0);
        let every_token = matches!(measure, Measure::Tokens(weights) if weights == Weights::ALL);
        Self {
            inner: Arc::new(Inner {
                id: WINDOWS.fetch_add(1, Relaxed),
                period,
                name,
                measure,
                default: limit.into(),
                lookup: RwLock::new(None),
                set: RwLock::default(),
                by_model,
                every_token: every_token && !by_model,
                shards: (0..SHARDS)
                    .map(|_| Shard {
                        buckets: RwLock::default(),
                        prune_at: PRUNE_AT.into(),
                    })
                    .collect(),
                spread: foldhash::fast::RandomState::default(),
            }),
        }
    }

    /// `limit` tokens per minute, OpenAI's TPM.
    pub fn per_minute(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(60))
    }

    /// `limit` tokens per day.
    pub fn per_day(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(24 * 3600))
    }

    /// `limit` tokens per 30 days.
    pub fn per_30_days(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(30 * 24 * 3600))
    }

    /// What the window is called in refusals: `"tokens per minute"`, `"tokens per day"`,
    /// `"tokens per 30 days"`, else `"tokens per N s"`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The window's period.
    pub fn period(&self) -> Duration {
        self.inner.period
    }

    /// The limit of tenants without one of their own.
    pub fn default_limit(&self) -> u64 {
        self.inner.default.load(Relaxed)
    }

    /// Sets the limit of tenants without one of their own; buckets already made keep
    /// theirs until [`refresh_limits`](Self::refresh_limits).
    pub fn set_default_limit(&self, limit: u64) {
        self.inner.default.store(limit, Relaxed);
    }

    /// Looks up the limit of each tenant with `f` (`None`: the default), once per
    /// tenant's bucket and again on [`refresh_limits`](Self::refresh_limits).
    pub fn set_limit_fn<F>(&self, f: F)
    where
        F: Fn(&str) -> Option<u64> + Send + Sync + 'static,
    {
        *self
            .inner
            .lookup
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(f));
        self.refresh_limits();
    }

    /// Sets `tenant_id`'s limit, at once and until [`remove_limit`](Self::remove_limit).
    /// What it has used stays used: a lower limit may leave it nothing for a while.
    pub fn set_limit(&self, tenant_id: &str, limit: u64) {
        write(&self.inner.set).insert(Box::from(tenant_id), limit);
        self.inner.relimit(Some(tenant_id));
    }

    /// Gives `tenant_id` the limit the function or the default says again. Whether it had
    /// one of its own.
    pub fn remove_limit(&self, tenant_id: &str) -> bool {
        let had = write(&self.inner.set).remove(tenant_id).is_some();
        self.inner.relimit(Some(tenant_id));
        had
    }

    /// Asks the limit function and the default again for every tenant whose limit was not
    /// set with [`set_limit`](Self::set_limit) (after plans change).
    pub fn refresh_limits(&self) {
        self.inner.relimit(None);
    }

    /// `tenant_id`'s limit in this window.
    pub fn limit(&self, tenant_id: &str) -> u64 {
        match self
            .inner
            .find(&scope(tenant_id, None, self.inner.by_model))
        {
            Some(bucket) => lock(&bucket.level).limit,
            None => self.inner.limit_of(tenant_id),
        }
    }

    /// Tokens `tenant_id` may still use now: its bucket's level in this process, 0 when
    /// responses outgrew what was charged for them. In a window [per
    /// model](Self::per_model), the bucket of its requests that name no model. (A window
    /// counted in Redis is read with `RedisTokenTracker::window_remaining`.)
    pub fn remaining(&self, tenant_id: &str) -> u64 {
        self.inner.remaining(tenant_id, None)
    }

    /// How many buckets the window keeps in this process now. Buckets full again and held
    /// by no request are dropped once a window keeps many, so this follows the tenants
    /// (and models) that used it within about a period, and the returning tenants whose
    /// entries the tracker keeps (see [`guide::windows`](crate::guide::windows)).
    pub fn tracked_buckets(&self) -> usize {
        self.inner.buckets()
    }

    /// Tokens `tenant_id` may still use now with `model`, in a window
    /// [per model](Self::per_model); as [`remaining`](Self::remaining) in any other.
    pub fn remaining_for_model(&self, tenant_id: &str, model: &str) -> u64 {
        self.inner.remaining(tenant_id, Some(model))
    }

    /// Charges `tenant_id`'s bucket `tokens` as the request's `sizing` weighs them, or
    /// refuses; `force` charges whatever the bucket holds (never refused).
    pub(crate) fn charge(
        &self,
        tenant_id: &str,
        tokens: u64,
        sizing: &Sizing,
        force: bool,
    ) -> Result<Charge, Error> {
        let tally = self.price(tokens, sizing)?;
        let bucket = self.inner.bucket(tenant_id, sizing.model.as_deref());
        self.draw(&bucket, tenant_id, tally.units, force)?;
        Ok(Charge {
            place: Place::Here(bucket),
            tally,
        })
    }

    /// Charges `tenant_id`'s bucket `tokens`, for a window that
    /// [counts every token alike](Self::counts_every_token), or refuses.
    /// The tenant's bucket is the one kept beside its entry in the tracker (`kept`) when
    /// it is this window's; else found here, and kept there if the place is free and the
    /// tenant is `returning` (seen before).
    #[inline]
    pub(crate) fn charge_tokens(
        &self,
        tenant_id: &str,
        tokens: u64,
        (kept, returning): (&KeptBucket, bool),
    ) -> Result<TokenCharge, Error> {
        let find = || self.inner.bucket(tenant_id, None);
        let bucket = kept.get_or(self.inner.id, returning, find);
        self.draw(&bucket, tenant_id, tokens as f64, false)?;
        Ok(TokenCharge::new(bucket, tokens))
    }

    /// Takes `units` from `bucket` as it stands now, or refuses if it does not hold them
    /// (unless `force`).
    #[inline]
    fn draw(&self, bucket: &Bucket, tenant_id: &str, units: f64, force: bool) -> Result<(), Error> {
        let now = Instant::now();
        let mut level = lock(&bucket.level);
        level.refill(now);
        let too_large = units > level.full;
        if !force && (too_large || level.tokens < units) {
            let (remaining, limit) = (level.tokens.max(0.0), level.limit);
            drop(level);
            return Err(self.refusal(tenant_id, units, remaining, limit, too_large));
        }
        level.tokens -= units;
        Ok(())
    }

    /// Whether this window counts every token alike, one bucket per tenant: a request's
    /// charge is then its token count alone ([`TokenCharge`]).
    pub(crate) fn counts_every_token(&self) -> bool {
        self.inner.every_token
    }

    /// What a request of `tokens`, sized so, comes to in this window.
    pub(crate) fn price(&self, tokens: u64, sizing: &Sizing) -> Result<Tally, Error> {
        let weights = match &self.inner.measure {
            Measure::Tokens(weights) => *weights,
            Measure::Spend(prices) => match prices.get(sizing.model.as_deref()) {
                Some(price) => price.weights(),
                None => {
                    return Err(Error::UnpricedModel {
                        model: sizing.model.as_deref().unwrap_or_default().to_owned(),
                    })
                }
            },
        };
        let used = Usage::estimated(tokens, sizing.prompt);
        let units = used.units(&weights);
        Ok(Tally {
            weights,
            used,
            units,
        })
    }

    /// The refusal of `units` by a bucket holding `remaining` of `limit` (`too_large`:
    /// `units` is more than the limit).
    #[cold]
    pub(crate) fn refusal(
        &self,
        tenant_id: &str,
        units: f64,
        remaining: f64,
        limit: u64,
        too_large: bool,
    ) -> Error {
        let rate = limit as f64 / self.inner.period.as_secs_f64();
        let refusal = Box::new(WindowRefusal {
            tenant_id: tenant_id.to_owned(),
            window: self.inner.name.clone(),
            requested: units.ceil() as u64,
            remaining: remaining as u64,
            limit,
            retry_after: match too_large {
                true => Duration::ZERO,
                false => seconds(units - remaining, rate),
            },
            reset: seconds(limit as f64 - remaining, rate),
        });
        match too_large {
            true => Error::WindowTooLarge(refusal),
            false => Error::WindowExceeded(refusal),
        }
    }

    /// What the window's buckets are called where they are kept for every replica: its
    /// name and what it counts (`tokens-per-minute`; `tokens-per-day-i0-c0-o1` for output
    /// only; `spend-per-day`). Replicas that configure a window alike share its buckets.
    pub(crate) fn key_name(&self) -> String {
        let mut name = self.inner.name.replace(' ', "-");
        if self.inner.by_model {
            name.push_str("-per-model");
        }
        if let Measure::Tokens(weights) = &self.inner.measure {
            if *weights != Weights::ALL {
                let Weights {
                    input,
                    cached_input,
                    output,
                } = weights;
                name.push_str(&format!("-i{input}-c{cached_input}-o{output}"));
            }
        }
        name
    }

    /// The name of the bucket of requests naming `model` where buckets are kept for
    /// every replica: the window's [`key_name`](Self::key_name), and for a window per
    /// model the model.
    pub(crate) fn bucket_name(&self, model: Option<&str>) -> String {
        match self.inner.by_model {
            false => self.key_name(),
            true => format!("{}-m:{}", self.key_name(), model_key(model)),
        }
    }

    /// Whether the window counts tokens (not spend).
    pub(crate) fn counts_tokens(&self) -> bool {
        matches!(self.inner.measure, Measure::Tokens(_))
    }

    /// Whether the window needs the request's model (a spend window prices by it; a
    /// window per model keys by it).
    pub(crate) fn wants_model(&self) -> bool {
        matches!(self.inner.measure, Measure::Spend(_)) || self.inner.by_model
    }
}

impl Inner {
    /// The limit of `tenant_id`: its own, else the function's, else the default.
    fn limit_of(&self, tenant_id: &str) -> u64 {
        if let Some(limit) = read(&self.set).get(tenant_id) {
            return *limit;
        }
        let lookup = read(&self.lookup).clone();
        lookup
            .and_then(|lookup| lookup(tenant_id))
            .unwrap_or_else(|| self.default.load(Relaxed))
    }

    /// The hash of `scope`, and the shard its bucket is in.
    fn locate(&self, scope: &str) -> (u64, &Shard) {
        use std::hash::BuildHasher;
        let hash = self.spread.hash_one(scope);
        // The table uses the hash's low and top bits; the middle ones pick the shard.
        (hash, &self.shards[(hash >> 32) as usize & (SHARDS - 1)])
    }

    fn find(&self, scope: &str) -> Option<Arc<Bucket>> {
        let (hash, shard) = self.locate(scope);
        read(&shard.buckets).get(hash, scope).cloned()
    }

    /// How many buckets there are now.
    fn buckets(&self) -> usize {
        let counts = self.shards.iter().map(|shard| read(&shard.buckets).len());
        counts.sum()
    }

    /// What `tenant_id` has left in its bucket (for `model`, per model) now.
    fn remaining(&self, tenant_id: &str, model: Option<&str>) -> u64 {
        match self.find(&scope(tenant_id, model, self.by_model)) {
            Some(bucket) => bucket.standing().remaining,
            None => self.limit_of(tenant_id),
        }
    }

    /// `tenant_id`'s bucket (for `model`, per model), made full if it has none.
    fn bucket(&self, tenant_id: &str, model: Option<&str>) -> Arc<Bucket> {
        let scope = scope(tenant_id, model, self.by_model);
        let (hash, shard) = self.locate(&scope);
        if let Some(bucket) = read(&shard.buckets).get(hash, &scope) {
            return Arc::clone(bucket);
        }
        let limit = self.limit_of(tenant_id);
        let mut buckets = write(&shard.buckets);
        if let Some(bucket) = buckets.get(hash, &scope) {
            return Arc::clone(bucket); // made by a racing request meanwhile
        }
        if buckets.len() >= shard.prune_at.load(Relaxed) {
            self.prune(shard, &mut buckets);
        }
        let bucket = Arc::new(Bucket {
            owner: self.id,
            scope: Box::from(scope),
            level: Mutex::new(Level::full(limit, self.period, Instant::now())),
            period: self.period,
            tokens: matches!(self.measure, Measure::Tokens(_)),
            window: Arc::from(self.name.as_str()),
        });
        Arc::clone(buckets.insert(hash, bucket))
    }

    /// Gives the buckets of `tenant` (of every tenant: `None`) the limit that is theirs
    /// now. What they used stays used.
    fn relimit(&self, tenant: Option<&str>) {
        let of_tenant = |scope: &str| tenant.map_or(true, |t| tenant_of(scope, self.by_model) == t);
        let mut buckets = Vec::new();
        for shard in self.shards.iter() {
            let shard = read(&shard.buckets);
            let found = shard.entries().filter(|bucket| of_tenant(&bucket.scope));
            buckets.extend(found.cloned());
        }
        let now = Instant::now();
        for bucket in buckets {
            let limit = self.limit_of(tenant_of(&bucket.scope, self.by_model));
            let mut level = lock(&bucket.level);
            level.refill(now);
            level.set_limit(limit, self.period);
        }
    }

    /// Drops the buckets of `shard` (its table, `buckets`) that are full and held by no
    /// request: a fresh bucket is the same. The next prune waits until the table has
    /// doubled.
    fn prune(&self, shard: &Shard, buckets: &mut Table<Arc<Bucket>>) {
        let now = Instant::now();
        buckets.retain(|bucket| {
            if Arc::strong_count(bucket) > 1 {
                return true;
            }
            let mut level = lock(&bucket.level);
            level.refill(now);
            level.tokens < level.full
        });
        shard
            .prune_at
            .store((buckets.len() * 2).max(PRUNE_AT), Relaxed);
    }
}

/// What a bucket is kept under: the tenant, or for a window per model the tenant and the
/// model (its length first, so that no two pairs make the same key).
fn scope<'a>(tenant_id: &'a str, model: Option<&str>, by_model: bool) -> std::borrow::Cow<'a, str> {
    match by_model {
        false => std::borrow::Cow::Borrowed(tenant_id),
        true => {
            let model = model_key(model);
            std::borrow::Cow::Owned(format!("{}:{tenant_id}{model}", tenant_id.len()))
        }
    }
}

/// The tenant a bucket's scope names.
fn tenant_of(scope: &str, by_model: bool) -> &str {
    if !by_model {
        return scope;
    }
    let parsed = scope.split_once(':').and_then(|(len, rest)| {
        let len: usize = len.parse().ok()?;
        rest.get(..len)
    });
    parsed.unwrap_or(scope)
}

/// The part of a model's name its bucket is kept under: at most
/// [`SharedBudget::MAX_MODEL_KEY_LEN`](crate::SharedBudget::MAX_MODEL_KEY_LEN) bytes, cut
/// on a character's boundary; `""` for none.
fn model_key(model: Option<&str>) -> &str {
    let model = model.unwrap_or_default();
    let mut end = model.len().min(MAX_MODEL_KEY_LEN);
    while !model.is_char_boundary(end) {
        end -= 1;
    }
    &model[..end]
}

/// A tenant's bucket of one window, kept beside the tenant's entry in the tracker, so
/// that a request, which has found the entry, finds the bucket without a lookup of its
/// own. The first window to ask takes the place, for as long as the entry lives; any
/// other looks its bucket up.
///
/// Only a tenant seen more than once gets one: a kept bucket is never dropped while its
/// entry lives (the tracker's idle bound bounds them), so a spray of one-off tenant ids
/// must not keep theirs.
#[derive(Default)]
pub(crate) struct KeptBucket(OnceLock<Arc<Bucket>>);

impl KeptBucket {
    /// The bucket kept here if it is window `owner`'s; else the one `find` returns, kept
    /// here if the place is free and the tenant is `returning`.
    #[inline]
    fn get_or(
        &self,
        owner: u64,
        returning: bool,
        find: impl FnOnce() -> Arc<Bucket>,
    ) -> Arc<Bucket> {
        match self.0.get() {
            Some(kept) if kept.owner == owner => Arc::clone(kept),
            Some(_) => find(),
            None if !returning => find(),
            None => {
                let found = find();
                let _ = self.0.set(Arc::clone(&found));
                found
            }
        }
    }
}

impl Keyed for Arc<Bucket> {
    fn key(&self) -> &str {
        &self.scope
    }
}

impl Bucket {
    /// Takes `units` more from the bucket as it stands now, or gives back what is
    /// negative (never beyond full).
    fn take(&self, units: f64) {
        let mut level = lock(&self.level);
        level.refill(Instant::now());
        match units >= 0.0 {
            true => level.tokens -= units,
            false => level.refund(-units),
        }
    }

    /// The bucket's limit and what it holds now.
    fn standing(&self) -> Standing {
        let mut level = lock(&self.level);
        level.refill(Instant::now());
        let (limit, remaining) = (level.limit, level.remaining());
        drop(level);
        Standing::of(limit, remaining, self.period, self.tokens)
    }
}

impl Level {
    /// A full bucket of `limit`, refilled over `period`, as of `now`.
    fn full(limit: u64, period: Duration, now: Instant) -> Self {
        let full = limit as f64;
        Level {
            tokens: full,
            at: now,
            limit,
            full,
            rate: full / period.as_secs_f64(),
        }
    }

    /// Adds what has refilled since the last time, up to the limit.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        if self.tokens < self.full {
            self.tokens = (self.tokens + elapsed * self.rate).min(self.full);
        }
    }

    /// A new limit, refilled over `period`: what was used stays used.
    fn set_limit(&mut self, limit: u64, period: Duration) {
        let used = self.full - self.tokens;
        *self = Level {
            tokens: limit as f64 - used,
            ..Level::full(limit, period, self.at)
        };
    }

    fn remaining(&self) -> u64 {
        self.tokens.max(0.0) as u64
    }

    /// Gives back `tokens` that were charged but not used.
    fn refund(&mut self, tokens: f64) {
        self.tokens = (self.tokens + tokens).min(self.full);
    }
}

/// How long `tokens` take to refill at `rate` per second.
fn seconds(tokens: f64, rate: f64) -> Duration {
    if tokens <= 0.0 {
        return Duration::ZERO;
    }
    if rate <= 0.0 {
        return Duration::MAX;
    }
    Duration::try_from_secs_f64(tokens / rate).unwrap_or(Duration::MAX)
}

/// `"tokens per minute"`, `"spend per day"`, …
fn name_of(what: &str, period: Duration) -> String {
    let per = match (period.as_secs(), period.subsec_nanos()) {
        (60, 0) => "minute".to_owned(),
        (3600, 0) => "hour".to_owned(),
        (86_400, 0) => "day".to_owned(),
        (2_592_000, 0) => "30 days".to_owned(),
        _ => format!("{period:?}"),
    };
    format!("{what} per {per}")
}

/// `amount` of a currency unit in millionths; 0 for a negative or non-finite amount.
fn millionths(amount: f64) -> u64 {
    match amount.is_finite() && amount > 0.0 {
        true => (amount * 1e6).round() as u64,
        false => 0,
    }
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

use std::sync::atomic::Ordering::Relaxed;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A level is never left half-updated, so a poisoned lock is still sound.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

impl fmt::Debug for TokenWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenWindow")
            .field("name", &self.inner.name)
            .field("key", &self.bucket_name(None))
            .field("default_limit", &self.default_limit())
            .field("buckets", &self.inner.buckets())
            .finish()
    }
}
