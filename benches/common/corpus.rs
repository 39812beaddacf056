//! Deterministic OpenAI-style request bodies for the estimator bench and the corpus test.
//!
//! Nothing here is random between runs: every body comes from a seed through a small
//! xorshift generator, so a failing body can be rebuilt from its seed and size.
//!
//! Bodies are built as `serde_json::Value`s and written out in one of three styles seen
//! in real traffic: compact with raw UTF-8 (JavaScript's `JSON.stringify`, Rust's
//! `serde_json`), Python's `json.dumps` defaults (`", "` and `": "` separators, every
//! non-ASCII character as a `\uXXXX` escape, emoji as surrogate pairs), and pretty-printed
//! with two-space indents (hand-written `curl` bodies). The top-level keys keep the order
//! SDKs send them in (`model` first); nested objects put `role`, `type` and `name` first.

// Each includer (the bench, the test) uses a different part of this module.
#![allow(dead_code)]

use serde_json::{json, Map, Value};

/// xorshift64*, seeded through splitmix64 so that nearby seeds give unrelated streams.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        if hi <= lo {
            return lo;
        }
        lo + self.below((hi - lo + 1) as u64) as usize
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// How a body is written out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `{"a":1,"b":"é"}`: no whitespace, raw UTF-8.
    Compact,
    /// `{"a": 1, "b": "\u00e9"}`: Python's `json.dumps` defaults.
    Python,
    /// Two-space indents, raw UTF-8.
    Pretty,
}

impl Style {
    fn from_rng(rng: &mut Rng) -> Self {
        match rng.below(10) {
            0..=5 => Style::Compact,
            6..=8 => Style::Python,
            _ => Style::Pretty,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writing JSON in a given style.

/// Nested objects list these keys first, in this order, then the rest alphabetically.
const LEADING_KEYS: [&str; 3] = ["role", "type", "name"];

fn write_string(s: &str, style: Style, out: &mut Vec<u8>) {
    if style != Style::Python {
        serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
        return;
    }
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            c if c.is_ascii() && c >= ' ' => out.push(c as u8),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.extend_from_slice(format!("\\u{unit:04x}").as_bytes());
                }
            }
        }
    }
    out.push(b'"');
}

fn newline(style: Style, depth: usize, out: &mut Vec<u8>) {
    if style == Style::Pretty {
        out.push(b'\n');
        out.resize(out.len() + 2 * depth, b' ');
    }
}

fn separator(style: Style, out: &mut Vec<u8>) {
    out.extend_from_slice(if style == Style::Python { b", " } else { b"," });
}

fn colon(style: Style, out: &mut Vec<u8>) {
    out.extend_from_slice(if style == Style::Compact { b":" } else { b": " });
}

fn ordered_keys(map: &Map<String, Value>) -> Vec<&String> {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by_key(|k| {
        let rank = LEADING_KEYS
            .iter()
            .position(|l| l == k)
            .unwrap_or(LEADING_KEYS.len());
        (rank, k.as_str())
    });
    keys
}

fn write_entries<'a>(
    entries: impl ExactSizeIterator<Item = (&'a str, &'a Value)>,
    style: Style,
    depth: usize,
    out: &mut Vec<u8>,
) {
    out.push(b'{');
    let empty = entries.len() == 0;
    for (i, (key, value)) in entries.enumerate() {
        if i > 0 {
            separator(style, out);
        }
        newline(style, depth + 1, out);
        write_string(key, style, out);
        colon(style, out);
        write_value(value, style, depth + 1, out);
    }
    if !empty {
        newline(style, depth, out);
    }
    out.push(b'}');
}

/// Writes `value` at nesting `depth` (used for the pretty style's indents).
pub fn write_value(value: &Value, style: Style, depth: usize, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_string(s, style, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    separator(style, out);
                }
                newline(style, depth + 1, out);
                write_value(item, style, depth + 1, out);
            }
            if !items.is_empty() {
                newline(style, depth, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let keys = ordered_keys(map);
            write_entries(
                keys.into_iter().map(|k| (k.as_str(), &map[k])),
                style,
                depth,
                out,
            );
        }
    }
}

/// Writes a top-level object whose keys keep the given order.
pub fn write_body(fields: &[(&str, Value)], style: Style) -> Vec<u8> {
    let mut out = Vec::new();
    write_entries(fields.iter().map(|(k, v)| (*k, v)), style, 0, &mut out);
    out
}

fn written_len(value: &Value, style: Style, depth: usize) -> usize {
    let mut out = Vec::new();
    write_value(value, style, depth, &mut out);
    out.len()
}

// ---------------------------------------------------------------------------------------
// Text.

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "or",
    "from",
    "at",
    "which",
    "but",
    "not",
    "have",
    "an",
    "they",
    "you",
    "can",
    "we",
    "their",
    "would",
    "there",
    "what",
    "about",
    "model",
    "request",
    "response",
    "function",
    "value",
    "server",
    "latency",
    "token",
    "budget",
    "tenant",
    "gateway",
    "quarterly",
    "report",
    "summarize",
    "customer",
    "analysis",
    "database",
    "migration",
    "schedule",
    "meeting",
    "translate",
    "paragraph",
    "example",
    "important",
    "however",
    "because",
    "between",
    "without",
    "approximately",
    "performance",
    "configuration",
    "documentation",
    "implementation",
    "international",
    "responsibility",
    "Please",
    "Thanks",
    "Could",
    "explain",
    "following",
    "error",
    "message",
    "carefully",
];

/// Words with something a JSON writer must escape or that is not ASCII.
const SPECIAL_WORDS: &[&str] = &[
    "café",
    "naïve",
    "résumé",
    "Zürich",
    "São Paulo",
    "Ελληνικά",
    "日本語のテキスト",
    "中文",
    "emoji 🚀",
    "👍🏽",
    "🤖",
    "\"quoted\"",
    "it's \"fine\"",
    "C:\\Users\\data",
    "a\tb",
    "x ≤ y",
    "50 €",
    "—",
    "line one\nline two",
    "back\\slash",
];

const CODE_SNIPPETS: &[&str] = &[
    "```rust\nfn main() {\n    println!(\"hello, {}\", name);\n}\n```",
    "```python\ndef f(x):\n    return {\"key\": x}\n```",
    "```json\n{\"a\": [1, 2, 3], \"b\": null}\n```",
    "`SELECT * FROM users WHERE name = 'O\\'Brien';`",
];

/// English-like text of about `len` bytes (UTF-8), with punctuation, line breaks,
/// quotes, backslashes, accented letters and emoji now and then.
pub fn text(rng: &mut Rng, len: usize) -> String {
    let mut s = String::with_capacity(len + 32);
    let mut sentence_start = true;
    while s.len() < len {
        if rng.chance(1) && len - s.len() > 60 {
            s.push_str(rng.pick::<&str>(CODE_SNIPPETS));
            s.push('\n');
            sentence_start = true;
            continue;
        }
        let word = if rng.chance(4) {
            *rng.pick(SPECIAL_WORDS)
        } else {
            *rng.pick(WORDS)
        };
        if sentence_start {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                s.extend(first.to_uppercase());
                s.push_str(chars.as_str());
            }
            sentence_start = false;
        } else {
            s.push_str(word);
        }
        match rng.below(40) {
            0..=2 => {
                s.push_str(". ");
                sentence_start = true;
            }
            3 => {
                s.push_str("?\n");
                sentence_start = true;
            }
            4 => {
                s.push_str(".\n\n");
                sentence_start = true;
            }
            5 | 6 => s.push_str(", "),
            _ => s.push(' '),
        }
    }
    s
}

/// A short identifier like `call_3f9a0c…`.
fn ident(rng: &mut Rng, prefix: &str, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut s = String::from(prefix);
    for _ in 0..len {
        s.push(*rng.pick(ALPHABET) as char);
    }
    s
}

/// A `data:image/png;base64,…` URL carrying about `len` bytes of base64.
fn data_url(rng: &mut Rng, len: usize) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(len + 32);
    s.push_str("data:image/png;base64,iVBORw0KGgo");
    let len = len.max(4) / 4 * 4;
    while s.len() < len {
        s.push(*rng.pick(B64) as char);
    }
    s.push_str("==");
    s
}

// ---------------------------------------------------------------------------------------
// Pieces of requests.

const CHAT_MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "o3-mini",
    "meta-llama/Llama-3.1-70B-Instruct",
];

fn tool(rng: &mut Rng, index: usize) -> Value {
    let (name, description, parameters) = match index % 3 {
        0 => (
            "get_weather",
            "Get the current weather for a city. Use it when the user asks about weather, \
             temperature or rain.",
            json!({
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. \"Zürich\""},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 14}
                },
                "required": ["city"],
                "additionalProperties": false
            }),
        ),
        1 => (
            "search_docs",
            "Search the internal documentation and return the most relevant passages.",
            json!({
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "top_k": {"type": "integer", "default": 5},
                    "filters": {
                        "type": "object",
                        "properties": {
                            "product": {"type": "string"},
                            "after": {"type": "string", "format": "date"}
                        }
                    }
                },
                "required": ["query"]
            }),
        ),
        _ => (
            "run_sql",
            "Run a read-only SQL query against the analytics warehouse.",
            json!({
                "type": "object",
                "properties": {
                    "sql": {"type": "string", "description": "A single SELECT statement"},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 1000}
                },
                "required": ["sql"]
            }),
        ),
    };
    let mut function = json!({
        "name": name,
        "description": description,
        "parameters": parameters,
    });
    if rng.chance(30) {
        function["strict"] = json!(true);
    }
    json!({"type": "function", "function": function})
}

fn tool_arguments(rng: &mut Rng) -> String {
    let args = match rng.below(3) {
        0 => {
            json!({"city": *rng.pick(&["Paris", "Zürich", "São Paulo", "東京"]), "unit": "celsius"})
        }
        1 => json!({"query": text(rng, 40), "top_k": rng.range(1, 10)}),
        _ => json!({"sql": "SELECT name, \"count\" FROM t WHERE x > 3 LIMIT 10", "limit": 10}),
    };
    serde_json::to_string(&args).expect("serializing a Value cannot fail")
}

/// Content of a user message: a string, or an array of parts, perhaps with an image.
fn user_content(rng: &mut Rng, len: usize, image_len: usize) -> Value {
    let with_image = image_len > 0 && rng.chance(12);
    if !with_image && rng.chance(65) {
        return Value::String(text(rng, len));
    }
    let mut parts = Vec::new();
    let pieces = rng.range(1, 3);
    for _ in 0..pieces {
        parts.push(json!({"type": "text", "text": text(rng, len / pieces)}));
    }
    if with_image {
        let url = if rng.chance(75) {
            let len = rng.range(image_len / 4, image_len);
            data_url(rng, len)
        } else {
            format!("https://example.com/images/{}.png", ident(rng, "img_", 12))
        };
        let mut image_url = json!({"url": url});
        if rng.chance(50) {
            image_url["detail"] = json!(*rng.pick(&["low", "high", "auto"]));
        }
        let at = rng.range(0, parts.len());
        parts.insert(at, json!({"type": "image_url", "image_url": image_url}));
    }
    Value::Array(parts)
}

/// One or two messages (an assistant tool call is followed by the tool's answer).
fn turn(rng: &mut Rng, user: bool, len: usize, image_len: usize) -> Vec<Value> {
    if user {
        let mut message = json!({"role": "user", "content": user_content(rng, len, image_len)});
        if rng.chance(5) {
            message["name"] = json!(ident(rng, "user_", 6));
        }
        return vec![message];
    }
    if rng.chance(15) {
        let id = ident(rng, "call_", 24);
        let name = *rng.pick(&["get_weather", "search_docs", "run_sql"]);
        let call = json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": tool_arguments(rng)}
            }]
        });
        let result = json!({"results": [text(rng, len / 2), text(rng, len / 4)], "ok": true});
        let answer = json!({
            "role": "tool",
            "tool_call_id": id,
            "content": serde_json::to_string(&result).expect("serializing a Value cannot fail"),
        });
        return vec![call, answer];
    }
    let content = if rng.chance(20) {
        json!([{"type": "text", "text": text(rng, len)}])
    } else {
        Value::String(text(rng, len))
    };
    vec![json!({"role": "assistant", "content": content})]
}

/// The output-limit fields of a chat request: `max_tokens`, `max_completion_tokens`,
/// both, neither, or a `null`; sometimes `n`.
fn output_fields(rng: &mut Rng, fields: &mut Vec<(&'static str, Value)>) {
    match rng.below(20) {
        0..=8 => fields.push(("max_tokens", json!(rng.range(16, 4096)))),
        9..=12 => fields.push(("max_completion_tokens", json!(rng.range(16, 16384)))),
        13 => {
            fields.push(("max_tokens", json!(rng.range(16, 4096))));
            fields.push(("max_completion_tokens", json!(rng.range(16, 4096))));
        }
        14 => fields.push(("max_tokens", Value::Null)),
        _ => {}
    }
    if rng.chance(15) {
        fields.push(("n", json!(rng.range(1, 4))));
    }
}

// ---------------------------------------------------------------------------------------
// Whole bodies.

/// A chat-completions body of about `target_bytes`, in the style the seed picks.
pub fn chat_body(target_bytes: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let style = Style::from_rng(&mut rng);
    chat_body_with(&mut rng, target_bytes, style)
}

/// A chat-completions body of about `target_bytes`, written in `style`.
pub fn chat_body_styled(target_bytes: usize, seed: u64, style: Style) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    chat_body_with(&mut rng, target_bytes, style)
}

fn chat_body_with(rng: &mut Rng, target_bytes: usize, style: Style) -> Vec<u8> {
    let mut fields: Vec<(&'static str, Value)> = vec![("model", json!(*rng.pick(CHAT_MODELS)))];
    let system_len = rng.range(40, (target_bytes / 10).clamp(80, 3000));
    let mut messages = vec![json!({"role": "system", "content": text(rng, system_len)})];
    let mut tail: Vec<(&'static str, Value)> = Vec::new();
    if rng.chance(85) {
        tail.push((
            "temperature",
            json!(f64::from(rng.range(0, 20) as u32) / 10.0),
        ));
    }
    if rng.chance(30) {
        tail.push(("top_p", json!(0.95)));
    }
    tail.push(("stream", json!(rng.chance(60))));
    if rng.chance(30) {
        tail.push(("stream_options", json!({"include_usage": true})));
    }
    output_fields(rng, &mut tail);
    if target_bytes >= 1500 || rng.chance(40) {
        let count = if target_bytes >= 4000 {
            rng.range(1, 3)
        } else {
            1
        };
        let tools: Vec<Value> = (0..count).map(|i| tool(rng, i)).collect();
        tail.push(("tools", Value::Array(tools)));
        if rng.chance(50) {
            tail.push(("tool_choice", json!("auto")));
        }
    }
    if rng.chance(60) {
        tail.push((
            "metadata",
            json!({"conversation_id": ident(rng, "conv_", 16), "app": "support-bot", "env": "prod"}),
        ));
    }
    if rng.chance(60) {
        tail.push(("user", json!(ident(rng, "user-", 8))));
    }
    if rng.chance(20) {
        tail.push(("response_format", json!({"type": "json_object"})));
    }

    // Fill the conversation up to the target: measure everything but the messages, then
    // add turns sized from what is left.
    let mut probe = fields.clone();
    probe.push(("messages", Value::Array(messages.clone())));
    probe.extend(tail.iter().cloned());
    let mut size = write_body(&probe, style).len();
    let typical = (target_bytes / 40).max(120);
    let image_len = if target_bytes >= 4000 {
        target_bytes / 12
    } else {
        0
    };
    let mut user = true;
    while size < target_bytes {
        let left = target_bytes - size;
        let len = rng
            .range(typical / 4, typical * 2)
            .min(left.saturating_sub(40).max(8));
        for message in turn(rng, user, len, image_len.min(left / 2)) {
            size +=
                written_len(&message, style, 2) + 2 + if style == Style::Pretty { 5 } else { 0 };
            messages.push(message);
        }
        user = !user;
    }
    fields.push(("messages", Value::Array(messages)));
    fields.extend(tail);
    write_body(&fields, style)
}

/// A responses-API body (`input`, `instructions`, `max_output_tokens`).
pub fn responses_body(target_bytes: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let style = Style::from_rng(&mut rng);
    let mut fields: Vec<(&'static str, Value)> = vec![("model", json!("gpt-4.1"))];
    if rng.chance(70) {
        fields.push(("instructions", json!(text(&mut rng, 200))));
    }
    let input = if rng.chance(40) {
        Value::String(text(&mut rng, target_bytes))
    } else {
        let mut items = Vec::new();
        let mut left = target_bytes as i64;
        let mut user = true;
        while left > 0 {
            let len = rng.range(40, (target_bytes / 4).max(80));
            let role = if user { "user" } else { "assistant" };
            let kind = if user { "input_text" } else { "output_text" };
            let item = if rng.chance(50) {
                json!({"role": role, "content": text(&mut rng, len)})
            } else {
                json!({"type": "message", "role": role, "content": [{"type": kind, "text": text(&mut rng, len)}]})
            };
            left -= written_len(&item, style, 2) as i64 + 2;
            items.push(item);
            user = !user;
        }
        Value::Array(items)
    };
    fields.push(("input", input));
    match rng.below(3) {
        0 => fields.push(("max_output_tokens", json!(rng.range(64, 8192)))),
        1 => fields.push(("max_output_tokens", Value::Null)),
        _ => {}
    }
    if rng.chance(50) {
        fields.push((
            "tools",
            json!([{
                "type": "function",
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
            }]),
        ));
    }
    fields.push(("store", json!(false)));
    if rng.chance(50) {
        fields.push(("reasoning", json!({"effort": "low", "summary": "auto"})));
    }
    write_body(&fields, style)
}

/// A legacy completions body: `prompt` as a string, a list of strings, token ids or a
/// batch of token-id lists.
pub fn completions_body(target_bytes: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let style = Style::from_rng(&mut rng);
    let ids = |rng: &mut Rng, count: usize| -> Value {
        Value::Array((0..count).map(|_| json!(rng.below(100_256))).collect())
    };
    let prompt = match rng.below(4) {
        0 => Value::String(text(&mut rng, target_bytes)),
        1 => json!([
            text(&mut rng, target_bytes / 2),
            text(&mut rng, target_bytes / 2)
        ]),
        2 => ids(&mut rng, target_bytes / 6 + 1),
        _ => json!([
            ids(&mut rng, target_bytes / 12 + 1),
            ids(&mut rng, target_bytes / 12 + 1)
        ]),
    };
    let mut fields: Vec<(&'static str, Value)> = vec![
        ("model", json!("gpt-3.5-turbo-instruct")),
        ("prompt", prompt),
    ];
    if rng.chance(80) {
        fields.push(("max_tokens", json!(rng.range(1, 2048))));
    }
    if rng.chance(40) {
        fields.push(("n", json!(rng.range(1, 5))));
    }
    fields.push(("temperature", json!(0.2)));
    fields.push(("logprobs", Value::Null));
    fields.push(("echo", json!(false)));
    fields.push(("stop", json!(["\n\n", "###"])));
    if rng.chance(30) {
        fields.push(("logit_bias", json!({"50256": -100, "198": 5})));
    }
    write_body(&fields, style)
}

/// An embeddings body: `input` as a string, strings or token ids.
pub fn embeddings_body(target_bytes: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let style = Style::from_rng(&mut rng);
    let input = match rng.below(3) {
        0 => Value::String(text(&mut rng, target_bytes)),
        1 => Value::Array(
            (0..rng.range(2, 16))
                .map(|_| Value::String(text(&mut rng, target_bytes / 8)))
                .collect(),
        ),
        _ => Value::Array(
            (0..target_bytes / 6 + 1)
                .map(|_| json!(rng.below(100_256)))
                .collect(),
        ),
    };
    let fields: Vec<(&'static str, Value)> = vec![
        ("model", json!("text-embedding-3-small")),
        ("input", input),
        ("encoding_format", json!("float")),
        ("dimensions", json!(256)),
    ];
    write_body(&fields, style)
}

/// Hand-made bodies for the corners of the rules.
pub fn edge_cases() -> Vec<Vec<u8>> {
    let bodies = vec![
        // Empty and minimal bodies.
        json!({}),
        json!({"model": "gpt-4o", "messages": []}),
        json!({"model": "gpt-4o", "messages": [], "max_tokens": null}),
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": ""}], "max_tokens": 0}),
        json!({"messages": [{"role": "user", "content": null}], "max_completion_tokens": null, "n": null}),
        // All three limits at once: the largest wins; n multiplies; n = 0 counts as one.
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
               "max_completion_tokens": 300, "max_output_tokens": 20, "n": 3}),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "n": 0}),
        json!({"prompt": "x", "max_tokens": u64::MAX, "n": 2}),
        json!({"prompt": "x", "max_tokens": u64::MAX}),
        // Nested content: arrays in arrays, objects in objects, numbers of every kind.
        json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "outer", "extra": {"deep": [["a", ["b", {"c": "d"}]], 7]}},
            {"type": "text", "text": ["nested", ["list"]]},
            [1, -2, 3.5, 1e3, 18_446_744_073_709_551_615_u64, i64::MIN],
            true, false, null
        ]}]}),
        // Counted keys only at the top level; nested `max_tokens` is just text.
        json!({"messages": [{"role": "user", "content": "q", "max_tokens": 99999, "n": 5}],
               "metadata": {"messages": "not counted", "max_tokens": 5}}),
        // `data:` strings anywhere under a counted field are skipped; `Data:` is text.
        json!({"messages": [{"role": "user", "content": "data: not counted either"},
                            {"role": "user", "content": "Data: counted"},
                            {"role": "user", "content": "data:"},
                            {"role": "user", "content": "  data: counted (leading spaces)"}]}),
        json!({"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/jpeg;base64,/9j/4AAQSkZJRgABAQ=="},
            {"type": "input_text", "text": "what is this?"}]}], "max_output_tokens": 50}),
        // Every counted field at once, in all shapes.
        json!({"system": "You are terse.", "instructions": "Be brief.", "prompt": ["a", "bb"],
               "input": [[1, 2, 3], [4]], "tools": [{"type": "function", "function": {"name": "f"}}],
               "functions": [{"name": "g", "parameters": {"type": "object"}}],
               "messages": [{"role": "user", "content": "é🚀"}], "max_tokens": 7}),
        json!({"system": [{"type": "text", "text": "Anthropic-style system blocks",
                           "cache_control": {"type": "ephemeral"}}],
               "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1024}),
        // Counted fields holding scalars.
        json!({"messages": 5, "prompt": true, "input": null, "instructions": 2.5, "system": -1}),
        json!({"prompt": [], "input": {}, "tools": [], "functions": null}),
        // Escapes of all kinds and non-ASCII keys.
        json!({"messages": [{"role": "user", "content": "tab\there \"q\" \\ / \u{1}\u{1f} \u{7f} é 日本 🚀 👍🏽"}],
               "ключ": "значение", "max_tokens": 3}),
        // Long token-id prompt with big ids.
        json!({"prompt": [0, 1, 100_255, 4_294_967_295_u64, u64::MAX], "max_tokens": 1}),
        // Not an object: refused.
        json!([]),
        json!([{"messages": []}]),
        json!("messages"),
        json!(42),
        json!(null),
        json!(true),
        // Unusable counts: refused.
        json!({"messages": [], "max_tokens": -1}),
        json!({"messages": [], "max_tokens": 1.5}),
        json!({"messages": [], "max_tokens": 100.0}),
        json!({"messages": [], "max_tokens": "100"}),
        json!({"messages": [], "max_completion_tokens": true}),
        json!({"messages": [], "max_output_tokens": [100]}),
        json!({"messages": [], "max_output_tokens": {"value": 100}}),
        json!({"messages": [], "n": -2}),
        json!({"messages": [], "n": 2.5}),
        json!({"messages": [], "n": "2"}),
        json!({"messages": [], "max_tokens": 1e30}),
    ];
    let mut out: Vec<Vec<u8>> = bodies
        .iter()
        .map(|b| serde_json::to_vec(b).expect("serializing a Value cannot fail"))
        .collect();
    // Nested deeply (but within serde_json's limit of 128) under a counted field.
    let mut deep = json!("bottom");
    for _ in 0..100 {
        deep = json!([deep, 1]);
    }
    out.push(serde_json::to_vec(&json!({"messages": [deep], "max_tokens": 2})).unwrap());
    // Whitespace everywhere, written by hand as serde_json never produces it.
    out.push(
        b" \n{ \"max_tokens\" : 12 ,\r\n\t\"messages\" : [ { \"content\" : \"x\" } ] } \n".to_vec(),
    );
    // Escaped key names are matched after unescaping.
    out.push(
        br#"{"max\u005ftokens":40,"m\u0065ssages":[{"content":"\u00e9\ud83d\ude80"}]}"#.to_vec(),
    );
    // Integer forms serde_json reads as floats are not token ids; `-0` is a float.
    out.push(br#"{"prompt":[1,-0,0.0,1E2,100000000000000000000,-1],"max_tokens":-0}"#.to_vec());
    out.push(br#"{"prompt":[1,-0,1E2,100000000000000000000,-1]}"#.to_vec());
    // Malformed JSON: refused.
    out.push(b"".to_vec());
    out.push(b"{".to_vec());
    out.push(br#"{"messages":[}"#.to_vec());
    out.push(br#"{"messages":[]} trailing"#.to_vec());
    out.push(br#"{"messages":[],}"#.to_vec());
    out.push(br#"{"model":"gpt-4o" "messages":[]}"#.to_vec());
    out
}

/// A few dozen varied bodies: chat bodies of many sizes and styles, responses,
/// completions and embeddings bodies, and the edge cases.
pub fn corpus() -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    let sizes = [200, 1024, 3000, 10_000, 100 * 1024, 1024 * 1024];
    for (i, &size) in sizes.iter().enumerate() {
        for style in [Style::Compact, Style::Python, Style::Pretty] {
            bodies.push(chat_body_styled(size, 1000 + i as u64, style));
        }
    }
    for seed in 0..6 {
        let size = [300, 2000, 50_000][seed as usize % 3];
        bodies.push(responses_body(size, 2000 + seed));
        bodies.push(completions_body(size, 3000 + seed));
        bodies.push(embeddings_body(size, 4000 + seed));
    }
    bodies.extend(edge_cases());
    bodies
}
