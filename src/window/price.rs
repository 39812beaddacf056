//! What a window counts, and what a request comes to in it: token kinds and their
//! weights, a request's usage by kind, and the prices of spend windows.

use std::collections::HashMap;
use std::sync::Arc;

/// What a window counts.
#[derive(Clone)]
pub(super) enum Measure {
    /// Tokens, each kind weighed so.
    Tokens(Weights),
    /// Spend in millionths: each kind of token weighed by its model's price.
    Spend(Prices),
}

/// What one token of each kind counts for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Weights {
    pub(super) input: f64,
    pub(super) cached_input: f64,
    pub(super) output: f64,
}

impl Weights {
    pub(super) const ALL: Weights = Weights {
        input: 1.0,
        cached_input: 1.0,
        output: 1.0,
    };
}

/// The tokens a request is charged for, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Input tokens, cached ones included.
    pub(crate) input: u64,
    /// The input tokens read from a cache.
    pub(crate) cached_input: u64,
    pub(crate) output: u64,
    /// Tokens not told apart (an estimate without a prompt part): each counts as the
    /// dearer of an input and an output token.
    pub(crate) unsplit: u64,
}

impl Usage {
    /// What an estimate of `tokens` is charged for: its prompt part as input, the rest
    /// output, when the prompt is known.
    pub(super) fn estimated(tokens: u64, prompt: Option<u64>) -> Self {
        match prompt {
            Some(prompt) => Usage {
                input: prompt.min(tokens),
                output: tokens - prompt.min(tokens),
                ..Usage::default()
            },
            None => Usage {
                unsplit: tokens,
                ..Usage::default()
            },
        }
    }

    /// The tokens of each kind, named, cached input apart from the rest of the input.
    pub(crate) fn kinds(&self) -> [(&'static str, u64); 4] {
        let cached = self.cached_input.min(self.input);
        [
            ("input", self.input - cached),
            ("cached_input", cached),
            ("output", self.output),
            ("unsplit", self.unsplit),
        ]
    }

    /// Every token, whatever its kind.
    pub(crate) fn total(&self) -> u64 {
        self.input
            .saturating_add(self.output)
            .saturating_add(self.unsplit)
    }

    pub(super) fn units(&self, weights: &Weights) -> f64 {
        let unsplit = weights.input.max(weights.output);
        let each = [weights.input, weights.cached_input, weights.output, unsplit];
        let kinds = self.kinds().into_iter().map(|(_, tokens)| tokens as f64);
        kinds
            .zip(each)
            .map(|(tokens, weight)| tokens * weight)
            .sum()
    }
}

/// What a request's estimate is made of, as far as the estimator told: its prompt part
/// and its model.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sizing {
    pub(crate) prompt: Option<u64>,
    pub(crate) model: Option<Arc<str>>,
}

/// What a model's tokens cost, per million tokens, in the currency unit of a
/// [spend window](crate::TokenWindow::spend).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    input: f64,
    cached_input: f64,
    output: f64,
}

impl Price {
    /// The price of a million input, cached input and output tokens; `None` when one is
    /// negative or not finite.
    pub fn per_million(input: f64, cached_input: f64, output: f64) -> Option<Self> {
        let valid = |price: f64| price.is_finite() && price >= 0.0;
        (valid(input) && valid(cached_input) && valid(output)).then_some(Price {
            input,
            cached_input,
            output,
        })
    }

    /// What a token of each kind costs, in millionths of the currency unit: what costs
    /// `p` a million costs `p` millionths each.
    pub(super) fn weights(self) -> Weights {
        Weights {
            input: self.input,
            cached_input: self.cached_input,
            output: self.output,
        }
    }
}

/// Prices per model, for [spend windows](crate::TokenWindow::spend).
///
/// A request is priced by the model its body names (the [`OpenAiEstimator`] finds it).
/// A model missing from the table takes the default price, when one is set; without
/// one, the request is refused (400 `unpriced_model`): a spend limit that let unpriced
/// models through would not limit spend.
///
/// ```
/// use tower_tenant_tokens::{Price, Prices};
///
/// let prices = Prices::new()
///     .with("gpt-4o-mini", Price::per_million(0.15, 0.075, 0.6).unwrap())
///     .with_default(Price::per_million(5.0, 2.5, 15.0).unwrap());
/// # let _ = prices;
/// ```
///
/// [`OpenAiEstimator`]: crate::OpenAiEstimator
#[derive(Clone, Debug, Default)]
pub struct Prices {
    models: HashMap<String, Price>,
    default: Option<Price>,
}

impl Prices {
    /// No prices: every model is refused until priced.
    pub fn new() -> Self {
        Self::default()
    }

    /// With `model` priced at `price`.
    pub fn with(mut self, model: impl Into<String>, price: Price) -> Self {
        self.models.insert(model.into(), price);
        self
    }

    /// With `price` for the models missing from the table (and requests naming none).
    pub fn with_default(mut self, price: Price) -> Self {
        self.default = Some(price);
        self
    }

    /// The price of `model`: its own, else the default.
    pub fn get(&self, model: Option<&str>) -> Option<Price> {
        model
            .and_then(|model| self.models.get(model).copied())
            .or(self.default)
    }
}
