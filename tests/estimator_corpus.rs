//! `OpenAiEstimator` against a straightforward `serde_json::Value` implementation of the
//! same rules, over the bench corpus and a few hundred generated bodies.

#![cfg(feature = "openai")]

#[path = "../benches/common/corpus.rs"]
mod corpus;
#[path = "../benches/common/reference.rs"]
mod reference;

use corpus::{Rng, Style};
use reference::reference_estimate;
use tower_tenant_tokens::OpenAiEstimator;

/// The first bytes of a body, for failure messages.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if text.len() <= 300 {
        text.into_owned()
    } else {
        let mut end = 300;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes)", &text[..end], body.len())
    }
}

/// Checks every body with the given settings; returns how many the crate refused.
fn check_all<'a>(
    bodies: impl IntoIterator<Item = (String, &'a [u8])>,
    default_output: u64,
    bytes_per_token: u64,
) -> usize {
    let estimator = OpenAiEstimator::new()
        .default_output_tokens(default_output)
        .bytes_per_token(bytes_per_token);
    let mut refused = 0;
    let mut mismatches = Vec::new();
    for (name, body) in bodies {
        let ours = estimator.estimate(body).ok();
        let theirs = reference_estimate(body, default_output, bytes_per_token);
        if ours.is_none() {
            refused += 1;
        }
        if ours != theirs {
            mismatches.push(format!(
                "{name}: crate {ours:?}, reference {theirs:?}\n  body: {}",
                excerpt(body)
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches (default_output_tokens {default_output}, bytes_per_token \
         {bytes_per_token}):\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    refused
}

fn named(bodies: &[Vec<u8>], what: &str) -> Vec<(String, Vec<u8>)> {
    bodies
        .iter()
        .enumerate()
        .map(|(i, b)| (format!("{what} #{i}"), b.clone()))
        .collect()
}

/// A few hundred bodies of every kind, sizes spread log-uniformly from ~50 B to ~300 KB.
fn generated() -> Vec<(String, Vec<u8>)> {
    let mut rng = Rng::new(0x5EED);
    let mut bodies = Vec::new();
    for i in 0..320u64 {
        let size = (50.0 * 6000f64.powf(rng.below(1000) as f64 / 1000.0)) as usize;
        let seed = rng.next_u64();
        let (kind, body) = match i % 8 {
            0 => ("responses", corpus::responses_body(size, seed)),
            1 => ("completions", corpus::completions_body(size, seed)),
            2 => ("embeddings", corpus::embeddings_body(size, seed)),
            _ => ("chat", corpus::chat_body(size, seed)),
        };
        bodies.push((format!("{kind}_body({size}, {seed:#x})"), body));
    }
    bodies
}

fn as_refs(bodies: &[(String, Vec<u8>)]) -> impl Iterator<Item = (String, &[u8])> {
    bodies.iter().map(|(n, b)| (n.clone(), b.as_slice()))
}

#[test]
fn corpus_matches_reference() {
    let bodies = named(&corpus::corpus(), "corpus");
    assert!(bodies.len() >= 36, "only {} corpus bodies", bodies.len());
    let refused = check_all(as_refs(&bodies), 1024, 4);
    // The edge cases include non-objects, bad counts and malformed JSON: make sure the
    // comparison saw refusals as well as estimates.
    assert!(refused >= 20, "only {refused} refusals in the corpus");
    assert!(
        refused < bodies.len() / 2,
        "{refused} refusals of {}",
        bodies.len()
    );
}

#[test]
fn generated_bodies_match_reference() {
    let bodies = generated();
    let refused = check_all(as_refs(&bodies), 1024, 4);
    assert_eq!(refused, 0, "generated bodies are all valid requests");
}

#[test]
fn non_default_settings_match_reference() {
    let mut bodies = named(&corpus::corpus(), "corpus");
    bodies.extend(generated().into_iter().step_by(4));
    for (default_output, bytes_per_token) in [
        (0, 1),
        (1, 3),
        (4096, 7),
        (100, 1_000_000),
        (u64::MAX, 4),
        // bytes_per_token(0) means 1 in both.
        (256, 0),
    ] {
        check_all(as_refs(&bodies), default_output, bytes_per_token);
    }
}

#[test]
fn known_estimates() {
    // Pin a few numbers by hand so the reference itself is checked against the rules.
    let estimator = OpenAiEstimator::new();
    let cases: [(&[u8], u64); 6] = [
        // "user" + "Hello there, model!" = 23 bytes -> 6, + 100.
        (
            br#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"Hello there, model!"}]}"#,
            106,
        ),
        // "é" is 2 bytes, "🚀" 4 (from a surrogate pair): 6 bytes -> 2, + default 1024.
        (br#"{"messages":["\u00e9\ud83d\ude80"]}"#, 1026),
        // Three integers, a float ignored, a data: URL ignored; 10 * n=3.
        (
            br#"{"prompt":[1,2,3,4.5,"data:xyz"],"max_tokens":10,"n":3}"#,
            33,
        ),
        // The largest limit wins; n=0 reserves for one choice.
        (
            br#"{"max_tokens":5,"max_completion_tokens":50,"max_output_tokens":7,"n":0}"#,
            50,
        ),
        // `null` limits are absent; escapes count as what they decode to ("a\"b\n" = 4).
        (br#"{"max_tokens":null,"input":"a\"b\n"}"#, 1025),
        // Saturation rather than overflow.
        (br#"{"max_tokens":18446744073709551615,"n":2,"prompt":"x"}"#, u64::MAX),
    ];
    for (body, expected) in cases {
        let name = String::from_utf8_lossy(body);
        assert_eq!(
            estimator.estimate(body).ok(),
            Some(expected),
            "crate on {name}"
        );
        assert_eq!(
            reference_estimate(body, 1024, 4),
            Some(expected),
            "reference on {name}"
        );
    }
}

#[test]
fn generator_is_deterministic_and_sized() {
    for (size, seed) in [(1024, 1), (100 * 1024, 2), (1024 * 1024, 3), (5000, 99)] {
        let body = corpus::chat_body(size, seed);
        assert_eq!(body, corpus::chat_body(size, seed));
        assert_ne!(body, corpus::chat_body(size, seed + 1));
        let ratio = body.len() as f64 / size as f64;
        assert!(
            (0.85..1.3).contains(&ratio),
            "chat_body({size}, {seed}) is {} bytes",
            body.len()
        );
        serde_json::from_slice::<serde_json::Value>(&body).expect("valid JSON");
    }
    for style in [Style::Compact, Style::Python, Style::Pretty] {
        let body = corpus::chat_body_styled(100 * 1024, 7, style);
        let ratio = body.len() as f64 / (100.0 * 1024.0);
        assert!(
            (0.85..1.3).contains(&ratio),
            "{style:?}: {} bytes",
            body.len()
        );
        let text = std::str::from_utf8(&body).unwrap();
        match style {
            Style::Python => {
                assert!(text.is_ascii() && text.contains("\\u") && text.contains("\", \""))
            }
            Style::Compact => assert!(!text.is_ascii() && !text.contains("\", \"")),
            Style::Pretty => assert!(text.contains("\n    ")),
        }
    }
    // The realistic pieces are there.
    let body = String::from_utf8(corpus::chat_body(1024 * 1024, 3)).unwrap();
    for needle in [
        "\"system\"",
        "\"assistant\"",
        "\"type\"",
        "data:image/png;base64,",
        "\"tools\"",
        "\\n",
        "\\\"",
    ] {
        assert!(body.contains(needle), "no {needle} in the 1 MB body");
    }
}

/// Where the crate and a `Value` parse part ways. None of these can come out of the
/// generator (serde_json writes neither duplicate keys nor invalid text); each is pinned
/// here with the side the documented rules favour, so that a change on either side shows.
#[test]
fn known_divergences_from_a_value_parse() {
    let mut deep = br#"{"max_tokens":5,"metadata":"#.to_vec();
    deep.extend(std::iter::repeat_n(b'[', 200));
    deep.extend(std::iter::repeat_n(b']', 200));
    deep.push(b'}');
    // What, body, the crate's estimate, the reference's.
    type Divergence<'a> = (&'a str, &'a [u8], Option<u64>, Option<u64>);
    // A null limit never lowers the reservation below the default, whatever the key order.
    let null_limits: [(&str, &[u8], u64); 2] = [
        (
            "max_tokens then max_tokens null",
            br#"{"max_tokens":50,"max_tokens":null}"#,
            1024,
        ),
        (
            "null then max_tokens",
            br#"{"max_tokens":null,"max_tokens":50}"#,
            1024,
        ),
    ];
    for (what, body, tokens) in null_limits {
        assert_eq!(
            OpenAiEstimator::new().estimate(body).ok(),
            Some(tokens),
            "{what}"
        );
    }
    let cases: [Divergence<'_>; 8] = [
        // The crate skips fields it does not read without recursion (on purpose, see
        // tests/estimators.rs); a `Value` parse hits serde_json's recursion limit.
        ("deep nesting in a skipped field", &deep, Some(5), None),
        // serde_json only range-checks numbers it parses; 1e999 is valid JSON grammar.
        (
            "out-of-range float in a skipped field",
            br#"{"temperature":1e999,"max_tokens":5}"#,
            Some(5),
            None,
        ),
        // Skipped strings are not checked for UTF-8, nor for unpaired surrogate escapes.
        // A body that is not UTF-8 is not JSON (RFC 8259 section 8.1), so the crate's
        // "not a JSON object is refused" rule says None here.
        (
            "invalid UTF-8 in a skipped field",
            b"{\"model\":\"\xff\xfe\",\"max_tokens\":5}",
            Some(5),
            None,
        ),
        (
            "unpaired surrogate escape in a skipped field",
            br#"{"model":"\ud800","max_tokens":5}"#,
            Some(5),
            None,
        ),
        // Duplicate keys: the crate counts every occurrence and keeps the largest limit;
        // serde_json's Map (like Python's and JavaScript's parsers) keeps the last one.
        (
            "duplicate messages",
            br#"{"messages":"abcdefgh","messages":"abcd","max_tokens":5}"#,
            Some(3 + 5),
            Some(1 + 5),
        ),
        (
            "duplicate max_tokens",
            br#"{"max_tokens":500,"max_tokens":5}"#,
            Some(500),
            Some(5),
        ),
        (
            "unusable max_tokens overridden by a later one",
            br#"{"max_tokens":"x","max_tokens":5}"#,
            None,
            Some(5),
        ),
        // An upstream that keeps the last key sees no limit at all: a null limit counts
        // as the default, and the largest of the occurrences wins.
        (
            "max_tokens then max_tokens null",
            br#"{"max_tokens":5000,"max_tokens":null}"#,
            Some(5000),
            Some(1024),
        ),
    ];
    let estimator = OpenAiEstimator::new();
    for (what, body, crate_says, value_says) in cases {
        assert_eq!(estimator.estimate(body).ok(), crate_says, "crate: {what}");
        assert_eq!(
            reference_estimate(body, 1024, 4),
            value_says,
            "reference: {what}"
        );
    }
}
