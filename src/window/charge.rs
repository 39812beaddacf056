//! What one request was charged in a window: in this process's bucket or in one kept for
//! every replica, grown with the request, settled on its usage, kept when it ends.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::price::{Sizing, Usage, Weights};
use super::{seconds, Bucket, TokenWindow};
use crate::Error;

/// What one admitted request was charged in one window. It stays charged when dropped
/// (the tokens were used); only a request that was refused elsewhere is
/// [cancelled](Self::cancel).
pub(crate) struct Charge {
    pub(super) place: Place,
    pub(super) tally: Tally,
}

/// Where a charge was made.
pub(super) enum Place {
    /// In this process's bucket.
    Here(Arc<Bucket>),
    /// In a bucket kept for every replica.
    Elsewhere(Box<dyn Remote>),
}

/// A bucket kept for every replica (in Redis), as a charge made there sees it: changed
/// after the admission (the request's growth, its settlement) without being asked.
pub(crate) trait Remote: Send + Sync {
    /// Charges `units` more, or gives back `-units` (up to the limit).
    fn adjust(&self, units: f64);
    /// The window's name.
    fn window(&self) -> &str;
    /// Whether the window counts tokens (not spend).
    fn counts_tokens(&self) -> bool;
    /// How the bucket stood once the request was charged, if known.
    fn standing(&self) -> Option<Standing>;
}

/// What a request was charged for in a window, and what that came to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tally {
    /// What a token of each kind counts for in this window, for this request's model.
    pub(super) weights: Weights,
    /// The tokens charged for, by kind.
    pub(super) used: Usage,
    /// What they came to.
    pub(super) units: f64,
}

impl Tally {
    /// What the tokens came to, in the window's units.
    pub(crate) fn units(&self) -> f64 {
        self.units
    }

    /// `used` instead, and how many units more that is (fewer when negative).
    fn change(&mut self, used: Usage) -> f64 {
        let units = used.units(&self.weights);
        let more = units - self.units;
        self.used = used;
        self.units = units;
        more
    }
}

impl fmt::Debug for Charge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = if self.counts_tokens() {
            "tokens"
        } else {
            "millionths"
        };
        f.debug_struct("Charge")
            .field("window", &self.window())
            .field("used", &self.used())
            .field(units, &self.units())
            .finish()
    }
}

/// How a window stood once a request was charged, for the response's headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Standing {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    /// How long until the window is full again.
    pub(crate) reset: Duration,
    /// Whether the window counts tokens (not spend).
    pub(crate) tokens: bool,
}

impl Standing {
    /// A bucket of `limit` per `period` holding `remaining`.
    pub(crate) fn of(limit: u64, remaining: u64, period: Duration, tokens: bool) -> Self {
        let rate = limit as f64 / period.as_secs_f64();
        Standing {
            limit,
            remaining,
            reset: seconds(limit.saturating_sub(remaining) as f64, rate),
            tokens,
        }
    }
}

impl Charge {
    /// A charge made in a bucket kept for every replica.
    pub(crate) fn elsewhere(remote: Box<dyn Remote>, tally: Tally) -> Self {
        Charge {
            place: Place::Elsewhere(remote),
            tally,
        }
    }

    /// Gives the whole charge back: the request was not admitted.
    pub(crate) fn cancel(mut self) {
        self.settle(Usage::default());
    }
}

/// What a request was charged in one window: read by the metrics and the rate-limit
/// headers, grown and settled with the reservation.
pub(crate) trait Charged {
    /// The window's name.
    fn window(&self) -> &str;

    /// Whether the window counts tokens (not spend).
    fn counts_tokens(&self) -> bool;

    /// The tokens charged for, by kind.
    fn used(&self) -> Usage;

    /// What they came to, in the window's units.
    fn units(&self) -> f64;

    /// How the window stands now; for a bucket kept for every replica, how it stood once
    /// the request was charged (reading it again would take a round trip).
    fn standing(&self) -> Option<Standing>;
    /// The request grew to `tokens` in all: the growth is charged, never refused; a
    /// request never shrinks here.
    fn grow_to(&mut self, tokens: u64);

    /// The request used `tokens` in all, as a handler said: charged exactly that, up or
    /// down.
    fn settle_total(&mut self, tokens: u64);

    /// The request used `used`, as the upstream reported: charged in place of what was
    /// charged before, what was charged beyond it going back.
    fn settle(&mut self, used: Usage);
}

impl Charged for Charge {
    fn window(&self) -> &str {
        match &self.place {
            Place::Here(bucket) => &bucket.window,
            Place::Elsewhere(remote) => remote.window(),
        }
    }

    fn counts_tokens(&self) -> bool {
        match &self.place {
            Place::Here(bucket) => bucket.tokens,
            Place::Elsewhere(remote) => remote.counts_tokens(),
        }
    }

    fn used(&self) -> Usage {
        self.tally.used
    }

    fn units(&self) -> f64 {
        self.tally.units()
    }

    fn standing(&self) -> Option<Standing> {
        match &self.place {
            Place::Here(bucket) => Some(bucket.standing()),
            Place::Elsewhere(remote) => remote.standing(),
        }
    }

    /// The request grew to `tokens` in all: the growth is charged as output, never
    /// refused; a request never shrinks here.
    fn grow_to(&mut self, tokens: u64) {
        let total = self.tally.used.total();
        if tokens > total {
            let mut used = self.tally.used;
            match used.unsplit {
                0 => used.output += tokens - total,
                _ => used.unsplit += tokens - total,
            }
            self.settle(used);
        }
    }

    /// The request used `tokens` in all, as a handler said: its input as estimated (no
    /// more than `tokens`), the rest output.
    fn settle_total(&mut self, tokens: u64) {
        let mut used = self.tally.used;
        if used.unsplit > 0 {
            used.unsplit = tokens;
        } else {
            used.input = used.input.min(tokens);
            used.cached_input = used.cached_input.min(used.input);
            used.output = tokens - used.input;
        }
        self.settle(used);
    }

    /// The request used `used` (as the upstream reported): charged in place of what was
    /// charged before, what was charged beyond it going back.
    fn settle(&mut self, used: Usage) {
        let more = self.tally.change(used);
        match &self.place {
            Place::Here(bucket) => bucket.take(more),
            Place::Elsewhere(remote) if more != 0.0 => remote.adjust(more),
            Place::Elsewhere(_) => {}
        }
    }
}

/// A charge to a window that counts every token alike, in this process's bucket, for a
/// request whose estimate does not tell its kinds: all it keeps is how many tokens it
/// was charged, so that a guard holds it in place of a [`Charge`], without an
/// allocation.
pub(crate) struct TokenCharge {
    bucket: Arc<Bucket>,
    tokens: u64,
}

impl TokenCharge {
    pub(super) fn new(bucket: Arc<Bucket>, tokens: u64) -> Self {
        TokenCharge { bucket, tokens }
    }

    /// The same charge, in the form that also weighs kinds of tokens.
    pub(crate) fn into_charge(self) -> Charge {
        let tally = Tally {
            weights: Weights::ALL,
            used: self.used(),
            units: self.units(),
        };
        Charge {
            place: Place::Here(self.bucket),
            tally,
        }
    }
}

impl Charged for TokenCharge {
    fn window(&self) -> &str {
        &self.bucket.window
    }

    fn counts_tokens(&self) -> bool {
        true
    }

    fn used(&self) -> Usage {
        Usage {
            unsplit: self.tokens,
            ..Usage::default()
        }
    }

    fn units(&self) -> f64 {
        self.tokens as f64
    }

    fn standing(&self) -> Option<Standing> {
        Some(self.bucket.standing())
    }

    /// Charges the tokens a response grew to beyond those charged.
    fn grow_to(&mut self, tokens: u64) {
        if tokens > self.tokens {
            self.settle_total(tokens);
        }
    }

    /// Charges exactly `tokens`, up or down.
    fn settle_total(&mut self, tokens: u64) {
        let more = tokens as f64 - self.tokens as f64;
        self.tokens = tokens;
        self.bucket.take(more);
    }

    fn settle(&mut self, used: Usage) {
        self.settle_total(used.total());
    }
}

/// Charges `tokens` to `tenant_id` in every window, all or nothing: when one refuses, the
/// others are given back, and the refusal is the one to wait longest for (a request that
/// can never fit before one that must wait).
pub(crate) fn charge_all(
    windows: &[TokenWindow],
    tenant_id: &str,
    tokens: u64,
    sizing: &Sizing,
) -> Result<Charges, Error> {
    let mut charges = Charges::default();
    let mut refusal: Option<Error> = None;
    for window in windows {
        match window.charge(tenant_id, tokens, sizing, false) {
            Ok(charge) => charges.push(charge),
            Err(error) if longer(&error, refusal.as_ref()) => refusal = Some(error),
            Err(_) => {}
        }
    }
    match refusal {
        Some(error) => {
            charges.cancel();
            Err(error)
        }
        None => Ok(charges),
    }
}

/// Charges `tokens` to `tenant_id` in every window without checking (shadow mode).
pub(crate) fn force_all(
    windows: &[TokenWindow],
    tenant_id: &str,
    tokens: u64,
    sizing: &Sizing,
) -> Charges {
    let mut charges = Charges::default();
    for window in windows {
        if let Ok(charge) = window.charge(tenant_id, tokens, sizing, true) {
            charges.push(charge);
        }
    }
    charges
}

/// One request's charges in every window; the first kept inline, as most layers have
/// one window.
#[derive(Default)]
pub(crate) struct Charges {
    first: Option<Charge>,
    rest: Vec<Charge>,
}

impl Charges {
    pub(crate) fn push(&mut self, charge: Charge) {
        match self.first {
            None => self.first = Some(charge),
            Some(_) => self.rest.push(charge),
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Charge> {
        self.first.iter().chain(&self.rest)
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Charge> {
        self.first.iter_mut().chain(&mut self.rest)
    }

    /// Gives every charge back: the request was not admitted.
    pub(crate) fn cancel(self) {
        self.first
            .into_iter()
            .chain(self.rest)
            .for_each(Charge::cancel);
    }
}

impl FromIterator<Charge> for Charges {
    fn from_iter<I: IntoIterator<Item = Charge>>(charges: I) -> Self {
        let mut all = Charges::default();
        charges.into_iter().for_each(|charge| all.push(charge));
        all
    }
}

/// Whether `error` is a refusal to report rather than `than`.
fn longer(error: &Error, than: Option<&Error>) -> bool {
    let wait = |error: &Error| match error {
        Error::WindowTooLarge(_) | Error::UnpricedModel { .. } => Duration::MAX,
        Error::WindowExceeded(refusal) => refusal.retry_after,
        _ => Duration::ZERO,
    };
    than.map_or(true, |than| wait(error) > wait(than))
}
