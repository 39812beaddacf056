//! The `OpenAiEstimator` rules written the straightforward way: parse the whole body into
//! a `serde_json::Value`, then walk it. The corpus test checks the crate against this, and
//! the bench times it as the baseline a user would otherwise write.

// Each includer (the bench, the test) uses a different part of this module.
#![allow(dead_code)]

use serde_json::Value;

/// The top-level fields whose strings (and integers) make up the prompt.
pub const TEXT_FIELDS: [&str; 7] = [
    "messages",
    "prompt",
    "input",
    "instructions",
    "system",
    "tools",
    "functions",
];

/// The top-level fields giving the output allowance; the largest wins.
pub const OUTPUT_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// Prompt tokens plus output allowance, or `None` where the crate refuses the body (not
/// a JSON object, or a count that is not a whole non-negative 64-bit number).
pub fn reference_estimate(body: &[u8], default_output: u64, bytes_per_token: u64) -> Option<u64> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object()?;

    let mut text_bytes = 0u64;
    let mut token_ids = 0u64;
    for field in TEXT_FIELDS {
        if let Some(value) = object.get(field) {
            walk(value, &mut text_bytes, &mut token_ids);
        }
    }

    let mut output: Option<u64> = None;
    for field in OUTPUT_FIELDS {
        if let Some(tokens) = count(object.get(field))? {
            output = Some(output.map_or(tokens, |o| o.max(tokens)));
        }
    }
    // `n: 0` asks for no choices, which no API accepts; the crate reserves for one.
    let choices = count(object.get("n"))?.unwrap_or(1).max(1);

    let prompt = text_bytes
        .div_ceil(bytes_per_token.max(1))
        .saturating_add(token_ids);
    let output = output.unwrap_or(default_output).saturating_mul(choices);
    Some(prompt.saturating_add(output))
}

/// Adds up the UTF-8 bytes of every string (except `data:` URLs) and the number of
/// integers under `value`. Object keys are not text.
fn walk(value: &Value, text_bytes: &mut u64, token_ids: &mut u64) {
    match value {
        Value::String(s) => {
            if !s.starts_with("data:") {
                *text_bytes = text_bytes.saturating_add(s.len() as u64);
            }
        }
        Value::Number(n) => {
            if n.is_u64() || n.is_i64() {
                *token_ids = token_ids.saturating_add(1);
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, text_bytes, token_ids);
            }
        }
        Value::Object(map) => {
            for item in map.values() {
                walk(item, text_bytes, token_ids);
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

/// A count field: absent or `null` is `Some(None)`; a whole non-negative number fitting
/// 64 bits is `Some(Some(n))`; anything else is `None` (the body is refused).
fn count(value: Option<&Value>) -> Option<Option<u64>> {
    match value {
        None | Some(Value::Null) => Some(None),
        Some(value) => value.as_u64().map(Some),
    }
}
