//! Calibrating prompt estimates per model from the prompt tokens upstreams report.
//!
//! A tokenizer does not count bytes: English words take a token for four or five
//! letters, every digit may be a token of its own, code and JSON spend tokens on
//! punctuation and indentation, a CJK character takes about one, and a chat template adds
//! a few tokens per message. So the estimate is a weighted sum of what the prompt's text
//! is made of:
//!
//! ```text
//! prompt ≈ w₁·letters + w₂·digits + w₃·spaces + w₄·runs of spaces + w₅·punctuation
//!          + w₆·runs of punctuation + w₇·other characters + w₈·strings + w₉
//! ```
//!
//! (ASCII letters, digits, white space and punctuation, and the unbroken runs the latter
//! two make, since a tokenizer often takes an indentation or a `": "` as one piece;
//! characters beyond ASCII; the number of text strings, which stands for the per-message
//! overhead; and a constant for the template's own). Each model's weights are fitted to
//! the `prompt_tokens` its responses report, by least squares over its recent requests
//! (each older request weighing a little less), held towards the byte rule where the
//! requests seen so far say nothing: a model that has only seen English keeps
//! `bytes_per_token` for digits until it sees some.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use crate::extract::openai::json_scan::Str;

/// How many counts [`PromptFeatures`] keeps.
const COUNTS: usize = 8;

/// How many weights a model's fit has: one per count, and the constant.
const WEIGHTS: usize = COUNTS + 1;

/// How much a request's weight in the fit shrinks with each newer request of its model.
const FADE: f64 = 0.99;

/// How strongly a fit is held towards the byte rule, in squared tokens: weak, so that the
/// requests seen decide wherever they say anything.
const PRIOR: f64 = 1.0;

// Where each count is in `PromptFeatures::counts`: a class of character is the index of
// its count, and the runs of spaces and of punctuation follow their characters'.
const LETTER: u8 = 0;
const DIGIT: u8 = 1;
const SPACE: u8 = 2;
const PUNCT: u8 = 4;
const OTHER: u8 = 6;
const STRINGS: usize = 7;

/// The class of a byte that continues a character beyond ASCII: no count of its own.
const CONTINUES: u8 = u8::MAX;

/// What a prompt's text is made of: counts of its characters by class, of the runs they
/// make, and of its strings. Counted from the decoded text as the estimator walks the body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PromptFeatures {
    /// Letters, digits, white space, runs of white space, punctuation, runs of
    /// punctuation (all ASCII), other characters, strings.
    counts: [u32; COUNTS],
    /// The class of the character before, in the string being counted.
    previous: u8,
}

/// What a prompt is made of, to calibrate its model's estimates with once the upstream
/// reports its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Features {
    /// Its text, by class of character.
    pub(crate) text: PromptFeatures,
    /// Its token ids (each counted as one token, never calibrated).
    pub(crate) token_ids: u64,
    /// The estimator's byte rule.
    pub(crate) bytes_per_token: u64,
}

/// The class of each byte of text: its character's, or [`CONTINUES`].
const CLASS: [u8; 256] = {
    let mut table = [PUNCT; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        table[byte] = if b.is_ascii_alphabetic() {
            LETTER
        } else if b.is_ascii_digit() {
            DIGIT
        } else if b.is_ascii_whitespace() || b == 0x0b {
            SPACE
        } else if b < 0x80 {
            PUNCT
        } else if b < 0xc0 {
            CONTINUES
        } else {
            OTHER
        };
        byte += 1;
    }
    table
};

impl PromptFeatures {
    /// Counts one string of prompt text.
    pub(crate) fn add(&mut self, text: &Str<'_>) {
        self.counts[STRINGS] = self.counts[STRINGS].saturating_add(1);
        self.previous = CONTINUES;
        let raw = text.raw;
        if raw.len() == text.decoded_len {
            // No escapes: the raw bytes are the text.
            raw.iter()
                .for_each(|&byte| self.count(CLASS[usize::from(byte)]));
            return;
        }
        let mut i = 0;
        while let Some(&byte) = raw.get(i) {
            if byte != b'\\' {
                self.count(CLASS[usize::from(byte)]);
                i += 1;
                continue;
            }
            // The scanner validated the escapes: `\uXXXX` (a surrogate pair counts once,
            // at its first half) or one character.
            match raw.get(i + 1) {
                Some(b'u') => {
                    let unit = raw
                        .get(i + 2..i + 6)
                        .and_then(|hex| std::str::from_utf8(hex).ok())
                        .and_then(|hex| u16::from_str_radix(hex, 16).ok())
                        .unwrap_or(0);
                    match unit {
                        0..=0x7f => self.count(CLASS[usize::from(unit)]),
                        0xdc00..=0xdfff => {}
                        _ => self.count(OTHER),
                    }
                    i += 6;
                }
                Some(b'n' | b't' | b'r' | b'b' | b'f') => {
                    self.count(SPACE);
                    i += 2;
                }
                _ => {
                    self.count(PUNCT);
                    i += 2;
                }
            }
        }
    }

    /// Counts one character of `class` (nothing for [`CONTINUES`]), and a new run when it
    /// starts one of white space or punctuation.
    #[inline]
    fn count(&mut self, class: u8) {
        if class == CONTINUES {
            return;
        }
        let at = usize::from(class);
        self.counts[at] = self.counts[at].saturating_add(1);
        if (class == SPACE || class == PUNCT) && class != self.previous {
            self.counts[at + 1] = self.counts[at + 1].saturating_add(1);
        }
        self.previous = class;
    }

    /// The features as the fit's inputs, the constant last.
    fn inputs(&self) -> [f64; WEIGHTS] {
        let mut inputs = [1.0; WEIGHTS];
        for (input, &count) in inputs.iter_mut().zip(&self.counts) {
            *input = f64::from(count);
        }
        inputs
    }
}

/// Prompt estimates calibrated per model from the prompt tokens upstreams report, for
/// [`TenantTokenLayer::calibrate_prompts`](crate::TenantTokenLayer::calibrate_prompts).
///
/// The [`OpenAiEstimator`](crate::OpenAiEstimator) counts a prompt at
/// [`bytes_per_token`](crate::OpenAiEstimator::bytes_per_token) bytes a token, a rule of
/// thumb for English that is off two to four times for digits, code, JSON or a chat
/// template's overhead on short prompts. With calibration, the layer reads the
/// `prompt_tokens` (or `input_tokens`) each response reports and learns, per model, what
/// a prompt's letters, digits, white space, punctuation, other characters and strings
/// cost there; a later prompt to that model is estimated from what its text is made of.
/// Until a model has reported [`warmup`](Self::warmup) prompts, and for a body without
/// any prompt text, the byte rule applies; prompts given as token ids count one token
/// each, as always.
///
/// A calibrated prompt is never less than a quarter of the byte rule's, nor more than
/// eight times it plus 256 tokens: a fit thrown off by odd traffic stays within reach of
/// what the bytes say. The output allowance is not touched
/// ([`AdaptiveOutput`](crate::AdaptiveOutput) learns that).
///
/// Memory is bounded: at most [`max_models`](Self::max_models) models are kept (a few
/// hundred bytes each, plus the name); a new model past that forgets the least recently
/// used quarter. Models are named by request bodies, so clients choose them: the bound is
/// what keeps a spray of names harmless. Leave calibration off (the default) to keep the
/// byte rule.
///
/// ```
/// use std::sync::Arc;
/// use tower_tenant_tokens::{OpenAiEstimator, PromptCalibration, TenantTokenLayer, TenantTokenTracker};
///
/// let calibration = Arc::new(PromptCalibration::new());
/// let layer = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(4_096)))
///     .estimator(OpenAiEstimator::new())
///     .calibrate_prompts(calibration.clone());
/// assert!(calibration.snapshot().is_empty());
/// ```
pub struct PromptCalibration {
    warmup: u64,
    max_models: usize,
    state: Mutex<Models>,
}

#[derive(Default)]
struct Models {
    /// Counts uses, for eviction.
    clock: u64,
    fits: HashMap<Box<str>, Fit>,
}

/// One model's fit: the faded normal equations of its requests, and the weights solved
/// from them.
struct Fit {
    /// Σ fade·x·xᵀ over the requests seen.
    gram: [[f64; WEIGHTS]; WEIGHTS],
    /// Σ fade·x·y.
    moment: [f64; WEIGHTS],
    weights: [f64; WEIGHTS],
    samples: u64,
    used: u64,
}

/// One model's calibration, as [`PromptCalibration::snapshot`] reports it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CalibratedModel {
    /// The model, as request bodies name it (empty when they name none).
    pub model: String,
    /// Prompts whose reported size it has learned from.
    pub samples: u64,
    /// Tokens per ASCII letter, digit, white space character, run of white space,
    /// punctuation character, run of punctuation, other character, text string, and the
    /// constant, in that order.
    pub weights: [f64; WEIGHTS],
}

impl Default for PromptCalibration {
    fn default() -> Self {
        Self::new()
    }
}

impl PromptCalibration {
    /// Calibration with its defaults: used once a model has reported 3 prompts, at most
    /// 1,000 models kept.
    pub fn new() -> Self {
        Self {
            warmup: 3,
            max_models: 1_000,
            state: Mutex::new(Models::default()),
        }
    }

    /// How many reported prompts a model needs before its calibration is used (default
    /// 3, at least 1).
    pub fn warmup(mut self, prompts: u64) -> Self {
        self.warmup = prompts.max(1);
        self
    }

    /// How many models are kept at most (default 1,000, at least 1).
    pub fn max_models(mut self, models: usize) -> Self {
        self.max_models = models.max(1);
        self
    }

    /// The calibrated prompt of a request to `model` whose text has `features`, where the
    /// byte rule (`bytes_per_token` bytes a token) counts `by_bytes`; `None` while the
    /// model is not calibrated.
    pub(crate) fn prompt(
        &self,
        model: &str,
        features: &PromptFeatures,
        by_bytes: u64,
    ) -> Option<u64> {
        let mut models = self.lock();
        let models = &mut *models;
        models.clock += 1;
        let fit = models.fits.get_mut(model)?;
        fit.used = models.clock;
        // A body with no prompt text (no message at all) has nothing to calibrate.
        if fit.samples < self.warmup || features.counts[STRINGS] == 0 {
            return None;
        }
        let inputs = features.inputs();
        let predicted: f64 = fit.weights.iter().zip(inputs).map(|(w, x)| w * x).sum();
        let low = by_bytes / 4;
        let high = by_bytes.saturating_mul(8).saturating_add(256);
        // `as` saturates (and maps NaN to 0), so any prediction lands in the bounds.
        Some((predicted.round().max(0.0) as u64).clamp(low, high))
    }

    /// Learns from one request to `model` whose prompt had `features` and whose response
    /// reported `reported` prompt tokens.
    pub(crate) fn record(&self, model: &str, features: &Features, reported: u64) {
        let text = reported.saturating_sub(features.token_ids);
        self.record_text(model, &features.text, text, features.bytes_per_token);
    }

    /// Learns from one request to `model` whose text had `features` and took `reported`
    /// tokens, the byte rule counting `bytes_per_token` bytes a token.
    fn record_text(
        &self,
        model: &str,
        features: &PromptFeatures,
        reported: u64,
        bytes_per_token: u64,
    ) {
        let mut models = self.lock();
        let models = &mut *models;
        models.clock += 1;
        let clock = models.clock;
        if !models.fits.contains_key(model) && models.fits.len() >= self.max_models {
            // Full: forget the least recently used quarter at once, so that a stream of
            // new names costs one pass per quarter of the bound.
            let mut used: Vec<u64> = models.fits.values().map(|fit| fit.used).collect();
            let cut = (used.len() / 4).max(1);
            let (_, threshold, _) = used.select_nth_unstable(cut - 1);
            let threshold = *threshold;
            models.fits.retain(|_, fit| fit.used > threshold);
        }
        let fit = match models.fits.get_mut(model) {
            Some(fit) => fit,
            None => models
                .fits
                .entry(Box::from(model))
                .or_insert_with(|| Fit::new(bytes_per_token)),
        };
        fit.learn(&features.inputs(), reported as f64, bytes_per_token);
        fit.used = clock;
    }

    /// Every model calibrated, with its weights.
    pub fn snapshot(&self) -> Vec<CalibratedModel> {
        let models = self.lock();
        let mut calibrated: Vec<_> = models
            .fits
            .iter()
            .map(|(model, fit)| CalibratedModel {
                model: model.to_string(),
                samples: fit.samples,
                weights: fit.weights,
            })
            .collect();
        calibrated.sort_by(|a, b| a.model.cmp(&b.model));
        calibrated
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Models> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The byte rule's weights: a token per `bytes_per_token` bytes (a character beyond
/// ASCII taken as three bytes), nothing per run or string, no constant.
fn byte_rule(bytes_per_token: u64) -> [f64; WEIGHTS] {
    let b = 1.0 / bytes_per_token.max(1) as f64;
    [b, b, b, 0.0, b, 0.0, 3.0 * b, 0.0, 0.0]
}

impl Fit {
    fn new(bytes_per_token: u64) -> Self {
        Fit {
            gram: [[0.0; WEIGHTS]; WEIGHTS],
            moment: [0.0; WEIGHTS],
            weights: byte_rule(bytes_per_token),
            samples: 0,
            used: 0,
        }
    }

    /// Adds one request (`inputs`, `reported` tokens) and solves for the weights:
    /// `(G + PRIOR·I) w = m + PRIOR·w₀`, the least-squares fit held towards the byte
    /// rule `w₀`.
    fn learn(&mut self, inputs: &[f64; WEIGHTS], reported: f64, bytes_per_token: u64) {
        for (row, &xi) in self.gram.iter_mut().zip(inputs) {
            for (cell, &xj) in row.iter_mut().zip(inputs) {
                *cell = *cell * FADE + xi * xj;
            }
        }
        for (moment, &xi) in self.moment.iter_mut().zip(inputs) {
            *moment = *moment * FADE + xi * reported;
        }
        self.samples += 1;
        let prior = byte_rule(bytes_per_token);
        let mut system = self.gram;
        let mut target = self.moment;
        for i in 0..WEIGHTS {
            system[i][i] += PRIOR;
            target[i] += PRIOR * prior[i];
        }
        if let Some(weights) = solve(system, target) {
            self.weights = weights;
        }
    }
}

/// Solves `a·x = b` for a symmetric positive definite `a` (Cholesky); `None` if it is not.
fn solve(a: [[f64; WEIGHTS]; WEIGHTS], b: [f64; WEIGHTS]) -> Option<[f64; WEIGHTS]> {
    let mut l = [[0.0; WEIGHTS]; WEIGHTS];
    for i in 0..WEIGHTS {
        for j in 0..=i {
            let sum: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                let diagonal = a[i][i] - sum;
                if !diagonal.is_finite() || diagonal <= 0.0 {
                    return None;
                }
                l[i][i] = diagonal.sqrt();
            } else {
                l[i][j] = (a[i][j] - sum) / l[j][j];
            }
        }
    }
    // L·y = b, then Lᵀ·x = y.
    let mut y = [0.0; WEIGHTS];
    for i in 0..WEIGHTS {
        let sum: f64 = (0..i).map(|k| l[i][k] * y[k]).sum();
        y[i] = (b[i] - sum) / l[i][i];
    }
    let mut x = [0.0; WEIGHTS];
    for i in (0..WEIGHTS).rev() {
        let sum: f64 = (i + 1..WEIGHTS).map(|k| l[k][i] * x[k]).sum();
        x[i] = (y[i] - sum) / l[i][i];
    }
    x.iter().all(|x| x.is_finite()).then_some(x)
}

impl fmt::Debug for PromptCalibration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PromptCalibration")
            .field("warmup", &self.warmup)
            .field("max_models", &self.max_models)
            .field("models", &self.lock().fits.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::openai::json_scan::Scanner;

    fn features(texts: &[&str]) -> PromptFeatures {
        let mut features = PromptFeatures::default();
        for text in texts {
            let json = serde_json::to_string(text).unwrap();
            let mut scanner = Scanner::new(json.as_bytes());
            features.add(&scanner.string().unwrap());
        }
        features
    }

    #[test]
    fn counts_characters_by_class_through_escapes() {
        let counted = features(&["ab 12,\n", "é漢\u{1F680}\"\u{1}"]);
        assert_eq!(counted.counts, [2, 2, 2, 2, 3, 2, 3, 2]);
        let escaped = r#""a\u0062\n\t\u00e9\ud83d\ude80\"""#;
        let mut scanner = Scanner::new(escaped.as_bytes());
        let mut counted = PromptFeatures::default();
        counted.add(&scanner.string().unwrap());
        assert_eq!(counted.counts, [2, 0, 2, 1, 1, 1, 2, 1]);
    }

    /// A made-up tokenizer: words of letters at 4.5 letters a token, a token per digit
    /// and per punctuation mark, one per CJK character, 4 per message and 3 more.
    fn tokens(texts: &[&str]) -> u64 {
        let f = features(texts).counts.map(f64::from);
        (f[0] / 4.5 + f[1] + f[3] + f[4] + 2.0 * f[5] + 3.0).round() as u64
    }

    #[test]
    fn learns_each_kind_of_text_within_a_quarter() {
        let calibration = PromptCalibration::new();
        let kinds: [fn(usize) -> String; 4] = [
            |i| format!("Please summarise the report on item {i} for the board meeting."),
            |i| "7".repeat(50 + i) + &"0".repeat(i),
            |i| format!("{{\"id\":{i},\"tags\":[\"a\",\"b\"],\"ok\":true}}"),
            |i| "数据分析报告".repeat(3 + i % 3),
        ];
        for kind in kinds {
            let new = kind(99);
            let new = ["user", new.as_str()];
            let by_bytes = (new.iter().map(|t| t.len()).sum::<usize>() as u64).div_ceil(4);
            for i in 0..10 {
                let text = kind(i);
                let texts = ["user", text.as_str()];
                calibration.record_text("m", &features(&texts), tokens(&texts), 4);
            }
            let estimate = calibration.prompt("m", &features(&new), by_bytes).unwrap();
            let truth = tokens(&new) as f64;
            let error = (estimate as f64 - truth) / truth;
            assert!(
                error.abs() <= 0.25,
                "{new:?}: {estimate} for {truth} (bytes say {by_bytes})"
            );
        }
        assert_eq!(calibration.snapshot()[0].samples, 40);
        assert_eq!(calibration.prompt("other", &features(&["x"]), 1), None);
    }

    #[test]
    fn a_prediction_stays_within_reach_of_the_bytes_and_the_table_is_bounded() {
        let calibration = PromptCalibration::new().warmup(1).max_models(4);
        calibration.record_text("m", &features(&["aaaa"]), 1_000_000, 4);
        let estimate = calibration.prompt("m", &features(&["aaaa"]), 1).unwrap();
        assert_eq!(estimate, 8 + 256);
        for model in 0..20 {
            calibration.record_text(&format!("m{model}"), &features(&["a"]), 1, 4);
            assert!(calibration.snapshot().len() <= 4);
        }
    }
}
