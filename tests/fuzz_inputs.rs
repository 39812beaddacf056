//! Arbitrary inputs through the tower service, driven by proptest.
//!
//! Every request goes through `TenantTokenLayer` around a `tower::service_fn` that counts
//! its calls and records the body it received, on a current-thread tokio runtime. For each
//! input the test works out independently what the documented rules (README, "Refusals")
//! call for, and checks that the layer answers exactly that: 200 having reached the inner
//! service once with the request's exact body, or a JSON refusal with the documented
//! status and `error.code` that never reached it. After every case nothing is reserved.
//!
//! Case counts are bounded so the file runs in seconds in debug; `PROPTEST_CASES` sets
//! them all. Failures are not persisted to files: the panic message carries the minimal
//! input. Each property prints how many cases it ran.

mod common;
#[path = "common/tally.rs"]
mod tally;

use std::cell::Cell;
use std::convert::Infallible;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::runner;
use http::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tally::{Raw, Tally};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt};
use tower_tenant_tokens::body::{RequestBody, ResponseBody};
use tower_tenant_tokens::{TenantTokenLayer, TenantTokenTracker};

// ---------------------------------------------------------------------------------------
// Shared plumbing
// ---------------------------------------------------------------------------------------

/// The inner service's view: how often it was called and the request bodies it got.
#[derive(Clone, Default)]
struct Inner {
    calls: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

impl Inner {
    /// A `service_fn` that reads the whole request body and answers `ok`.
    fn service<B>(
        &self,
    ) -> impl Service<Request<RequestBody<B>>, Response = Response<Full<Bytes>>, Error = Infallible>
           + Clone
    where
        B: http_body::Body<Data = Bytes> + 'static,
        B::Error: fmt::Debug,
    {
        let inner = self.clone();
        tower::service_fn(move |request: Request<RequestBody<B>>| {
            let inner = inner.clone();
            async move {
                inner.calls.fetch_add(1, Ordering::SeqCst);
                let body = request.into_body().collect().await.expect("request body");
                inner.bodies.lock().unwrap().push(body.to_bytes());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn take_bodies(&self) -> Vec<Bytes> {
        std::mem::take(&mut *self.bodies.lock().unwrap())
    }
}

/// A response read to its end, with what the tenant had in flight before its body was read
/// (the reservation of an admitted request is held by the body).
struct Outcome {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    in_flight_while_open: u64,
}

fn call<S, B>(
    runtime: &Runtime,
    service: &S,
    request: Request<B>,
    tracker: &TenantTokenTracker,
    tenant: &str,
) -> Outcome
where
    S: Service<Request<B>, Response = Response<ResponseBody<Full<Bytes>>>, Error = Infallible>
        + Clone,
{
    let response = runtime
        .block_on(service.clone().oneshot(request))
        .unwrap_or_else(|e| match e {});
    let in_flight_while_open = tracker.in_flight(tenant);
    let (parts, body) = response.into_parts();
    let body = runtime
        .block_on(body.collect())
        .unwrap_or_else(|e| match e {})
        .to_bytes();
    Outcome {
        status: parts.status,
        headers: parts.headers,
        body,
        in_flight_while_open,
    }
}

/// The codes the README documents.
const CODES: [&str; 9] = [
    "missing_tenant",
    "invalid_tenant",
    "missing_token_estimate",
    "invalid_token_estimate",
    "invalid_json",
    "body_read_error",
    "body_too_large",
    "request_too_large",
    "rate_limit_exceeded",
];

/// Checks the OpenAI-shaped JSON of a refusal and returns its `error.code`.
fn refusal_code(outcome: &Outcome) -> Result<String, TestCaseError> {
    let text = String::from_utf8_lossy(&outcome.body);
    prop_assert_eq!(
        outcome.headers.get(CONTENT_TYPE),
        Some(&HeaderValue::from_static("application/json")),
        "refusal without a JSON content type: {}",
        text
    );
    let json: serde_json::Value = serde_json::from_slice(&outcome.body)
        .map_err(|e| TestCaseError::fail(format!("refusal body is not JSON ({e}): {text}")))?;
    let error = &json["error"];
    prop_assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message: {}",
        text
    );
    prop_assert!(error["type"].is_string(), "no type: {}", text);
    prop_assert!(error["param"].is_null(), "param is not null: {}", text);
    let code = error["code"]
        .as_str()
        .ok_or_else(|| TestCaseError::fail(format!("no error.code: {text}")))?;
    prop_assert!(CODES.contains(&code), "undocumented code {}", code);
    Ok(code.to_owned())
}

/// Every tenant of `tracker` is at 0 with no live reservation.
fn assert_nothing_reserved(tracker: &TenantTokenTracker) -> Result<(), TestCaseError> {
    for (id, state) in tracker.snapshot() {
        prop_assert_eq!(state.in_flight, 0, "{:?} still holds tokens", id);
        prop_assert_eq!(state.reservations, 0, "{:?} still has reservations", id);
    }
    Ok(())
}

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

// ---------------------------------------------------------------------------------------
// Tenant and estimate headers
// ---------------------------------------------------------------------------------------

/// The caps of the trackers the header cases run against.
const HEADER_CAPS: [u64; 4] = [0, 1, 1000, u64::MAX];

/// A byte a header value may carry: visible ASCII, blanks, and `obs-text` (0x80-0xFF).
fn header_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        12 => 0x21u8..=0x7E,
        2 => Just(b' '),
        1 => Just(b'\t'),
        3 => 0x80u8..=0xFF,
    ]
}

/// Header-ish bytes, now and then with a control byte or DEL somewhere (which
/// `HeaderValue` refuses: such inputs are skipped).
fn header_bytes(len: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<u8>> {
    let control = prop_oneof![0x00u8..=0x1F, Just(0x7Fu8)];
    (
        prop::collection::vec(header_byte(), len),
        prop::option::weighted(0.1, (any::<prop::sample::Index>(), control)),
    )
        .prop_map(|(mut bytes, control)| {
            if let Some((at, byte)) = control {
                let at = at.index(bytes.len() + 1);
                bytes.insert(at, byte);
            }
            bytes
        })
}

fn visible(len: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0x21u8..=0x7E, len)
}

fn tenant_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        10 => visible(1..=32),
        2 => visible(250..=260),
        1 => Just(Vec::new()),
        3 => header_bytes(0..=300),
        // Long values, up to 10 KB, some with a space or a high byte inside.
        2 => (visible(257..=10_240), any::<prop::sample::Index>(), prop::sample::select(vec![b'!', b' ', 0x80, 0xFF]))
            .prop_map(|(mut bytes, at, byte)| {
                let at = at.index(bytes.len());
                bytes[at] = byte;
                bytes
            }),
        // A valid id with leading or trailing blanks.
        1 => (visible(1..=20), prop::sample::select(vec![" ", "\t", "  "]), any::<bool>())
            .prop_map(|(id, blank, front)| {
                let blank = blank.as_bytes();
                if front { [blank, &id].concat() } else { [&id, blank].concat() }
            }),
    ]
}

/// An estimate header: bytes, or a number placed near what is left of the cap.
#[derive(Debug, Clone)]
enum EstimateInput {
    Bytes(Raw),
    /// `cap - held + delta`, in decimal, optionally zero-padded.
    Remaining {
        delta: i8,
        zeros: usize,
    },
    /// `cap + delta`.
    NearCap(i8),
}

fn estimate_bytes() -> impl Strategy<Value = Vec<u8>> {
    let decorated = (
        prop::sample::select(vec!["", "", "+", "-", " ", "\t", "0x", "٣", "５", "−"]),
        "[0-9]{1,6}",
        prop::sample::select(vec![
            "", "", " ", "\t", "e3", "E+2", ".0", ".", "_000", ",5", "k", "٣", "¹", "\u{0}",
        ]),
    )
        .prop_map(|(prefix, digits, suffix)| format!("{prefix}{digits}{suffix}").into_bytes());
    prop_oneof![
        4 => "[0-9]{1,25}".prop_map(String::into_bytes),
        3 => (0u64..=2100).prop_map(|n| n.to_string().into_bytes()),
        2 => any::<u64>().prop_map(|n| n.to_string().into_bytes()),
        2 => prop::sample::select(vec![
            "0",
            "18446744073709551615",
            "018446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
            "184467440737095516150",
            "0000000000000000000000000000000000000001",
            "1e9",
            "1.5",
            "-0",
            "+1",
            "NaN",
            "Infinity",
            "0x10",
            "",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        4 => decorated,
        1 => "\\PC{0,12}".prop_map(String::into_bytes),
        2 => header_bytes(0..=40),
    ]
}

fn estimate_input() -> impl Strategy<Value = EstimateInput> {
    prop_oneof![
        6 => estimate_bytes().prop_map(|bytes| EstimateInput::Bytes(Raw(bytes))),
        2 => ((-3i8..=3), prop_oneof![3 => Just(0usize), 1 => 1usize..=30])
            .prop_map(|(delta, zeros)| EstimateInput::Remaining { delta, zeros }),
        1 => (-3i8..=3).prop_map(EstimateInput::NearCap),
    ]
}

impl EstimateInput {
    fn bytes(&self, cap: u64, held: u64) -> Vec<u8> {
        let number = |n: i128, zeros: usize| {
            if n < 0 {
                n.to_string().into_bytes() // "-1": invalid, as it should be
            } else {
                format!("{}{n}", "0".repeat(zeros)).into_bytes()
            }
        };
        match self {
            EstimateInput::Bytes(raw) => raw.0.clone(),
            EstimateInput::Remaining { delta, zeros } => number(
                i128::from(cap) - i128::from(held) + i128::from(*delta),
                *zeros,
            ),
            EstimateInput::NearCap(delta) => number(i128::from(cap) + i128::from(*delta), 0),
        }
    }
}

#[derive(Debug, Clone)]
struct HeaderCase {
    tenant: Option<Raw>,
    /// A second `x-tenant-id` header.
    second_tenant: Option<Raw>,
    estimate: Option<EstimateInput>,
    cap: usize,
    /// Tokens the tenant already holds, as a fraction of the cap (in 1/16ths).
    held_sixteenths: u8,
}

fn header_case() -> impl Strategy<Value = HeaderCase> {
    (
        prop::option::weighted(0.95, tenant_bytes().prop_map(Raw)),
        prop::option::weighted(0.05, tenant_bytes().prop_map(Raw)),
        prop::option::weighted(0.95, estimate_input()),
        prop_oneof![1 => Just(0usize), 1 => Just(1usize), 4 => Just(2usize), 2 => Just(3usize)],
        prop_oneof![2 => Just(0u8), 3 => 0u8..=16],
    )
        .prop_map(
            |(tenant, second_tenant, estimate, cap, held_sixteenths)| HeaderCase {
                tenant,
                second_tenant,
                estimate,
                cap,
                held_sixteenths,
            },
        )
}

/// A tenant id as documented: 1 to 256 bytes, all visible ASCII (`!` to `~`).
fn valid_tenant(bytes: &[u8]) -> bool {
    (1..=256).contains(&bytes.len()) && bytes.iter().all(|b| (0x21..=0x7E).contains(b))
}

/// An estimate as documented: ASCII decimal digits only, fitting 64 bits.
fn valid_estimate(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let significant = match bytes.iter().position(|&b| b != b'0') {
        Some(first) => &bytes[first..],
        None => return Some(0),
    };
    if significant.len() > 20 {
        return None;
    }
    let value = significant
        .iter()
        .fold(0u128, |n, &d| n * 10 + u128::from(d - b'0'));
    u64::try_from(value).ok()
}

/// What the README says the layer answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Admit(u64),
    Refuse(StatusCode, &'static str),
}

#[test]
fn arbitrary_tenant_and_estimate_headers_get_the_documented_answer() {
    let runtime = current_thread();
    let inner = Inner::default();
    let services: Vec<_> = HEADER_CAPS
        .iter()
        .map(|&cap| {
            let tracker = Arc::new(
                TenantTokenTracker::builder(cap)
                    .max_idle_tenants(64)
                    .build(),
            );
            let service =
                TenantTokenLayer::new(tracker.clone()).layer(inner.service::<Full<Bytes>>());
            (tracker, service)
        })
        .collect();
    let ran = Cell::new(0usize);
    let skipped = Cell::new(0usize);
    let tally = Tally::default();

    let result = runner(2000).run(&header_case(), |case| {
        ran.set(ran.get() + 1);
        let cap = HEADER_CAPS[case.cap];
        let (tracker, service) = &services[case.cap];
        // The tenant headers sent: none, one, or two (which is invalid).
        let sent: Vec<&[u8]> = [&case.tenant, &case.second_tenant]
            .into_iter()
            .flatten()
            .map(|raw| &raw.0[..])
            .collect();
        let tenant = match sent[..] {
            [one] if valid_tenant(one) => Some(String::from_utf8(one.to_vec()).expect("ASCII")),
            _ => None,
        };
        // What a valid tenant already holds when the request arrives.
        let held = match tenant {
            Some(_) => (u128::from(cap) * u128::from(case.held_sixteenths) / 16) as u64,
            None => 0,
        };
        let estimate = case.estimate.as_ref().map(|e| e.bytes(cap, held));

        // Build the request; skip what `HeaderValue` itself refuses.
        let mut request = Request::post("/v1/chat/completions")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let headers = request.headers_mut();
        for (name, value) in [
            ("x-tenant-id", case.tenant.as_ref().map(|r| &r.0)),
            ("x-tenant-id", case.second_tenant.as_ref().map(|r| &r.0)),
            ("x-token-estimate", estimate.as_ref()),
        ] {
            if let Some(value) = value {
                match HeaderValue::from_bytes(value) {
                    Ok(value) => {
                        headers.append(name, value);
                    }
                    Err(_) => {
                        skipped.set(skipped.get() + 1);
                        return Ok(());
                    }
                }
            }
        }

        // The tenant: one header, valid. Then the estimate. Then the cap.
        let expect = match (sent.len(), &tenant) {
            (0, _) => Expect::Refuse(StatusCode::BAD_REQUEST, "missing_tenant"),
            (_, None) => Expect::Refuse(StatusCode::BAD_REQUEST, "invalid_tenant"),
            (_, Some(_)) => match &estimate {
                None => Expect::Refuse(StatusCode::BAD_REQUEST, "missing_token_estimate"),
                Some(bytes) => match valid_estimate(bytes) {
                    None => Expect::Refuse(StatusCode::BAD_REQUEST, "invalid_token_estimate"),
                    Some(tokens) if tokens > cap => {
                        Expect::Refuse(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large")
                    }
                    Some(tokens) if u128::from(held) + u128::from(tokens) > u128::from(cap) => {
                        Expect::Refuse(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded")
                    }
                    Some(tokens) => Expect::Admit(tokens),
                },
            },
        };

        // What the tenant already holds, taken straight from the tracker.
        let holding = match &tenant {
            Some(id) if held > 0 => Some(tracker.reserve_id(id, held).expect("room to hold")),
            _ => None,
        };
        let tenant_id = tenant.as_deref().unwrap_or("");
        let calls_before = inner.calls();
        let outcome = call(&runtime, service, request, tracker, tenant_id);
        let reached = inner.calls() - calls_before;
        let bodies = inner.take_bodies();

        match expect {
            Expect::Admit(tokens) => {
                prop_assert_eq!(
                    outcome.status,
                    StatusCode::OK,
                    "expected 200: {:?}",
                    outcome.body
                );
                prop_assert_eq!(
                    reached,
                    1,
                    "an admitted request reaches the inner service once"
                );
                prop_assert_eq!(bodies, vec![Bytes::from_static(b"payload")]);
                prop_assert_eq!(&outcome.body[..], b"ok");
                prop_assert_eq!(outcome.in_flight_while_open, held + tokens);
                tally.count("200");
            }
            Expect::Refuse(status, code) => {
                prop_assert_eq!(
                    outcome.status,
                    status,
                    "expected {} {}: {}",
                    status,
                    code,
                    String::from_utf8_lossy(&outcome.body)
                );
                prop_assert_eq!(refusal_code(&outcome)?, code);
                prop_assert_eq!(reached, 0, "a refused request reached the inner service");
                prop_assert_eq!(
                    outcome.in_flight_while_open,
                    held,
                    "a refusal reserved tokens"
                );
                let header = |name: &str| {
                    outcome
                        .headers
                        .get(name)
                        .map(|v| v.to_str().unwrap().to_owned())
                };
                match code {
                    "rate_limit_exceeded" => {
                        prop_assert_eq!(header(RETRY_AFTER.as_str()), Some("1".to_owned()));
                        prop_assert_eq!(header("x-ratelimit-limit-tokens"), Some(cap.to_string()));
                        prop_assert_eq!(
                            header("x-ratelimit-remaining-tokens"),
                            Some((cap - held).to_string())
                        );
                    }
                    "request_too_large" => {
                        prop_assert_eq!(header(RETRY_AFTER.as_str()), None);
                        prop_assert_eq!(header("x-ratelimit-limit-tokens"), Some(cap.to_string()));
                    }
                    _ => prop_assert_eq!(header(RETRY_AFTER.as_str()), None),
                }
                tally.count(format!("{} {code}", status.as_u16()));
            }
        }
        prop_assert_eq!(
            tracker.in_flight(tenant_id),
            held,
            "after the body was read"
        );
        drop(holding);
        prop_assert_eq!(tracker.in_flight(tenant_id), 0);
        assert_nothing_reserved(tracker)
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    eprintln!(
        "fuzz_inputs::arbitrary_tenant_and_estimate_headers_get_the_documented_answer: {} cases \
         ({} skipped: HeaderValue refused the bytes; {} checked); {}; inner service calls: {}",
        ran.get(),
        skipped.get(),
        ran.get() - skipped.get(),
        tally.show(),
        inner.calls()
    );
}

#[test]
fn every_byte_anywhere_in_a_short_tenant_id_gets_the_documented_answer() {
    // The id is checked eight bytes at a time: a byte that is not visible ASCII must be
    // refused wherever it falls (inside a word, in the word the last one overlaps, in an id
    // shorter than a word), among neighbours at either end of the visible range.
    let runtime = current_thread();
    let inner = Inner::default();
    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let service = TenantTokenLayer::new(tracker.clone()).layer(inner.service::<Full<Bytes>>());
    let (mut admitted, mut refused) = (0, 0);
    for len in 1..=24 {
        for at in 0..len {
            for byte in 0..=u8::MAX {
                let mut id: Vec<u8> = (0..len)
                    .map(|i| if i % 2 == 0 { b'!' } else { b'~' })
                    .collect();
                id[at] = byte;
                let Ok(value) = HeaderValue::from_bytes(&id) else {
                    continue; // a control byte: no header can carry it
                };
                let request = Request::post("/v1/chat/completions")
                    .header("x-tenant-id", value)
                    .header("x-token-estimate", "1")
                    .body(Full::new(Bytes::from_static(b"payload")))
                    .unwrap();
                let tenant = String::from_utf8_lossy(&id);
                let outcome = call(&runtime, &service, request, &tracker, &tenant);
                match valid_tenant(&id) {
                    true => {
                        assert_eq!(outcome.status, StatusCode::OK, "{id:?}");
                        assert_eq!(outcome.in_flight_while_open, 1, "{id:?}");
                        admitted += 1;
                    }
                    false => {
                        assert_eq!(outcome.status, StatusCode::BAD_REQUEST, "{id:?}");
                        let code = refusal_code(&outcome).unwrap();
                        assert_eq!(code, "invalid_tenant", "{id:?}");
                        refused += 1;
                    }
                }
            }
        }
    }
    assert_nothing_reserved(&tracker).unwrap();
    assert_eq!(inner.calls(), admitted);
    eprintln!("every byte anywhere in a short tenant id: {admitted} admitted, {refused} refused");
}

// ---------------------------------------------------------------------------------------
// OpenAI bodies
// ---------------------------------------------------------------------------------------

#[cfg(feature = "openai")]
mod openai_bodies {
    use super::*;

    use std::convert::Infallible;

    use http_body::Frame;
    use http_body_util::combinators::BoxBody;
    use http_body_util::StreamBody;
    use proptest::sample::{select, Index};
    use tower_tenant_tokens::{Error, OpenAiEstimator};

    /// A JSON value written by the test itself, so that it can hold what `serde_json`'s
    /// `Value` cannot: duplicate keys and number literals kept as written.
    #[derive(Debug, Clone)]
    enum J {
        Null,
        Bool(bool),
        /// A number literal exactly as it appears in the body.
        Num(String),
        Str(String),
        Arr(Vec<J>),
        Obj(Vec<(String, J)>),
    }

    impl J {
        fn write(&self, out: &mut String) {
            match self {
                J::Null => out.push_str("null"),
                J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                J::Num(literal) => out.push_str(literal),
                J::Str(s) => out.push_str(&serde_json::to_string(s).unwrap()),
                J::Arr(items) => {
                    out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        item.write(out);
                    }
                    out.push(']');
                }
                J::Obj(pairs) => {
                    out.push('{');
                    for (i, (key, value)) in pairs.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(&serde_json::to_string(key).unwrap());
                        out.push(':');
                        value.write(out);
                    }
                    out.push('}');
                }
            }
        }

        fn to_bytes(&self) -> Vec<u8> {
            let mut out = String::new();
            self.write(&mut out);
            out.into_bytes()
        }
    }

    const TEXT_KEYS: [&str; 7] = [
        "messages",
        "prompt",
        "input",
        "instructions",
        "system",
        "tools",
        "functions",
    ];
    const OUTPUT_KEYS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

    fn number_literal() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (0u64..=3000).prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:?}")),
            2 => select(vec![
                "-0",
                "0.0",
                "1e3",
                "1E+2",
                "12.5",
                "100.0",
                "-1",
                "18446744073709551615",
                "18446744073709551616",
                "-9223372036854775808",
                "-9223372036854775809",
                "1e999",
                "-1e999",
                "0e0",
                "5e-324",
                "123456789012345678901234567890",
            ])
            .prop_map(str::to_owned),
        ]
    }

    fn json_string() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-zA-Z0-9 ,.!?]{0,40}",
            1 => "data:[a-z/;,+=0-9]{0,30}",
            1 => "da(ta?)?:?[a-z]{0,3}",
            2 => "\\PC{0,16}",
            1 => "[\\x00-\\x1f\"\\\\/]{0,6}",
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        let known: Vec<&str> = TEXT_KEYS
            .iter()
            .chain(&OUTPUT_KEYS)
            .chain(&["n", "model", "stream", "role", "content", "temperature"])
            .copied()
            .collect();
        prop_oneof![
            4 => select(known).prop_map(str::to_owned),
            1 => "[a-z_]{0,10}",
            1 => json_string(),
        ]
    }

    fn value() -> impl Strategy<Value = J> {
        let leaf = prop_oneof![
            1 => Just(J::Null),
            1 => any::<bool>().prop_map(J::Bool),
            3 => number_literal().prop_map(J::Num),
            4 => json_string().prop_map(J::Str),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(J::Arr),
                prop::collection::vec((key(), inner), 0..6).prop_map(J::Obj),
            ]
        })
    }

    /// What a `max_tokens`-like field or `n` may hold: mostly counts, any JSON type too.
    fn count_value() -> impl Strategy<Value = J> {
        prop_oneof![
            3 => (0u64..=5000).prop_map(|n| J::Num(n.to_string())),
            2 => number_literal().prop_map(J::Num),
            1 => Just(J::Null),
            2 => value(),
        ]
    }

    /// A top-level object with the keys the estimator reads (given any number of times) and
    /// others; now and then not an object at all.
    fn request_json() -> impl Strategy<Value = J> {
        let field = prop_oneof![
            2 => (select(TEXT_KEYS.to_vec()).prop_map(str::to_owned), value()),
            2 => (select(OUTPUT_KEYS.to_vec()).prop_map(str::to_owned), count_value()),
            1 => (Just("n".to_owned()), count_value()),
            2 => (key(), value()),
        ];
        prop_oneof![
            12 => prop::collection::vec(field, 0..8).prop_map(J::Obj),
            1 => value(),
        ]
    }

    /// A well-formed chat request.
    fn chat_json() -> impl Strategy<Value = J> {
        let message = (select(vec!["system", "user", "assistant"]), json_string()).prop_map(
            |(role, content)| {
                J::Obj(vec![
                    ("role".to_owned(), J::Str(role.to_owned())),
                    ("content".to_owned(), J::Str(content)),
                ])
            },
        );
        (
            "[a-z0-9.-]{1,12}",
            prop::collection::vec(message, 0..5),
            prop::option::of((select(OUTPUT_KEYS.to_vec()), count_value())),
            prop::option::of(count_value()),
            prop::option::of(any::<bool>()),
        )
            .prop_map(|(model, messages, limit, n, stream)| {
                let mut pairs = vec![
                    ("model".to_owned(), J::Str(model)),
                    ("messages".to_owned(), J::Arr(messages)),
                ];
                if let Some((key, value)) = limit {
                    pairs.push((key.to_owned(), value));
                }
                if let Some(n) = n {
                    pairs.push(("n".to_owned(), n));
                }
                if let Some(stream) = stream {
                    pairs.push(("stream".to_owned(), J::Bool(stream)));
                }
                J::Obj(pairs)
            })
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Flip(Index, u8),
        Insert(Index, u8),
        Delete(Index),
        Truncate(Index),
        Duplicate(Index, Index),
        Splice(Index, &'static str),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let byte = prop_oneof![
            2 => any::<u8>(),
            3 => select(b"{}[]\":,-.eE0123456789 \\nul\x00\xff".to_vec()),
        ];
        prop_oneof![
            3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip(at, bit)),
            3 => (any::<Index>(), byte).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
            3 => any::<Index>().prop_map(Mutation::Delete),
            1 => any::<Index>().prop_map(Mutation::Truncate),
            1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Duplicate(a, b)),
            2 => (
                any::<Index>(),
                select(vec![
                    "\"max_tokens\":",
                    "\"n\":2,",
                    "\"messages\":[",
                    ",\"max_tokens\":-1",
                    "null",
                    "1e999",
                    "\\u0000",
                    "\\ud800",
                    "\"data:",
                    "}",
                    "]",
                    "{",
                ]),
            )
                .prop_map(|(at, text)| Mutation::Splice(at, text)),
        ]
    }

    fn mutate(body: &mut Vec<u8>, mutation: &Mutation) {
        let len = body.len();
        match *mutation {
            Mutation::Flip(at, bit) if len > 0 => body[at.index(len)] ^= 1 << bit,
            Mutation::Insert(at, byte) => body.insert(at.index(len + 1), byte),
            Mutation::Delete(at) if len > 0 => {
                body.remove(at.index(len));
            }
            Mutation::Truncate(at) => body.truncate(at.index(len + 1)),
            Mutation::Duplicate(a, b) if len > 0 => {
                let (a, b) = (a.index(len), b.index(len));
                let (from, to) = (a.min(b), a.max(b).min(a.min(b) + 64));
                let copy = body[from..=to].to_vec();
                body.splice(to + 1..to + 1, copy);
            }
            Mutation::Splice(at, text) => {
                let at = at.index(len + 1);
                body.splice(at..at, text.bytes());
            }
            _ => {}
        }
    }

    /// A request body and where it came from.
    fn body() -> impl Strategy<Value = (&'static str, Raw)> {
        let soup = prop::collection::vec(
            select(vec![
                "{",
                "}",
                "[",
                "]",
                "\"",
                ":",
                ",",
                "1",
                "-",
                "e",
                ".",
                "0",
                "null",
                "true",
                "\"max_tokens\"",
                "\"messages\"",
                "\"n\"",
                "\"prompt\"",
                "\"x\"",
                "\\u",
                "\\",
                " ",
                "\"data:",
                "18446744073709551616",
            ]),
            0..60,
        )
        .prop_map(|parts| parts.concat().into_bytes());
        let mutated = (chat_json(), prop::collection::vec(mutation(), 1..=6)).prop_map(
            |(json, mutations)| {
                let mut body = json.to_bytes();
                for mutation in &mutations {
                    mutate(&mut body, mutation);
                }
                body
            },
        );
        let deep = (
            0usize..=300,
            select(vec![("[", "]"), ("{\"a\":", "}")]),
            select(vec!["messages", "max_tokens", "n", "metadata", "prompt"]),
        )
            .prop_map(|(depth, (open, close), key)| {
                format!(
                    "{{\"max_tokens\":5,\"{key}\":{}1{}}}",
                    open.repeat(depth),
                    close.repeat(depth)
                )
                .into_bytes()
            });
        let large = (0usize..=3000, 0u64..=2000).prop_map(|(len, max)| {
            format!(
                "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}],\"max_tokens\":{max}}}",
                "x".repeat(len)
            )
            .into_bytes()
        });
        prop_oneof![
            2 => prop::collection::vec(any::<u8>(), 0..1024).prop_map(|b| ("arbitrary bytes", Raw(b))),
            2 => soup.prop_map(|b| ("token soup", Raw(b))),
            4 => mutated.prop_map(|b| ("mutated chat", Raw(b))),
            2 => chat_json().prop_map(|j| ("chat", Raw(j.to_bytes()))),
            4 => request_json().prop_map(|j| ("generated json", Raw(j.to_bytes()))),
            1 => deep.prop_map(|b| ("deep nesting", Raw(b))),
            1 => large.prop_map(|b| ("large", Raw(b))),
        ]
    }

    const BODY_CAPS: [u64; 5] = [0, 100, 1100, 5000, u64::MAX];
    const DEFAULT_BODY_LIMIT: usize = 2 * 1024 * 1024;
    const BODY_LIMITS: [Option<usize>; 3] = [None, Some(64), Some(600)];

    type TestBody = BoxBody<Bytes, Infallible>;

    #[derive(Debug, Clone)]
    struct BodyCase {
        source: &'static str,
        body: Raw,
        /// Where the body is cut into frames (empty: one `Full` body).
        cuts: Vec<Index>,
        content_length: bool,
        cap: usize,
        limit: usize,
        /// Pads the body with trailing blanks (still the same JSON) to the body limit plus
        /// this, when it is shorter.
        pad_to_limit: Option<i8>,
    }

    fn body_case() -> impl Strategy<Value = BodyCase> {
        (
            body(),
            prop_oneof![2 => Just(Vec::new()), 1 => prop::collection::vec(any::<Index>(), 1..5)],
            any::<bool>(),
            0..BODY_CAPS.len(),
            prop_oneof![4 => Just(0usize), 1 => Just(1usize), 1 => Just(2usize)],
            prop::option::weighted(0.1, -1i8..=1),
        )
            .prop_map(
                |((source, body), cuts, content_length, cap, limit, pad_to_limit)| {
                    let mut body = body;
                    if let Some(delta) = pad_to_limit {
                        let limit = BODY_LIMITS[limit].unwrap_or(DEFAULT_BODY_LIMIT);
                        let target = (limit as isize + isize::from(delta)) as usize;
                        if body.0.len() < target {
                            body.0.resize(target, b' ');
                        }
                    }
                    BodyCase {
                        source,
                        body,
                        cuts,
                        content_length,
                        cap,
                        limit,
                        pad_to_limit,
                    }
                },
            )
    }

    fn request_body(body: &[u8], cuts: &[Index]) -> TestBody {
        if cuts.is_empty() {
            return Full::new(Bytes::copy_from_slice(body)).boxed();
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(body.len() + 1)).collect();
        points.sort_unstable();
        let mut frames = Vec::new();
        let mut start = 0;
        for point in points.into_iter().chain([body.len()]) {
            // Repeated points make empty frames, which a body may send too.
            frames.push(Ok::<_, Infallible>(Frame::data(Bytes::copy_from_slice(
                &body[start..point],
            ))));
            start = point;
        }
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    #[test]
    fn arbitrary_bodies_get_what_the_openai_estimator_says() {
        let runtime = current_thread();
        let inner = Inner::default();
        let mut services = Vec::new();
        for &cap in &BODY_CAPS {
            for &limit in &BODY_LIMITS {
                let tracker = Arc::new(TenantTokenTracker::new(cap));
                let estimator = match limit {
                    Some(limit) => OpenAiEstimator::new().body_limit(limit),
                    None => OpenAiEstimator::new(),
                };
                let service = TenantTokenLayer::new(tracker.clone())
                    .estimator(estimator)
                    .layer(inner.service::<TestBody>());
                services.push((tracker, service));
            }
        }
        let ran = Cell::new(0usize);
        let sources = Tally::default();
        let outcomes = Tally::default();

        let result = runner(1000).run(&body_case(), |case| {
            ran.set(ran.get() + 1);
            sources.count(case.source);
            if case.pad_to_limit.is_some() {
                sources.count("(padded to the limit ± 1)");
            }
            let body = &case.body.0;
            let cap = BODY_CAPS[case.cap];
            let limit = BODY_LIMITS[case.limit].unwrap_or(DEFAULT_BODY_LIMIT);
            let (tracker, service) = &services[case.cap * BODY_LIMITS.len() + case.limit];

            // Whatever the settings, the estimator answers without panicking, and whether it
            // refuses does not depend on them.
            let estimate = OpenAiEstimator::new().estimate(body);
            let parts = OpenAiEstimator::new().estimate_parts(body);
            prop_assert_eq!(estimate.clone(), parts.clone().map(|p| p.total()));
            let other = OpenAiEstimator::new()
                .bytes_per_token(0)
                .default_output_tokens(u64::MAX)
                .estimate(body);
            prop_assert_eq!(estimate.is_ok(), other.is_ok());

            // An output allowance the body does not set is a guess, cut to what the cap
            // holds next to the prompt: the allowance is the default's, not the body's.
            let unset = OpenAiEstimator::new()
                .default_output_tokens(0)
                .estimate_parts(body);
            let estimate = match (&parts, unset) {
                (Ok(parts), Ok(unset)) if unset.output_tokens == 0 && parts.output_tokens > 0 => {
                    Ok(parts.total().min(cap.max(parts.prompt_tokens)))
                }
                _ => estimate,
            };
            let expect = if body.len() > limit {
                Expect::Refuse(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
            } else {
                match &estimate {
                    Ok(tokens) if *tokens <= cap => Expect::Admit(*tokens),
                    Ok(_) => Expect::Refuse(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"),
                    Err(error) => {
                        let code = Error::from(error.clone()).code();
                        prop_assert!(
                            code == "invalid_json" || code == "invalid_token_estimate",
                            "estimator error maps to {}",
                            code
                        );
                        Expect::Refuse(StatusCode::BAD_REQUEST, code)
                    }
                }
            };

            let mut request = Request::post("/v1/chat/completions")
                .header("x-tenant-id", "acme")
                .body(request_body(body, &case.cuts))
                .unwrap();
            if case.content_length {
                request
                    .headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            }
            let calls_before = inner.calls();
            let outcome = call(&runtime, service, request, tracker, "acme");
            let reached = inner.calls() - calls_before;
            let bodies = inner.take_bodies();

            match expect {
                Expect::Admit(tokens) => {
                    prop_assert_eq!(
                        outcome.status,
                        StatusCode::OK,
                        "estimate {} within cap {}: {}",
                        tokens,
                        cap,
                        String::from_utf8_lossy(&outcome.body)
                    );
                    prop_assert_eq!(reached, 1);
                    prop_assert_eq!(bodies.len(), 1);
                    prop_assert!(
                        bodies[0] == body[..],
                        "the inner service got {:?}",
                        Raw(bodies[0].to_vec())
                    );
                    prop_assert_eq!(outcome.in_flight_while_open, tokens);
                    outcomes.count("200");
                }
                Expect::Refuse(status, code) => {
                    prop_assert_eq!(
                        outcome.status,
                        status,
                        "expected {} {} (estimate {:?}): {}",
                        status,
                        code,
                        estimate,
                        String::from_utf8_lossy(&outcome.body)
                    );
                    prop_assert_eq!(refusal_code(&outcome)?, code);
                    prop_assert_eq!(reached, 0, "a refused body reached the inner service");
                    outcomes.count(format!("{} {code}", status.as_u16()));
                }
            }
            prop_assert_eq!(tracker.in_flight("acme"), 0);
            assert_nothing_reserved(tracker)
        });
        if let Err(error) = result {
            panic!("{error}");
        }
        eprintln!(
            "fuzz_inputs::arbitrary_bodies_get_what_the_openai_estimator_says: {} cases; \
             sources: {}; outcomes: {}; inner service calls: {}",
            ran.get(),
            sources.show(),
            outcomes.show(),
            inner.calls()
        );
    }

    // -----------------------------------------------------------------------------------
    // The estimator against an independent reading of generated JSON
    // -----------------------------------------------------------------------------------

    /// How `serde_json` reads a number literal (the JSON number model the estimator sees).
    enum Number {
        Unsigned(u64),
        Negative,
        Float,
        OutOfRange,
    }

    fn number(literal: &str) -> Number {
        match serde_json::from_str::<serde_json::Value>(literal) {
            Ok(serde_json::Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Number::Unsigned(u),
                (None, Some(_)) => Number::Negative,
                (None, None) => Number::Float,
            },
            Ok(other) => panic!("{literal} read as {other}"),
            Err(_) => Number::OutOfRange,
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Refused {
        /// 400 `invalid_token_estimate`.
        Invalid,
        /// 400 `invalid_json`.
        Malformed,
    }

    /// The documented rules, applied to the structure the test generated: the UTF-8 bytes
    /// of every string value (not `data:` URLs) under the text fields, rounded up to
    /// tokens at 4 bytes a token, plus one per integer there; plus the largest
    /// `max_tokens`-like limit (1,024 when none; a `null` one counts as 1,024), times `n`
    /// (at least 1). The first unusable field decides the refusal.
    fn documented_estimate(json: &J) -> Result<u64, Refused> {
        let J::Obj(pairs) = json else {
            return Err(Refused::Malformed);
        };
        let (mut text_bytes, mut token_ids) = (0u128, 0u128);
        let mut limits: Vec<Option<u64>> = Vec::new();
        let mut choices: Vec<Option<u64>> = Vec::new();
        for (key, value) in pairs {
            if TEXT_KEYS.contains(&key.as_str()) {
                walk(value, &mut text_bytes, &mut token_ids)?;
            } else if OUTPUT_KEYS.contains(&key.as_str()) {
                limits.push(count(value)?);
            } else if key == "n" {
                choices.push(count(value)?);
            }
        }
        let default = 1024;
        let output = limits
            .iter()
            .map(|limit| limit.unwrap_or(default))
            .max()
            .unwrap_or(default);
        let n = choices
            .iter()
            .map(|n| n.unwrap_or(1).max(1))
            .max()
            .unwrap_or(1);
        let total = text_bytes.div_ceil(4) + token_ids + u128::from(output) * u128::from(n);
        Ok(u64::try_from(total).unwrap_or(u64::MAX))
    }

    fn walk(value: &J, text_bytes: &mut u128, token_ids: &mut u128) -> Result<(), Refused> {
        match value {
            J::Str(s) if !s.starts_with("data:") => *text_bytes += s.len() as u128,
            J::Num(literal) => match number(literal) {
                Number::Unsigned(_) | Number::Negative => *token_ids += 1,
                Number::Float => {}
                Number::OutOfRange => return Err(Refused::Malformed),
            },
            J::Arr(items) => {
                for item in items {
                    walk(item, text_bytes, token_ids)?;
                }
            }
            J::Obj(pairs) => {
                for (_, item) in pairs {
                    walk(item, text_bytes, token_ids)?;
                }
            }
            J::Str(_) | J::Null | J::Bool(_) => {}
        }
        Ok(())
    }

    fn count(value: &J) -> Result<Option<u64>, Refused> {
        match value {
            J::Null => Ok(None),
            J::Num(literal) => match number(literal) {
                Number::Unsigned(n) => Ok(Some(n)),
                Number::Negative | Number::Float => Err(Refused::Invalid),
                Number::OutOfRange => Err(Refused::Malformed),
            },
            _ => Err(Refused::Invalid),
        }
    }

    /// Keeps only the first top-level `n`: a repeated `n` is pinned by
    /// `a_repeated_n_counts_at_its_largest` below.
    fn without_repeated_n(json: J) -> J {
        match json {
            J::Obj(pairs) => {
                let mut seen = false;
                J::Obj(
                    pairs
                        .into_iter()
                        .filter(|(key, _)| key != "n" || !std::mem::replace(&mut seen, true))
                        .collect(),
                )
            }
            other => other,
        }
    }

    #[test]
    fn generated_json_is_estimated_by_the_documented_rules() {
        let ran = Cell::new(0usize);
        let outcomes = Tally::default();
        let strategy = prop_oneof![
            3 => request_json(),
            1 => chat_json(),
        ]
        .prop_map(without_repeated_n);
        let result = runner(2000).run(&strategy, |json| {
            ran.set(ran.get() + 1);
            let body = json.to_bytes();
            let expected = documented_estimate(&json);
            let actual = OpenAiEstimator::new().estimate(&body);
            match (&expected, &actual) {
                (Ok(e), Ok(a)) => {
                    prop_assert_eq!(e, a, "body {:?}", Raw(body.clone()));
                    outcomes.count("estimated");
                }
                (Err(refused), Err(error)) => {
                    let code = Error::from(error.clone()).code();
                    let expected_code = match refused {
                        Refused::Invalid => "invalid_token_estimate",
                        Refused::Malformed => "invalid_json",
                    };
                    prop_assert_eq!(code, expected_code, "{} for {:?}", error, Raw(body.clone()));
                    outcomes.count(code);
                }
                _ => {
                    return Err(TestCaseError::fail(format!(
                        "documented {expected:?}, estimator {actual:?} for {:?}",
                        Raw(body)
                    )))
                }
            }
            Ok(())
        });
        if let Err(error) = result {
            panic!("{error}");
        }
        eprintln!(
            "fuzz_inputs::generated_json_is_estimated_by_the_documented_rules: {} cases; {}",
            ran.get(),
            outcomes.show()
        );
    }

    /// "A key given more than once counts at its largest [...] so a body a server may read
    /// differently never reserves less than that server may produce" (`OpenAiEstimator`'s
    /// documentation, and the README). A server that keeps the first `n` makes 4 choices
    /// of up to 100 tokens here.
    #[test]
    fn a_repeated_n_counts_at_its_largest() {
        let estimator = OpenAiEstimator::new();
        assert_eq!(estimator.estimate(br#"{"max_tokens":100,"n":4}"#), Ok(400));
        assert_eq!(
            estimator.estimate(br#"{"max_tokens":100,"n":1,"n":4}"#),
            Ok(400),
            "the later, larger n"
        );
        assert_eq!(
            estimator.estimate(br#"{"max_tokens":100,"n":4,"n":1}"#),
            Ok(400),
            "the earlier, larger n"
        );
        assert_eq!(
            estimator.estimate(br#"{"max_tokens":100,"n":4,"n":null}"#),
            Ok(400),
            "a later null n"
        );
    }
}
