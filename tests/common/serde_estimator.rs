//! The `OpenAiEstimator` walk as it was written before the crate had its own JSON
//! scanner: a `serde_json::Deserializer` driven by custom visitors, skipping unread
//! fields with `IgnoredAny`. It defines which bodies the estimator accepts, which it
//! refuses and how; the differential test holds the crate to it.
//!
//! Kept as it was (only the estimator's settings became arguments), so do not "fix" it:
//! a change here changes what the test calls right.
//!
//! [`json_model`] is the crate's model finder for per-model budgets as it was before the
//! scanner found models too (moved here unchanged): it defines which model the scanner
//! must find in a body.

#![allow(dead_code)]

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer as _};

/// How a body is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not JSON, or not an object (`invalid_json`).
    Malformed(String),
    /// A count that is not a whole non-negative 64-bit number (`invalid_token_estimate`).
    Invalid(String),
}

/// Prompt tokens and output allowance, as `OpenAiEstimator::estimate_parts` gave them.
pub fn estimate_parts(
    body: &[u8],
    default_output_tokens: u64,
    bytes_per_token: u64,
) -> Result<(u64, u64), Refusal> {
    let bytes_per_token = bytes_per_token.max(1);
    let mut tally = Tally::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = de
        .deserialize_map(RequestVisitor(&mut tally))
        .and_then(|()| de.end());
    if let Err(error) = parsed {
        return Err(match tally.invalid_field.take() {
            Some(reason) => Refusal::Invalid(reason),
            None => Refusal::Malformed(error.to_string()),
        });
    }
    let prompt = tally
        .text_bytes
        .div_ceil(bytes_per_token)
        .saturating_add(tally.token_ids);
    let output = match tally.output {
        Some(tokens) if tally.output_null => tokens.max(default_output_tokens),
        Some(tokens) => tokens,
        None => default_output_tokens,
    }
    .saturating_mul(tally.choices.unwrap_or(1).max(1));
    Ok((prompt, output))
}

#[derive(Default)]
struct Tally {
    text_bytes: u64,
    token_ids: u64,
    output: Option<u64>,
    output_null: bool,
    choices: Option<u64>,
    invalid_field: Option<String>,
}

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
                    None => tally.output_null = true,
                },
                Field::Choices => {
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
pub fn json_model(body: &[u8]) -> Option<String> {
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
