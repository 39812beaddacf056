//! Estimating an OpenAI-style request from its JSON body.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde::Deserializer as _;

use super::estimate::{EstimateError, Estimator};

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
    body_limit: usize,
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
        let mut tally = Tally::default();
        let mut de = serde_json::Deserializer::from_slice(body);
        let parsed = de
            .deserialize_map(RequestVisitor(&mut tally))
            .and_then(|()| de.end());
        if let Err(error) = parsed {
            return Err(match tally.invalid_field.take() {
                Some(reason) => EstimateError::invalid(reason),
                None => EstimateError::malformed(error.to_string()),
            });
        }
        Ok(OpenAiEstimate {
            prompt_tokens: tally
                .text_bytes
                .div_ceil(self.bytes_per_token)
                .saturating_add(tally.token_ids),
            output_tokens: match tally.output {
                Some(tokens) if tally.output_null => tokens.max(self.default_output_tokens),
                Some(tokens) => tokens,
                None => self.default_output_tokens,
            }
            .saturating_mul(tally.choices.unwrap_or(1).max(1)),
        })
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

impl From<OpenAiEstimator> for Estimator {
    fn from(estimator: OpenAiEstimator) -> Self {
        let limit = estimator.body_limit;
        Estimator::from_body_fn(limit, move |_, body| estimator.estimate(body))
    }
}

/// What the walk over a body has counted so far.
#[derive(Default)]
struct Tally {
    text_bytes: u64,
    token_ids: u64,
    output: Option<u64>,
    /// Some `max_tokens`-like field was `null`: the default allowance applies too.
    output_null: bool,
    choices: Option<u64>,
    /// Set when a counted field is unusable, to tell that apart from malformed JSON.
    invalid_field: Option<String>,
}

/// The top-level keys the estimate reads.
enum Field {
    Text,
    Output(&'static str),
    Choices,
    Other,
}

impl<'de> de::Deserialize<'de> for Field {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(FieldVisitor)
    }
}

struct FieldVisitor;

impl Visitor<'_> for FieldVisitor {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Field, E> {
        Ok(match key {
            "messages" | "prompt" | "input" | "instructions" | "system" | "tools" | "functions" => {
                Field::Text
            }
            "max_tokens" => Field::Output("max_tokens"),
            "max_completion_tokens" => Field::Output("max_completion_tokens"),
            "max_output_tokens" => Field::Output("max_output_tokens"),
            "n" => Field::Choices,
            _ => Field::Other,
        })
    }
}

/// Walks the top-level object.
struct RequestVisitor<'a>(&'a mut Tally);

impl<'de> Visitor<'de> for RequestVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let tally = self.0;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Text => map.next_value_seed(Text(tally))?,
                Field::Output(name) => match map.next_value_seed(Count { name, tally })? {
                    Some(tokens) => {
                        tally.output = Some(tally.output.map_or(tokens, |t| t.max(tokens)));
                    }
                    // An explicit null means "no limit" to a server that keeps this key.
                    None => tally.output_null = true,
                },
                Field::Choices => {
                    // Like the limits: a repeated `n` counts at its largest (null is 1).
                    let name = "n";
                    let choices = map.next_value_seed(Count { name, tally })?.unwrap_or(1);
                    tally.choices = Some(tally.choices.map_or(choices, |n| n.max(choices)));
                }
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Counts the text (and token ids) of one value, however deeply nested. serde_json's
/// recursion limit bounds the depth, so hostile nesting is an error, not a stack overflow.
struct Text<'a>(&'a mut Tally);

impl<'de> DeserializeSeed<'de> for Text<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Text<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<(), E> {
        if !text.starts_with("data:") {
            self.0.text_bytes = self.0.text_bytes.saturating_add(text.len() as u64);
        }
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.0.token_ids = self.0.token_ids.saturating_add(1);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.visit_u64(0)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Text(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(Text(&mut *self.0))?;
        }
        Ok(())
    }
}

/// A whole, non-negative token count (or `null`, meaning absent).
struct Count<'a> {
    name: &'static str,
    tally: &'a mut Tally,
}

impl Count<'_> {
    fn refuse<E: de::Error>(self, what: &str) -> Result<Option<u64>, E> {
        let reason = format!(
            "`{}` must be a whole number of tokens, not {what}",
            self.name
        );
        self.tally.invalid_field = Some(reason.clone());
        Err(E::custom(reason))
    }
}

impl<'de> DeserializeSeed<'de> for Count<'_> {
    type Value = Option<u64>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Count<'_> {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a whole number for `{}`", self.name)
    }

    fn visit_u64<E: de::Error>(self, tokens: u64) -> Result<Self::Value, E> {
        Ok(Some(tokens))
    }

    fn visit_i64<E: de::Error>(self, tokens: i64) -> Result<Self::Value, E> {
        match u64::try_from(tokens) {
            Ok(tokens) => Ok(Some(tokens)),
            Err(_) => self.refuse(&format!("the negative {tokens}")),
        }
    }

    fn visit_f64<E: de::Error>(self, tokens: f64) -> Result<Self::Value, E> {
        // serde_json hands integers beyond 64 bits over as floats too.
        self.refuse(&format!("{tokens} (fractional, or beyond 64 bits)"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        self.refuse("a boolean")
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        self.refuse("a string")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        self.refuse("an array")
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        self.refuse("an object")
    }
}

/// The top-level `"model"` of a JSON request body, if it is a string: what an OpenAI-style
/// request names its model with. Everything else is skipped without being kept.
pub(crate) fn json_model(body: &[u8]) -> Option<String> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    deserializer.deserialize_map(ModelVisitor).ok()?
}

struct ModelVisitor;

impl<'de> Visitor<'de> for ModelVisitor {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut model = None;
        while let Some(key) = map.next_key::<ModelKey>()? {
            match key {
                // The first one wins; a later duplicate is skipped like any other field.
                ModelKey::Model if model.is_none() => {
                    model = match map.next_value::<serde_json::Value>()? {
                        serde_json::Value::String(name) => Some(name),
                        _ => None,
                    };
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(model)
    }
}

enum ModelKey {
    Model,
    Other,
}

impl<'de> Deserialize<'de> for ModelKey {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = ModelKey;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<ModelKey, E> {
                Ok(match key {
                    "model" => ModelKey::Model,
                    _ => ModelKey::Other,
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}
