//! `OpenAiEstimator` against the `serde_json` walk it replaced (tests/common/serde_estimator.rs),
//! on generated JSON and on bytes broken from it.
//!
//! The estimator scans bodies with its own JSON scanner; before, it drove a
//! `serde_json::Deserializer` with visitors. Whatever the body, both must agree: the same
//! prompt tokens and output allowance, or both refuse it, in the same way (`invalid_json`
//! or `invalid_token_estimate`, and for the latter the same message).
//!
//! The same goes for the body's model (what per-model budgets are keyed by), against the
//! `serde_json` model finder the crate had before: the scanner's model-only pass must find
//! the same model in every body, and the estimating pass, asked for the model, the same
//! one in every body it estimates (with the same estimate as without it).
//!
//! The generator writes JSON itself, so that it can hold what a `Value` cannot (duplicate
//! keys, number literals as written, escapes written in every way, lone surrogates and
//! broken UTF-8 inside strings, whitespace anywhere) and aims at the places the two
//! parsers could part: the fields the estimate reads are checked fully, the others only
//! for grammar, and counted fields have a depth limit. Then the bodies are broken: bytes
//! flipped, cut, inserted and spliced.
//!
//! Case counts are set so the file runs in seconds in debug; `PROPTEST_CASES` sets them
//! all. Each property prints how many cases it ran and how they came out.

#![cfg(feature = "openai")]

#[path = "../benches/common/corpus.rs"]
mod corpus;
#[path = "common/serde_estimator.rs"]
mod serde_estimator;
#[path = "common/tally.rs"]
mod tally;

use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_estimator::Refusal;
use tally::{Raw, Tally};
use tower_tenant_tokens::{Error, OpenAiEstimator};

/// A proptest runner with `cases` cases (or `PROPTEST_CASES`), writing no failure files.
fn runner(cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    TestRunner::new(proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })
}

/// The estimator settings each body is checked with: the defaults, and one token a byte
/// (so that every byte of text counted shows).
const SETTINGS: [(u64, u64); 2] = [(1024, 4), (7, 1)];

/// Checks the crate against the serde_json walk on one body; returns how it came out.
fn agree(body: &[u8]) -> Result<&'static str, TestCaseError> {
    let mut outcome = "";
    for (default_output, bytes_per_token) in SETTINGS {
        let ours = OpenAiEstimator::new()
            .default_output_tokens(default_output)
            .bytes_per_token(bytes_per_token)
            .estimate_parts(body);
        let theirs = serde_estimator::estimate_parts(body, default_output, bytes_per_token);
        let settings =
            format!("default_output_tokens {default_output}, bytes_per_token {bytes_per_token}");
        outcome = match (&ours, &theirs) {
            (Ok(ours), Ok((prompt, output))) => {
                prop_assert_eq!(
                    (ours.prompt_tokens, ours.output_tokens),
                    (*prompt, *output),
                    "{}: {:?}",
                    settings,
                    Raw(body.to_vec())
                );
                "estimated"
            }
            (Err(error), Err(refusal)) => {
                let code = Error::from(error.clone()).code();
                match refusal {
                    Refusal::Malformed(_) => {
                        prop_assert_eq!(
                            code,
                            "invalid_json",
                            "ours: {}, serde_json: {:?}; {:?}",
                            error,
                            refusal,
                            Raw(body.to_vec())
                        );
                        "invalid_json"
                    }
                    Refusal::Invalid(reason) => {
                        prop_assert_eq!(
                            code,
                            "invalid_token_estimate",
                            "ours: {}, serde_json: {:?}; {:?}",
                            error,
                            refusal,
                            Raw(body.to_vec())
                        );
                        prop_assert_eq!(error.to_string(), reason.clone());
                        "invalid_token_estimate"
                    }
                }
            }
            _ => {
                return Err(TestCaseError::fail(format!(
                    "{settings}: crate {ours:?}, serde_json walk {theirs:?}; body {:?}",
                    Raw(body.to_vec())
                )))
            }
        };
    }
    Ok(outcome)
}

/// Checks the crate's model against the `serde_json` model finder on one body, both the
/// model-only pass and the estimating one; returns how it came out.
fn agree_on_model(body: &[u8]) -> Result<&'static str, TestCaseError> {
    let theirs = serde_estimator::json_model(body);
    let alone = OpenAiEstimator::__json_model(body);
    prop_assert_eq!(
        &alone,
        &theirs,
        "model-only pass; body {:?}",
        Raw(body.to_vec())
    );
    let estimator = OpenAiEstimator::new();
    let with_model = estimator.__estimate_parts_and_model(body);
    let without = estimator.estimate_parts(body);
    Ok(match (with_model, without) {
        (Ok((with_model, model)), Ok(without)) => {
            prop_assert_eq!(with_model, without, "body {:?}", Raw(body.to_vec()));
            prop_assert_eq!(
                &model,
                &theirs,
                "estimating pass; body {:?}",
                Raw(body.to_vec())
            );
            if model.is_some() {
                "model, estimated"
            } else {
                "no model, estimated"
            }
        }
        (Err(with_model), Err(without)) => {
            prop_assert_eq!(with_model, without, "body {:?}", Raw(body.to_vec()));
            if theirs.is_some() {
                "model, refused"
            } else {
                "no model, refused"
            }
        }
        (with_model, without) => {
            return Err(TestCaseError::fail(format!(
                "with the model {with_model:?}, without {without:?}; body {:?}",
                Raw(body.to_vec())
            )))
        }
    })
}

/// Runs `cases` cases of `strategy` through [`agree`] and [`agree_on_model`] and prints
/// the outcomes.
fn run<S: Strategy<Value = (&'static str, Raw)>>(name: &str, cases: u32, strategy: S) {
    let sources = Tally::default();
    let outcomes = Tally::default();
    let models = Tally::default();
    let started = std::time::Instant::now();
    let result = runner(cases).run(&strategy, |(source, body)| {
        sources.count(source);
        outcomes.count(agree(&body.0)?);
        models.count(agree_on_model(&body.0)?);
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    eprintln!(
        "estimator_differential::{name}: {:.1} s; sources: {}; outcomes: {}; models: {}",
        started.elapsed().as_secs_f64(),
        sources.show(),
        outcomes.show(),
        models.show()
    );
}

// ---------------------------------------------------------------------------------------
// Writing JSON
// ---------------------------------------------------------------------------------------

/// A piece of a string as written in the body.
#[derive(Debug, Clone)]
enum Piece {
    /// Text written raw (JSON's mandatory escapes applied).
    Raw(String),
    /// One character written as an escape: `\uXXXX` (a surrogate pair beyond the BMP),
    /// in lower or upper case hex, or its one-letter escape where it has one.
    Escaped(char, u8),
    /// A `\u` escape of a lone surrogate (refused where strings are read, not where they
    /// are skipped).
    LoneSurrogate(u16),
    /// Bytes written as they are: broken UTF-8 and raw control characters.
    Bytes(&'static [u8]),
}

/// A JSON value as the test writes it.
#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    /// A number literal exactly as it appears in the body.
    Num(String),
    Str(Vec<Piece>),
    Arr(Vec<J>),
    Obj(Vec<(Vec<Piece>, J)>),
    /// `depth` arrays or objects around a value, written without recursion.
    Deep(usize, bool, Box<J>),
}

/// Where whitespace goes: a tiny generator, so that a case is reproducible from its seed.
struct Spacing(u64);

impl Spacing {
    fn pad(&mut self, out: &mut Vec<u8>) {
        if self.0 == 0 {
            return;
        }
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if self.0 % 4 == 0 {
            out.extend_from_slice(
                [" ", "\n", "\t", "\r\n  ", "  "][(self.0 >> 8) as usize % 5].as_bytes(),
            );
        }
    }
}

fn write_pieces(pieces: &[Piece], out: &mut Vec<u8>) {
    out.push(b'"');
    for piece in pieces {
        match piece {
            Piece::Raw(text) => {
                let quoted = serde_json::to_string(text).unwrap();
                out.extend_from_slice(&quoted.as_bytes()[1..quoted.len() - 1]);
            }
            Piece::Escaped(c, style) => {
                let simple = match c {
                    '"' => Some("\\\""),
                    '\\' => Some("\\\\"),
                    '/' => Some("\\/"),
                    '\u{8}' => Some("\\b"),
                    '\u{c}' => Some("\\f"),
                    '\n' => Some("\\n"),
                    '\r' => Some("\\r"),
                    '\t' => Some("\\t"),
                    _ => None,
                };
                match (simple, style % 3) {
                    (Some(escape), 2) => out.extend_from_slice(escape.as_bytes()),
                    (_, style) => {
                        let mut units = [0u16; 2];
                        for unit in c.encode_utf16(&mut units) {
                            let hex = if style == 1 {
                                format!("\\u{unit:04X}")
                            } else {
                                format!("\\u{unit:04x}")
                            };
                            out.extend_from_slice(hex.as_bytes());
                        }
                    }
                }
            }
            Piece::LoneSurrogate(unit) => {
                out.extend_from_slice(format!("\\u{unit:04x}").as_bytes())
            }
            Piece::Bytes(bytes) => out.extend_from_slice(bytes),
        }
    }
    out.push(b'"');
}

impl J {
    fn write(&self, out: &mut Vec<u8>, spacing: &mut Spacing) {
        spacing.pad(out);
        match self {
            J::Null => out.extend_from_slice(b"null"),
            J::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            J::Num(literal) => out.extend_from_slice(literal.as_bytes()),
            J::Str(pieces) => write_pieces(pieces, out),
            J::Arr(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        spacing.pad(out);
                        out.push(b',');
                    }
                    item.write(out, spacing);
                }
                spacing.pad(out);
                out.push(b']');
            }
            J::Obj(pairs) => {
                out.push(b'{');
                for (i, (key, value)) in pairs.iter().enumerate() {
                    if i > 0 {
                        spacing.pad(out);
                        out.push(b',');
                    }
                    spacing.pad(out);
                    write_pieces(key, out);
                    spacing.pad(out);
                    out.push(b':');
                    value.write(out, spacing);
                }
                spacing.pad(out);
                out.push(b'}');
            }
            J::Deep(depth, objects, inner) => {
                let (open, close): (&[u8], &[u8]) = if *objects {
                    (b"{\"k\":", b"}")
                } else {
                    (b"[", b"]")
                };
                for _ in 0..*depth {
                    out.extend_from_slice(open);
                }
                inner.write(out, spacing);
                for _ in 0..*depth {
                    out.extend_from_slice(close);
                }
            }
        }
        spacing.pad(out);
    }

    fn to_bytes(&self, spacing: u64) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out, &mut Spacing(spacing));
        out
    }
}

// ---------------------------------------------------------------------------------------
// Generating JSON
// ---------------------------------------------------------------------------------------

const TEXT_KEYS: [&str; 7] = [
    "messages",
    "prompt",
    "input",
    "instructions",
    "system",
    "tools",
    "functions",
];
const COUNT_KEYS: [&str; 4] = [
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
];

/// Byte sequences that are not valid UTF-8 (or not allowed raw in a JSON string).
const BROKEN: [&[u8]; 14] = [
    b"\xff",
    b"\x80",
    b"\xbf",
    b"\xc3",
    b"\xc0\x80",
    b"\xc1\xbf",
    b"\xe2\x82",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xf0\x8f\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\x00",
    b"\x1f",
];

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        6 => "[a-zA-Z0-9 ,.!?:/]{0,40}".prop_map(Piece::Raw),
        3 => "\\PC{0,24}".prop_map(Piece::Raw),
        1 => "[\"\\\\/\\x00-\\x1f\\x7f]{1,4}".prop_map(Piece::Raw),
        1 => Just(Piece::Raw("data:".to_owned())),
        3 => (any::<char>(), any::<u8>()).prop_map(|(c, style)| Piece::Escaped(c, style)),
        2 => (select(vec!['"', '\\', '/', '\u{8}', '\u{c}', '\n', '\r', '\t', 'd', 'a', ':', 'é', '€', '🚀']), any::<u8>())
            .prop_map(|(c, style)| Piece::Escaped(c, style)),
        1 => prop_oneof![0xD800u16..=0xDBFF, 0xDC00u16..=0xDFFF].prop_map(Piece::LoneSurrogate),
        1 => select(BROKEN.to_vec()).prop_map(Piece::Bytes),
    ]
}

/// A string: mostly clean text, sometimes with what only skipped strings may hold.
fn string() -> impl Strategy<Value = Vec<Piece>> {
    prop_oneof![
        3 => "[a-zA-Z0-9 ,.!?]{0,60}".prop_map(|s| vec![Piece::Raw(s)]),
        1 => "data:[a-z/;,+=0-9]{0,30}".prop_map(|s| vec![Piece::Raw(s)]),
        // `data:` (or nearly) with a letter escaped: what counts is the decoded string.
        1 => (select(vec!["data:", "data", "dat:", "Data:"]), any::<Index>(), any::<u8>(), "[a-z:]{0,8}")
            .prop_map(|(prefix, at, style, rest)| {
                let at = at.index(prefix.len());
                vec![
                    Piece::Raw(prefix[..at].to_owned()),
                    Piece::Escaped(prefix[at..].chars().next().unwrap(), style),
                    Piece::Raw(format!("{}{rest}", &prefix[at + 1..])),
                ]
            }),
        4 => prop::collection::vec(piece(), 0..8),
    ]
}

fn plain(key: &str) -> Vec<Piece> {
    vec![Piece::Raw(key.to_owned())]
}

/// A key: the ones the estimator reads (sometimes spelled with escapes), others, and
/// anything.
fn key() -> impl Strategy<Value = Vec<Piece>> {
    let known: Vec<&str> = TEXT_KEYS
        .iter()
        .chain(&COUNT_KEYS)
        .chain(&["model", "role", "content", "metadata"])
        .copied()
        .collect();
    prop_oneof![
        6 => select(known.clone()).prop_map(plain),
        // Escaped spellings decode to the same key.
        1 => (select(known), any::<Index>(), any::<u8>()).prop_map(|(key, at, style)| {
            let at = at.index(key.len());
            let c = key[at..].chars().next().unwrap();
            vec![
                Piece::Raw(key[..at].to_owned()),
                Piece::Escaped(c, style % 2),
                Piece::Raw(key[at + 1..].to_owned()),
            ]
        }),
        1 => "[a-z_]{0,10}".prop_map(|s| vec![Piece::Raw(s)]),
        1 => string(),
    ]
}

fn number_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u64..=3000).prop_map(|n| n.to_string()),
        2 => any::<u64>().prop_map(|n| n.to_string()),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| format!("{f:?}")),
        1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| format!("{f:e}")),
        // Integers of every length around the 64-bit and f64 limits.
        1 => ("[1-9]", 0usize..=40).prop_map(|(first, zeros)| format!("{first}{}", "9".repeat(zeros))),
        1 => (1usize..=400, any::<bool>()).prop_map(|(digits, negative)| {
            format!("{}{}", if negative { "-" } else { "" }, "7".repeat(digits))
        }),
        1 => ("-?(0|[1-9][0-9]{0,3})", "(\\.[0-9]{1,25})?", "[eE][+-]?[0-9]{1,12}")
            .prop_map(|(int, frac, exp)| format!("{int}{frac}{exp}")),
        2 => select(vec![
            "-0", "0", "-0.0", "0.0", "0e0", "0E-0", "1e3", "1E+2", "12.5", "100.0", "-1",
            "18446744073709551615", "18446744073709551616", "-9223372036854775808",
            "-9223372036854775809", "9223372036854775808", "1e308", "1.7976931348623157e308",
            "1.8e308", "1e309", "1e999", "-1e999", "5e-324", "1e-400", "0e99999999999",
            "1e2147483647", "1e2147483648", "1e-2147483649", "0.000001e300",
            "123456789012345678901234567890", "1234567890123456789.5e290",
        ])
        .prop_map(str::to_owned),
    ]
}

fn value() -> impl Strategy<Value = J> {
    let leaf = prop_oneof![
        1 => Just(J::Null),
        1 => any::<bool>().prop_map(J::Bool),
        3 => number_literal().prop_map(J::Num),
        5 => string().prop_map(J::Str),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(J::Arr),
            prop::collection::vec((key(), inner), 0..6).prop_map(J::Obj),
        ]
    })
}

/// What a count field may hold: mostly counts, any JSON too.
fn count_value() -> impl Strategy<Value = J> {
    prop_oneof![
        3 => (0u64..=5000).prop_map(|n| J::Num(n.to_string())),
        3 => number_literal().prop_map(J::Num),
        1 => Just(J::Null),
        2 => value(),
    ]
}

/// Nesting around the depth limit of counted fields (and far past it in skipped ones).
fn deep_value() -> impl Strategy<Value = J> {
    (
        prop_oneof![120usize..=130, 0usize..=300],
        any::<bool>(),
        value(),
    )
        .prop_map(|(depth, objects, inner)| J::Deep(depth, objects, Box::new(inner)))
}

/// What a `"model"` may hold: mostly a name, often a string with what only skipped
/// strings may hold (a model must not), sometimes any JSON (numbers out of range, nesting
/// near the depth limit).
fn model_value() -> impl Strategy<Value = J> {
    prop_oneof![
        4 => "[a-z0-9.:/-]{0,30}".prop_map(|name| J::Str(plain(&name))),
        4 => string().prop_map(J::Str),
        1 => number_literal().prop_map(J::Num),
        2 => value(),
        1 => deep_value(),
    ]
}

/// A `model` key, sometimes spelled with an escape.
fn model_key() -> impl Strategy<Value = Vec<Piece>> {
    prop_oneof![
        4 => Just(plain("model")),
        1 => (0usize..5, any::<u8>()).prop_map(|(at, style)| {
            let key = "model";
            vec![
                Piece::Raw(key[..at].to_owned()),
                Piece::Escaped(key[at..].chars().next().unwrap(), style % 2),
                Piece::Raw(key[at + 1..].to_owned()),
            ]
        }),
    ]
}

/// A top-level object with the keys the estimator reads (any number of times), models
/// (any number of times) and others; now and then something else.
fn request() -> impl Strategy<Value = J> {
    let field = prop_oneof![
        3 => (select(TEXT_KEYS.to_vec()).prop_map(plain), value()),
        3 => (select(COUNT_KEYS.to_vec()).prop_map(plain), count_value()),
        2 => (model_key(), model_value()),
        2 => (key(), value()),
        1 => (key(), count_value()),
        1 => (
            select(TEXT_KEYS.iter().chain(&COUNT_KEYS).chain(&["metadata"]).copied().collect::<Vec<_>>())
                .prop_map(plain),
            deep_value(),
        ),
    ];
    prop_oneof![
        14 => prop::collection::vec(field, 0..8).prop_map(J::Obj),
        1 => value(),
    ]
}

/// A generated body, written with or without whitespace.
fn written() -> impl Strategy<Value = Vec<u8>> {
    (request(), prop_oneof![2 => Just(0u64), 1 => 1u64..])
        .prop_map(|(json, spacing)| json.to_bytes(spacing))
}

// ---------------------------------------------------------------------------------------
// Breaking JSON
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, &'static [u8]),
    Delete(Index, u8),
    Truncate(Index),
    Duplicate(Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let byte = prop_oneof![
        1 => any::<u8>(),
        2 => select(b"{}[]\":,-.eE0159 \n\\/ubnrtflsa\x00\x1f\x7f\x80\xbf\xc2\xe2\xed\xf0\xf4\xff".to_vec()),
    ];
    let snippet: Vec<&'static [u8]> = vec![
        b"\\",
        b"\\u",
        b"\\u00",
        b"\\ud800",
        b"\\udc00",
        b"\\ud83d\\ude80",
        b"\\ud83d",
        b"\\x",
        b"\xed\xa0\x80",
        b"\xf0\x9f\x9a\x80",
        b"\xc3",
        b"\xc3\xa9",
        b"\"",
        b"1e999",
        b"-0",
        b"0.",
        b"null",
        b"tru",
        b"\"max_tokens\":",
        b"\"messages\":[",
        b"\"model\":",
        b"\"data:",
        b",",
        b",]",
        b",}",
        b"[[[[[[[[",
        b"]]]]",
        b"{\"a\":",
        b"}}}",
        b" ",
    ];
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip(at, bit)),
        3 => (any::<Index>(), byte.clone()).prop_map(|(at, b)| Mutation::Set(at, b)),
        3 => (any::<Index>(), select(snippet)).prop_map(|(at, s)| Mutation::Insert(at, s)),
        2 => (any::<Index>(), 1u8..4).prop_map(|(at, n)| Mutation::Delete(at, n)),
        2 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), 1u8..32).prop_map(|(at, n)| Mutation::Duplicate(at, n)),
    ]
}

fn mutate(body: &mut Vec<u8>, mutation: &Mutation) {
    let len = body.len();
    match *mutation {
        Mutation::Flip(at, bit) if len > 0 => body[at.index(len)] ^= 1 << bit,
        Mutation::Set(at, byte) if len > 0 => body[at.index(len)] = byte,
        Mutation::Insert(at, bytes) => {
            let at = at.index(len + 1);
            body.splice(at..at, bytes.iter().copied());
        }
        Mutation::Delete(at, n) if len > 0 => {
            let at = at.index(len);
            body.drain(at..(at + usize::from(n)).min(len));
        }
        Mutation::Truncate(at) => body.truncate(at.index(len + 1)),
        Mutation::Duplicate(at, n) if len > 0 => {
            let at = at.index(len);
            let copy = body[at..(at + usize::from(n)).min(len)].to_vec();
            body.splice(at..at, copy);
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------

#[test]
fn generated_json_agrees_with_the_serde_json_walk() {
    run(
        "generated_json_agrees_with_the_serde_json_walk",
        5000,
        written().prop_map(|body| ("generated", Raw(body))),
    );
}

#[test]
fn broken_json_agrees_with_the_serde_json_walk() {
    let broken =
        (written(), prop::collection::vec(mutation(), 1..=3)).prop_map(|(mut body, mutations)| {
            for mutation in &mutations {
                mutate(&mut body, mutation);
            }
            ("mutated", Raw(body))
        });
    let garbage = prop::collection::vec(
        prop_oneof![
            3 => select(b"{}[]\":,-.e0123456789 \\unlltruefalse".to_vec()),
            1 => any::<u8>(),
        ],
        0..64,
    )
    .prop_map(|body| ("garbage", Raw(body)));
    let prefixed = (
        select(vec![
            &b"{\"messages\":"[..],
            b"{\"max_tokens\":",
            b"{\"metadata\":",
            b"{\"n\":1,\"input\":[\"",
            b"{\"model\":",
            b"{\"model\":\"m\"",
            b"{\"model\":\"m\"}",
        ]),
        garbage.clone(),
    )
        .prop_map(|(prefix, (_, rest))| ("field then garbage", Raw([prefix, &rest.0].concat())));
    run(
        "broken_json_agrees_with_the_serde_json_walk",
        6000,
        prop_oneof![6 => broken, 1 => garbage, 2 => prefixed],
    );
}

/// Long strings, with escapes and multi-byte characters at every offset of the scanner's
/// 16-byte steps, the closing quote anywhere near the end of the body, and strings cut
/// short.
#[test]
fn long_strings_agree_with_the_serde_json_walk() {
    let long = (
        select(vec!["messages", "model", "max_tokens"]),
        prop::collection::vec(
            prop_oneof![4 => "[a-z ]{1,20}".prop_map(Piece::Raw), 1 => piece()],
            0..24,
        ),
        0usize..40,
        any::<Index>(),
        any::<bool>(),
    )
        .prop_map(|(key, pieces, pad, cut, whole)| {
            let mut body = format!("{{\"{key}\":").into_bytes();
            write_pieces(&pieces, &mut body);
            body.push(b'}');
            body.resize(body.len() + pad, b' ');
            if !whole {
                body.truncate(cut.index(body.len() + 1));
            }
            ("long string", Raw(body))
        });
    run("long_strings_agree_with_the_serde_json_walk", 3000, long);
}

/// Realistic bodies from the bench corpus (chat, responses, completions, embeddings; raw
/// UTF-8, Python's `\u` escapes, pretty-printed), whole and broken.
#[test]
fn corpus_bodies_agree_with_the_serde_json_walk() {
    let realistic =
        (0u8..4, 40usize..3000, any::<u64>()).prop_map(|(kind, size, seed)| match kind {
            0 => corpus::responses_body(size, seed),
            1 => corpus::completions_body(size, seed),
            2 => corpus::embeddings_body(size, seed),
            _ => corpus::chat_body(size, seed),
        });
    let strategy =
        (realistic, prop::collection::vec(mutation(), 0..=2)).prop_map(|(mut body, mutations)| {
            for mutation in &mutations {
                mutate(&mut body, mutation);
            }
            (
                if mutations.is_empty() {
                    "corpus"
                } else {
                    "corpus, mutated"
                },
                Raw(body),
            )
        });
    run(
        "corpus_bodies_agree_with_the_serde_json_walk",
        3000,
        strategy,
    );
}

/// Bodies the generator would rarely hit, pinned.
#[test]
fn edge_cases_agree_with_the_serde_json_walk() {
    let mut bodies: Vec<Vec<u8>> = [
        &b""[..],
        b" ",
        b"{}",
        b" {} ",
        b"{} x",
        b"{}}",
        b"{,}",
        b"{\"a\":1,}",
        b"[]",
        b"null",
        b"{\"max_tokens\":[garbage",
        b"{\"max_tokens\":{",
        b"{\"max_tokens\":\"\\ud800\"}",
        b"{\"max_tokens\":\"x\"",
        b"{\"max_tokens\":1.5x",
        b"{\"max_tokens\":1.",
        b"{\"max_tokens\":-",
        b"{\"max_tokens\":01}",
        b"{\"max_tokens\":1e999}",
        b"{\"max_tokens\":0e999999}",
        b"{\"max_tokens\":tru}",
        b"{\"max_tokens\":truex",
        b"{\"max_tokens\":nul",
        b"{\"max_tokens\":null",
        b"{\"max_tokens\":5",
        b"{\"max_tokens\":5,\"max_tokens\":-0}",
        b"{\"n\":-9223372036854775808}",
        b"{\"n\":9223372036854775808}",
        b"{\"messages\":[1e999]}",
        b"{\"model\":1e999}",
        b"{\"model\":\"\\ud800\",\"max_tokens\":5}",
        b"{\"model\":\"\xff\",\"max_tokens\":5}",
        b"{\"messages\":\"\xff\"}",
        b"{\"messages\":\"\\ud800\\u0041\"}",
        b"{\"messages\":\"\\ud800\\\\\"}",
        b"{\"messages\":\"\\ud83d\\ude80\"}",
        b"{\"messages\":\"\\u00\"}",
        b"{\"messages\":\"\\u00e\"}",
        b"{\"messages\":\"\\",
        b"{\"messages\":\"\\u",
        b"{\"messages\":\"\\ud83d\\",
        b"{\"messages\":\"\\ud83d\\u",
        b"{\"messages\":\"\\ud83d\\ude8",
        b"{\"messages\":\"\t\"}",
        b"{\"model\":\"\t\"}",
        b"{\"messages\":\"\x7f\"}",
        b"{\"messages\":\"d\\u0061ta:x\"}",
        b"{\"messages\":\"\\u0064ata:\"}",
        b"{\"messages\":\"data\\u003a\"}",
        b"{\"messages\":\"dat\"}",
        b"{\"messages\":{\"\xff\":1}}",
        b"{\"metadata\":{\"\xff\":1}}",
        b"{\"\xff\":1}",
        b"{\"\\ud800\":1}",
        b"{\"max\\u005ftokens\":7}",
        b"{\"max\\u005Ftokens\":[]}",
        b"{\"\\u006e\":3,\"max_tokens\":2}",
        b"{\"messages\":[1,-1,-0,1.0,18446744073709551616,-9223372036854775809]}",
        b"{\"messages\":[,1]}",
        b"{\"messages\":[1,]}",
        b"{\"messages\":[1 2]}",
        b"{\"messages\":{\"a\" 1}}",
        b"{\"messages\":{\"a\":}}",
        b"{\"messages\":{1:2}}",
        b"{\"metadata\":[1,]}",
        b"{\"metadata\":{\"a\":1,}}",
        b"{\"metadata\":{,}}",
        b"{\"metadata\":[}",
        b"{\"metadata\":{]}",
        b"{\"max_tokens\":5 \"n\":2}",
        b"{\"max_tokens\" 5}",
        b"\xef\xbb\xbf{}",
        // Models: the first string wins, other values are passed over, a value read in
        // full (unlike a skipped one) can spoil the body's model, and nothing after the
        // object is looked at.
        b"{\"model\":\"m\",\"model\":\"n\"}",
        b"{\"model\":42,\"model\":\"n\"}",
        b"{\"model\":null,\"model\":{\"a\":[1]},\"model\":\"n\"}",
        b"{\"model\":{\"model\":\"m\"}}",
        b"{\"a\":{\"model\":\"m\"}}",
        b"{\"mod\\u0065l\":\"m\\u00e9\\ud83d\\ude80\\n\"}",
        b"{\"model\":\"\"}",
        b"{\"model\":1e999,\"model\":\"n\"}",
        b"{\"model\":[\"\\ud800\"],\"model\":\"n\"}",
        b"{\"model\":{\"\xff\":1},\"model\":\"n\"}",
        b"{\"model\":\"m\",\"model\":\"\\ud800\",\"model\":1e999}",
        b"{\"a\":\"\\ud800\",\"b\":1e999,\"model\":\"m\"}",
        b"{\"model\":\"m\",\"a\":}",
        b"{\"model\":\"m\"} trailing",
        b"{\"model\":\"m\"}}",
        b"{\"model\":\"m\"",
        b"[\"model\",\"m\"]",
    ]
    .iter()
    .map(|b| b.to_vec())
    .collect();
    // Around the depth limit of counted fields, and far past it in skipped ones.
    for depth in [125, 126, 127, 128, 129, 1000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}"), ("[{\"a\":", "}]")] {
            for key in ["messages", "metadata", "max_tokens", "model"] {
                let body = format!(
                    "{{\"{key}\":{}1{}}}",
                    open.repeat(depth),
                    close.repeat(depth)
                );
                bodies.push(body.into_bytes());
            }
        }
    }
    // A model, then another after nesting around the depth limit.
    for depth in [125, 126, 127, 1000] {
        bodies.push(
            format!(
                "{{\"model\":{}\"m\"{},\"model\":\"n\"}}",
                "[".repeat(depth),
                "]".repeat(depth)
            )
            .into_bytes(),
        );
    }
    let mut failures = Vec::new();
    for body in &bodies {
        if let Err(error) = agree(body).and_then(|_| agree_on_model(body)) {
            failures.push(error.to_string());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
