//! Estimating an OpenAI-style request from its JSON body.

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;

use super::json_scan::{read_number, Malformed, Number, Scanner, Str};
use super::{Features, Learned, PromptFeatures};
use crate::extract::Estimated;
use crate::{Error, EstimateError, SharedBudget, TokenLedger};

/// Estimates OpenAI-style requests (`/v1/chat/completions`, `/v1/completions`,
/// `/v1/responses`, `/v1/embeddings`) from their JSON body.
///
/// The estimate is the prompt plus the output allowance:
///
/// - **prompt**: the UTF-8 bytes of every string under `messages`, `prompt`, `input`,
///   `instructions`, `system`, `tools` and `functions`, divided by
///   [`bytes_per_token`](Self::bytes_per_token) (default 4, the usual rule of thumb for
///   English) and rounded up, plus one token for each integer found there (prompts given
///   as token ids). Inline media (`data:` URLs) is not text and is not counted; if your
///   traffic carries images, wrap this with your own estimator. Every other field is
///   skipped without being parsed into values.
/// - **output**: the largest of `max_tokens`, `max_completion_tokens` and
///   `max_output_tokens`, or [`default_output_tokens`](Self::default_output_tokens)
///   (default 1,024) when none is given, times `n` (the number of choices, at least 1)
///   when present. A key given more than once counts at its largest, and a `null` limit
///   counts as the default, so a body a server may read differently never reserves less
///   than that server may produce.
///
/// A body that is not a JSON object is refused as malformed (400 `invalid_json`); a
/// `max_tokens`-like field or `n` that is not a whole, non-negative number fitting 64
/// bits is refused as an invalid estimate (400). Bodies over
/// [`body_limit`](Self::body_limit) (default 2 MiB, axum's own default body limit, so that
/// whatever the estimator accepts the handler's extractors accept too) get 413 before the
/// estimate is tried.
///
/// ```
/// use tower_tenant_tokens::OpenAiEstimator;
///
/// let estimator = OpenAiEstimator::new();
/// let body = br#"{"model":"gpt-4o","max_tokens":100,
///                 "messages":[{"role":"user","content":"Hello there, model!"}]}"#;
/// // "user" + "Hello there, model!" = 23 bytes -> 6 tokens, plus 100 for the output.
/// assert_eq!(estimator.estimate(body)?, 106);
/// # Ok::<(), tower_tenant_tokens::EstimateError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiEstimator {
    pub(super) body_limit: usize,
    default_output_tokens: u64,
    bytes_per_token: u64,
}

impl Default for OpenAiEstimator {
    fn default() -> Self {
        Self::new()
    }
}

impl OpenAiEstimator {
    /// The estimator with its defaults: 2 MiB body limit, 1,024 output tokens when the
    /// request names none, 4 bytes a token.
    pub fn new() -> Self {
        Self {
            body_limit: 2 * 1024 * 1024,
            default_output_tokens: 1024,
            bytes_per_token: 4,
        }
    }

    /// The largest body read, in bytes; longer bodies are refused with 413. Behind axum,
    /// raise axum's `DefaultBodyLimit` to match if you raise this above 2 MiB.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The output allowance for a request that sets no `max_tokens`-like field.
    pub fn default_output_tokens(mut self, tokens: u64) -> Self {
        self.default_output_tokens = tokens;
        self
    }

    /// How many bytes of prompt text count as one token (at least 1).
    pub fn bytes_per_token(mut self, bytes: u64) -> Self {
        self.bytes_per_token = bytes.max(1);
        self
    }

    /// Estimates one request body: prompt plus output allowance.
    ///
    /// # Errors
    ///
    /// [`EstimateError`] when the body is not a JSON object, or when a field the estimate
    /// uses holds something other than a whole, non-negative number.
    pub fn estimate(&self, body: &[u8]) -> Result<u64, EstimateError> {
        self.estimate_parts(body).map(|parts| parts.total())
    }

    /// Estimates one request body, keeping the prompt and the output allowance apart (a
    /// handler reconciling with reported usage wants the prompt part).
    ///
    /// # Errors
    ///
    /// As for [`estimate`](Self::estimate).
    pub fn estimate_parts(&self, body: &[u8]) -> Result<OpenAiEstimate, EstimateError> {
        self.estimate_with_model(body, false)
            .map(|(estimate, _)| estimate)
    }

    /// [`estimate_parts`](Self::estimate_parts), and with `want_model` the body's model,
    /// found in the same pass: in every body this estimates, the one [`json_model`] finds.
    /// Without `want_model` the model is `None`, nothing is allocated, and the walk is the
    /// one `estimate_parts` makes.
    pub(super) fn estimate_with_model(
        &self,
        body: &[u8],
        want_model: bool,
    ) -> Result<(OpenAiEstimate, Option<String>), EstimateError> {
        self.estimate_learning(body, want_model, &Learned::default())
            .map(|walked| (walked.estimate, walked.model))
    }

    /// [`estimate_with_model`](Self::estimate_with_model), using what the layer `learned`:
    /// the output allowance of a request without an output limit is the one learned for
    /// its tenant and the model found (if any; the default otherwise), and with
    /// [`cap_explicit_limits`](crate::AdaptiveOutput::cap_explicit_limits) an explicit
    /// limit is at most that; the prompt is calibrated for the model, once it is. Also
    /// says whether the request set no limit, and what its text is made of when prompts
    /// are calibrated.
    fn estimate_learning(
        &self,
        body: &[u8],
        want_model: bool,
        learned: &Learned<'_>,
    ) -> Result<Walked, EstimateError> {
        let mut tally = Tally {
            features: learned.prompts.map(|_| PromptFeatures::default()),
            ..Tally::default()
        };
        let want_model = want_model || learned.output.is_some() || learned.prompts.is_some();
        match walk_request(body, &mut tally, want_model) {
            Ok(()) => {}
            Err(Refusal::Malformed(error)) => {
                return Err(EstimateError::malformed(error.to_string()))
            }
            Err(Refusal::Invalid(reason)) => return Err(EstimateError::invalid(reason)),
        }
        let model = match tally.model {
            Model::Named(name) => Some(name),
            Model::Unseen | Model::Unreadable => None,
        };
        let unlimited = tally.output.is_none();
        let named = model.as_deref().unwrap_or("");
        let allowance = || {
            let (table, tenant) = learned.output?;
            table.allowance(tenant, named)
        };
        let cap_explicit = learned
            .output
            .is_some_and(|(table, _)| table.caps_explicit_limits());
        let by_bytes = tally.text_bytes.div_ceil(self.bytes_per_token);
        let text = match (learned.prompts, &tally.features) {
            (Some(prompts), Some(features)) => prompts
                .prompt(named, features, by_bytes)
                .unwrap_or(by_bytes),
            _ => by_bytes,
        };
        let estimate = OpenAiEstimate {
            prompt_tokens: text.saturating_add(tally.token_ids),
            output_tokens: match tally.output {
                Some(tokens) if tally.output_null => tokens.max(self.default_output_tokens),
                Some(tokens) if cap_explicit => {
                    allowance().map_or(tokens, |learned| learned.min(tokens))
                }
                Some(tokens) => tokens,
                None => allowance().unwrap_or(self.default_output_tokens),
            }
            .saturating_mul(tally.choices.unwrap_or(1).max(1)),
        };
        let features = tally.features.map(|text| Features {
            text,
            token_ids: tally.token_ids,
            bytes_per_token: self.bytes_per_token,
        });
        Ok(Walked {
            estimate,
            model,
            unlimited,
            features,
        })
    }

    /// Not public API: the estimate and the model found in the same pass, for the
    /// differential test.
    #[doc(hidden)]
    pub fn __estimate_parts_and_model(
        &self,
        body: &[u8],
    ) -> Result<(OpenAiEstimate, Option<String>), EstimateError> {
        self.estimate_with_model(body, true)
    }

    /// Not public API: the model per-model budgets find in a body that another estimator
    /// read, for the differential test.
    #[doc(hidden)]
    pub fn __json_model(body: &[u8]) -> Option<String> {
        json_model(body)
    }
}

/// An [`OpenAiEstimator`] estimate, in its two parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenAiEstimate {
    /// Tokens the prompt is estimated to take.
    pub prompt_tokens: u64,
    /// The output allowance: the request's `max_tokens`-like limit (or the default), times
    /// `n`.
    pub output_tokens: u64,
}

impl OpenAiEstimate {
    /// Prompt plus output, saturating at `u64::MAX`.
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.output_tokens)
    }
}

/// What the layer's body estimate asks of the estimator.
impl OpenAiEstimator {
    /// The most body it reads.
    pub(crate) fn limit(&self) -> usize {
        self.body_limit
    }

    /// The estimate of a body, as [`estimate_learning`](Self::estimate_learning) makes it.
    pub(crate) fn estimated(
        &self,
        body: &[u8],
        want_model: bool,
        learned: &Learned<'_>,
    ) -> Result<Estimated, Error> {
        let walked = self.estimate_learning(body, want_model, learned)?;
        Ok(Estimated {
            tokens: walked.estimate.total(),
            prompt: walked.estimate.prompt_tokens,
            model: walked.model,
            unlimited: walked.unlimited,
            features: walked.features,
        })
    }
}

/// What [`OpenAiEstimator::estimate_learning`] found in a body.
pub(crate) struct Walked {
    pub(crate) estimate: OpenAiEstimate,
    /// The model, when asked for (or needed by what was learned).
    pub(crate) model: Option<String>,
    /// The request set no output limit: its allowance is a guess.
    pub(crate) unlimited: bool,
    /// What the prompt is made of, when prompts are calibrated.
    pub(crate) features: Option<Features>,
}

/// What the walk over a body has counted so far.
#[derive(Default)]
struct Tally {
    /// What the text is made of, when prompts are calibrated.
    features: Option<PromptFeatures>,
    /// UTF-8 bytes of the prompt's text (decoded, `data:` URLs left out).
    text_bytes: u64,
    /// Integers under the text fields: prompts given as token ids.
    token_ids: u64,
    /// The largest `max_tokens`-like limit given.
    output: Option<u64>,
    /// Some `max_tokens`-like field was `null`: the default allowance applies too.
    output_null: bool,
    /// The largest `n` given (`null` counts as 1).
    choices: Option<u64>,
    /// The model, when asked for.
    model: Model,
}

/// What the walk has found of the body's model, as [`json_model`] finds it.
#[derive(Default)]
enum Model {
    /// No `"model"` string yet: none given, or only values of other types.
    #[default]
    Unseen,
    /// The first `"model"` string (later ones are skipped like any other field).
    Named(String),
    /// A `"model"` value that `json_model` refuses (a lone surrogate, a number out of
    /// range, too deep): that body has no model, whatever follows.
    Unreadable,
}

impl Model {
    /// Reads the value of a top-level `"model"` key, at the scanner. The estimate skips
    /// that value like any other field, so this refuses exactly what skipping it would:
    /// a value that [`model_value`] refuses but the grammar allows is skipped again and
    /// leaves the model [`Unreadable`](Model::Unreadable).
    fn read(&mut self, json: &mut Scanner<'_>) -> Result<(), Malformed> {
        if !matches!(self, Model::Unseen) {
            return json.skip_value();
        }
        let start = json.clone();
        match model_value(json) {
            Ok(Some(name)) => *self = Model::Named(name),
            Ok(None) => {}
            Err(_) => {
                *json = start;
                *self = Model::Unreadable;
                json.skip_value()?;
            }
        }
        Ok(())
    }
}

/// Why a body gets no estimate.
enum Refusal {
    /// Not JSON, or not an object: 400 `invalid_json`.
    Malformed(Malformed),
    /// A count field holding something other than a whole, non-negative number: 400
    /// `invalid_token_estimate`.
    Invalid(String),
}

impl From<Malformed> for Refusal {
    fn from(error: Malformed) -> Self {
        Refusal::Malformed(error)
    }
}

/// The top-level keys the estimate reads.
enum Field {
    /// `messages`, `prompt` and the other fields whose text is the prompt.
    Text,
    /// A `max_tokens`-like limit, by name.
    Output(&'static str),
    /// `n`, the number of choices.
    Choices,
    /// `model`: read only when the model is asked for, skipped otherwise.
    Model,
    /// Any other key: its value is skipped.
    Other,
}

impl Field {
    /// The field a key names, matched on what the key decodes to (`"max\u005ftokens"` is
    /// `max_tokens`).
    // Called once a key, from three walks: inlined, as when the estimate's was the only one.
    #[inline(always)]
    fn of(key: &Str<'_>) -> Field {
        // No key the estimate reads is longer than this.
        const LONGEST: usize = "max_completion_tokens".len();
        if key.decoded_len > LONGEST {
            return Field::Other;
        }
        let mut decoded = [0; LONGEST];
        let len = key.decode_prefix(&mut decoded);
        match &decoded[..len] {
            b"messages" | b"prompt" | b"input" | b"instructions" | b"system" | b"tools"
            | b"functions" => Field::Text,
            b"max_tokens" => Field::Output("max_tokens"),
            b"max_completion_tokens" => Field::Output("max_completion_tokens"),
            b"max_output_tokens" => Field::Output("max_output_tokens"),
            b"n" => Field::Choices,
            b"model" => Field::Model,
            _ => Field::Other,
        }
    }
}

/// Walks a request body once, counting what the estimate needs into `tally`, and with
/// `want_model` finding its model there too.
///
/// This accepts and refuses exactly the bodies `serde_json` did when the estimator was a
/// `Deserializer` walk (`deserialize_map` with visitors, `IgnoredAny` for other fields):
/// keys and everything under counted fields are fully checked, other fields only for
/// their grammar (see [`json_scan`](super::json_scan)). A count field decides as soon as
/// its value is read, so an unusable one is refused as invalid even if the body breaks
/// off after it, as before. Looking for the model changes none of this.
fn walk_request(body: &[u8], tally: &mut Tally, want_model: bool) -> Result<(), Refusal> {
    let mut json = Scanner::new(body);
    walk_object(&mut json, |json, key| {
        match Field::of(&key) {
            Field::Text => text_value(json, tally)?,
            Field::Output(name) => match count(json, name)? {
                Some(tokens) => {
                    tally.output = Some(tally.output.map_or(tokens, |t| t.max(tokens)));
                }
                // An explicit null means "no limit" to a server that keeps this key.
                None => tally.output_null = true,
            },
            Field::Choices => {
                // Like the limits: a repeated `n` counts at its largest (null is 1).
                let choices = count(json, "n")?.unwrap_or(1);
                tally.choices = Some(tally.choices.map_or(choices, |n| n.max(choices)));
            }
            Field::Model if want_model => tally.model.read(json)?,
            Field::Model | Field::Other => json.skip_value()?,
        }
        Ok::<_, Refusal>(())
    })?;
    json.end()?;
    Ok(())
}

/// Walks the object at the start of a body, as `serde_json`'s `deserialize_map` does:
/// checks its grammar and reads each key (fully checked), then hands the key to `field`
/// with the scanner at its value, which `field` must read. Stops just after the closing
/// brace: whatever follows is the caller's to check.
#[inline(always)]
fn walk_object<'a, E: From<Malformed>>(
    json: &mut Scanner<'a>,
    mut field: impl FnMut(&mut Scanner<'a>, Str<'a>) -> Result<(), E>,
) -> Result<(), E> {
    match json.peek() {
        Some(b'{') => json.bump(),
        Some(_) => return Err(json.error("invalid type, expected a JSON object").into()),
        None => return Err(json.error("EOF while parsing a value").into()),
    }
    let mut first = true;
    loop {
        match json.peek() {
            Some(b'}') => {
                json.bump();
                return Ok(());
            }
            Some(b'"') if first => {}
            Some(b',') if !first => {
                json.bump();
                match json.peek() {
                    Some(b'"') => {}
                    Some(b'}') => return Err(json.error("trailing comma").into()),
                    Some(_) => return Err(json.error("key must be a string").into()),
                    None => return Err(json.error("EOF while parsing a value").into()),
                }
            }
            Some(_) if first => return Err(json.error("key must be a string").into()),
            Some(_) => return Err(json.error("expected `,` or `}`").into()),
            None => return Err(json.error("EOF while parsing an object").into()),
        }
        first = false;
        let key = json.string()?;
        json.colon()?;
        field(json, key)?;
    }
}

/// How many arrays and objects a counted field's value may nest: serde_json's recursion
/// limit of 128 levels, less the request object itself (the 128th level is an error).
const TEXT_DEPTH_LIMIT: u32 = 126;

/// Counts the text (and token ids) of one value under a counted field, however it is
/// nested, up to [`TEXT_DEPTH_LIMIT`] levels: the UTF-8 bytes every string decodes to
/// (except `data:` URLs), and one token per integer. Object keys are not text.
// Inlined into the estimate's walk, as when that was its only caller (model values are
// checked with it too): a call costs small bodies a few percent.
#[inline(always)]
fn text_value(json: &mut Scanner<'_>, tally: &mut Tally) -> Result<(), Malformed> {
    // The containers open inside this value, innermost last: bit `i` is set when the
    // `i + 1`th is an object.
    let mut objects: u128 = 0;
    let mut depth: u32 = 0;
    // Each turn reads one value; then the loop below closes what it ends.
    'value: loop {
        match json.peek() {
            Some(b'"') => {
                let text = json.string()?;
                if !is_data_url(&text) {
                    tally.text_bytes = tally.text_bytes.saturating_add(text.decoded_len as u64);
                    if let Some(features) = &mut tally.features {
                        features.add(&text);
                    }
                }
            }
            Some(open @ (b'[' | b'{')) => {
                if depth == TEXT_DEPTH_LIMIT {
                    return Err(json.error("recursion limit exceeded"));
                }
                json.bump();
                let object = open == b'{';
                objects = (objects & !(1 << depth)) | (u128::from(object) << depth);
                depth += 1;
                match json.peek() {
                    Some(b']') if !object => json.bump(),
                    Some(b'}') if object => json.bump(),
                    // The first element (or an error there).
                    _ if !object => continue 'value,
                    Some(b'"') => {
                        json.string()?;
                        json.colon()?;
                        continue 'value;
                    }
                    Some(_) => return Err(json.error("key must be a string")),
                    None => return Err(json.error("EOF while parsing an object")),
                }
                // It was empty.
                depth -= 1;
            }
            Some(b'-' | b'0'..=b'9') => {
                let literal = json.number()?;
                match read_number(literal) {
                    Some(Number::Unsigned(_) | Number::Negative(_)) => {
                        tally.token_ids = tally.token_ids.saturating_add(1);
                    }
                    Some(Number::Float(_)) => {}
                    None => return Err(json.error("number out of range")),
                }
            }
            Some(b'n' | b't' | b'f') => json.literal()?,
            Some(_) => return Err(json.error("expected value")),
            None => return Err(json.error("EOF while parsing a value")),
        }
        // A value has ended: a comma and the next one, or the end of its container (and
        // perhaps of those around it).
        loop {
            let Some(innermost) = depth.checked_sub(1) else {
                return Ok(());
            };
            let object = (objects >> innermost) & 1 == 1;
            match json.peek() {
                Some(b',') => {
                    json.bump();
                    if !object {
                        continue 'value;
                    }
                    match json.peek() {
                        Some(b'"') => {
                            json.string()?;
                            json.colon()?;
                            continue 'value;
                        }
                        Some(b'}') => return Err(json.error("trailing comma")),
                        Some(_) => return Err(json.error("key must be a string")),
                        None => return Err(json.error("EOF while parsing a value")),
                    }
                }
                Some(b']') if !object => json.bump(),
                Some(b'}') if object => json.bump(),
                Some(_) if object => return Err(json.error("expected `,` or `}`")),
                Some(_) => return Err(json.error("expected `,` or `]`")),
                None if object => return Err(json.error("EOF while parsing an object")),
                None => return Err(json.error("EOF while parsing a list")),
            }
            depth -= 1;
        }
    }
}

/// Whether a string decodes to a `data:` URL (inline media, not counted as text).
fn is_data_url(text: &Str<'_>) -> bool {
    const PREFIX: &[u8] = b"data:";
    if text.raw.starts_with(PREFIX) {
        return true;
    }
    // Only an escape among the first bytes can make the decoded string differ there.
    if text.decoded_len < PREFIX.len() || !text.raw[..PREFIX.len()].contains(&b'\\') {
        return false;
    }
    let mut decoded = [0; PREFIX.len()];
    text.decode_prefix(&mut decoded);
    decoded == PREFIX
}

/// Reads a `max_tokens`-like field or `n`: a whole, non-negative number of tokens, or
/// `null` (`None`). Anything else is refused as invalid once read, as serde_json handed it
/// to a visitor: strings and literals whole, arrays and objects at their opening bracket.
fn count(json: &mut Scanner<'_>, name: &'static str) -> Result<Option<u64>, Refusal> {
    let refuse = |what: &str| {
        Err(Refusal::Invalid(format!(
            "`{name}` must be a whole number of tokens, not {what}"
        )))
    };
    match json.peek() {
        Some(b'n') => {
            json.literal()?;
            Ok(None)
        }
        Some(b't' | b'f') => {
            json.literal()?;
            refuse("a boolean")
        }
        Some(b'"') => {
            json.string()?;
            refuse("a string")
        }
        Some(b'[') => refuse("an array"),
        Some(b'{') => refuse("an object"),
        Some(b'-' | b'0'..=b'9') => {
            let literal = json.number()?;
            match read_number(literal) {
                Some(Number::Unsigned(tokens)) => Ok(Some(tokens)),
                Some(Number::Negative(tokens)) => refuse(&format!("the negative {tokens}")),
                // serde_json hands integers beyond 64 bits over as floats too.
                Some(Number::Float(tokens)) => {
                    refuse(&format!("{tokens} (fractional, or beyond 64 bits)"))
                }
                None => Err(json.error("number out of range").into()),
            }
        }
        Some(_) => Err(json.error("expected value").into()),
        None => Err(json.error("EOF while parsing a value").into()),
    }
}

/// A budget per model: the model is what this estimator finds in a body.
impl SharedBudget {
    /// One budget per model, keyed by the top-level `"model"` string of an OpenAI-style
    /// JSON body. The body must have been read by the layer's estimator: an
    /// [`OpenAiEstimator`](crate::OpenAiEstimator) finds the model in the same pass that
    /// estimates; after an [`Estimator::from_body_fn`](crate::Estimator::from_body_fn)
    /// the body is scanned once more for its model alone. Requests without a body or a
    /// model do not draw from it.
    ///
    /// The name comes from the client, so it is bounded: a name longer than
    /// [`MAX_MODEL_KEY_LEN`](Self::MAX_MODEL_KEY_LEN) bytes draws from the budget of its
    /// first `MAX_MODEL_KEY_LEN` bytes (a client cannot escape a budget with a long name, nor
    /// store megabytes of key). The tracker's idle bound limits how many keys it keeps.
    pub fn per_model(ledger: impl Into<TokenLedger>) -> Self {
        let find = |_: &Parts, body: Option<&Bytes>, model: Option<&str>| {
            let mut model = match model {
                Some(model) => model.to_owned(),
                None => json_model(body?)?,
            };
            if model.len() > Self::MAX_MODEL_KEY_LEN {
                let mut end = Self::MAX_MODEL_KEY_LEN;
                while !model.is_char_boundary(end) {
                    end -= 1;
                }
                model.truncate(end);
            }
            Some(model)
        };
        Self::with_key_fn(ledger, Arc::new(find), true)
    }
}

/// The top-level `"model"` of a JSON request body, if it is a string: what an OpenAI-style
/// request names its model with. A pass over the body that reads the model and skips
/// everything else (for bodies an [`OpenAiEstimator`] did not read: it finds the model in
/// its own pass).
///
/// It answers as the `serde_json` walk it replaced (`deserialize_map`, the `"model"`
/// values into a `serde_json::Value`, every other field `IgnoredAny`), which is:
///
/// - only a key at the top level that decodes to `model` (`"mod\u0065l"` too) counts,
///   and its string is returned decoded;
/// - the first `"model"` holding a string wins; one holding anything else is passed
///   over, and a later one is read in its turn;
/// - each `"model"` value read is checked in full (no lone surrogates or invalid UTF-8
///   in its strings, no number out of range, at most 126 levels deep); every other value
///   only for its grammar;
/// - any error in the object (including in a `"model"` read, or after the model) means
///   no model, but whatever follows the object's closing brace is not looked at.
pub(crate) fn json_model(body: &[u8]) -> Option<String> {
    let mut json = Scanner::new(body);
    let mut model = None;
    walk_object(&mut json, |json, key| {
        if model.is_none() && matches!(Field::of(&key), Field::Model) {
            model = model_value(json)?;
            Ok(())
        } else {
            json.skip_value()
        }
    })
    .ok()?;
    model
}

/// Reads the value of a `"model"` key as `serde_json` read it into a `serde_json::Value`:
/// in full, as counted text is (every string validated, every number's range checked,
/// the same depth limit); the name if it is a string.
fn model_value(json: &mut Scanner<'_>) -> Result<Option<String>, Malformed> {
    if json.peek() == Some(b'"') {
        return Ok(Some(json.string()?.decode()));
    }
    text_value(json, &mut Tally::default())?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimate of `body` by a layer's [`OpenAiEstimator`], as admission asks for it.
    fn layer_estimate(body: &Bytes, want_model: bool) -> Estimated {
        let (parts, ()) = http::Request::new(()).into_parts();
        let estimator = crate::Estimator::from(OpenAiEstimator::new());
        let Some(crate::extract::Estimate::Body(estimate)) =
            estimator.read(crate::extract::Head::whole(&parts))
        else {
            unreachable!("the OpenAI estimator reads the body")
        };
        estimate
            .estimate_learning(&parts, body, want_model, &Learned::default())
            .unwrap()
    }

    #[test]
    fn the_layer_finds_the_model_in_the_estimate_s_pass_only_when_asked() {
        let body = Bytes::from_static(br#"{"model":"m","max_tokens":5,"messages":["abcd"]}"#);
        assert_eq!(
            layer_estimate(&body, true),
            Estimated {
                tokens: 6,
                prompt: 1,
                model: Some("m".to_owned()),
                unlimited: false,
                features: None,
            }
        );
        assert_eq!(layer_estimate(&body, false).model, None);
        assert_eq!(layer_estimate(&body, false).tokens, 6);
    }

    /// The model of `body` from the estimating pass, when it estimates.
    fn estimating(body: &[u8]) -> Result<Option<String>, EstimateError> {
        OpenAiEstimator::new()
            .estimate_with_model(body, true)
            .map(|(_, model)| model)
    }

    #[test]
    fn json_model_reads_the_first_top_level_model_string() {
        let cases: [(&[u8], Option<&str>); 22] = [
            (br#"{"model":"gpt-4o","messages":[]}"#, Some("gpt-4o")),
            (br#" { "model" : "m" } "#, Some("m")),
            (br#"{"mod\u0065l":"m\u00e9\ud83d\ude80\n"}"#, Some("mé🚀\n")),
            (br#"{"model":""}"#, Some("")),
            // The first string wins; values of other types are passed over.
            (br#"{"model":"m","model":"n"}"#, Some("m")),
            (br#"{"model":42,"model":"n"}"#, Some("n")),
            (
                br#"{"model":null,"model":{"a":[1]},"model":"n"}"#,
                Some("n"),
            ),
            (br#"{"model":42}"#, None),
            (br#"{"model":{"model":"m"}}"#, None),
            (br#"{"a":{"model":"m"}}"#, None),
            (br#"{"models":"m","Model":"m"}"#, None),
            // Not in a model read: the whole body has none.
            (br#"{"model":1e999,"model":"n"}"#, None),
            (br#"{"model":["\ud800"],"model":"n"}"#, None),
            (b"{\"model\":\"\xff\"}", None),
            (br#"{"model":"\ud800"}"#, None),
            // Once found, later values are only skipped.
            (
                br#"{"model":"m","model":"\ud800","model":1e999}"#,
                Some("m"),
            ),
            (br#"{"a":"\ud800","b":1e999,"model":"m"}"#, Some("m")),
            // Any error in the object, even after the model; nothing after it is read.
            (br#"{"model":"m","a":}"#, None),
            (br#"{"model":"m""#, None),
            (br#"{"model":"m"} trailing"#, Some("m")),
            (br#"["model","m"]"#, None),
            (b"", None),
        ];
        for (body, expected) in cases {
            let shown = String::from_utf8_lossy(body);
            assert_eq!(json_model(body).as_deref(), expected, "{shown}");
            // The estimating pass agrees wherever it estimates.
            if let Ok(model) = estimating(body) {
                assert_eq!(model.as_deref(), expected, "{shown}");
            }
        }
    }

    #[test]
    fn looking_for_the_model_changes_no_estimate() {
        let estimator = OpenAiEstimator::new();
        for body in [
            &br#"{"model":"m","max_tokens":5}"#[..],
            br#"{"model":1e999,"max_tokens":5}"#,
            br#"{"model":"\ud800","max_tokens":5}"#,
            br#"{"model":[[[[1e999]]]],"max_tokens":5}"#,
            br#"{"model":[[[[1e999]]],"max_tokens":5}"#,
            br#"{"model":"m","max_tokens":5} x"#,
            br#"{"model":"m","max_tokens":"5"}"#,
        ] {
            let without = estimator.estimate_with_model(body, false);
            let with = estimator.estimate_with_model(body, true);
            assert_eq!(
                without.as_ref().map(|(estimate, _)| *estimate),
                with.as_ref().map(|(estimate, _)| *estimate),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert!(without.map_or(true, |(_, model)| model.is_none()));
        }
        let deep = format!(
            r#"{{"model":{}1{},"max_tokens":5}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let (estimate, model) = estimator
            .estimate_with_model(deep.as_bytes(), true)
            .unwrap();
        assert_eq!((estimate.total(), model), (5, None));
        assert_eq!(json_model(deep.as_bytes()), None);
    }
}
