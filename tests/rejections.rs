//! Refused requests over HTTP: what they answer, that they reserve nothing and never reach
//! the inner service, and that the server keeps serving. Also the missing-tenant and
//! missing-estimate policies, the rejection hook and `Retry-After`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes;
use common::*;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use tower_tenant_tokens::{
    Error, MissingEstimate, MissingTenant, Rejection, ReservationHandle, ShadowMode,
    TenantTokenLayer, TenantTokenTracker,
};

/// A server whose `/v1/chat` answers `ok` (or `unmetered` when no reservation came with
/// the request) and whose `/hold` streams a body the test drives; every call that reaches
/// a handler is counted.
struct App {
    server: TestServer,
    layer: TenantTokenLayer,
    tracker: Arc<TenantTokenTracker>,
    calls: Calls,
    streams: Streams,
}

async fn app(cap: u64, configure: impl FnOnce(TenantTokenLayer) -> TenantTokenLayer) -> App {
    let tracker = Arc::new(TenantTokenTracker::new(cap));
    let calls = Calls::default();
    let (source, streams) = streams();
    let chat = {
        let calls = calls.clone();
        move |handle: Option<Extension<ReservationHandle>>| {
            calls.hit();
            async move {
                match handle {
                    Some(Extension(handle)) => {
                        format!("ok {} {}", handle.tenant_id(), handle.tokens())
                    }
                    None => "unmetered".to_owned(),
                }
            }
        }
    };
    let hold = {
        let calls = calls.clone();
        move || {
            calls.hit();
            let body = source.body();
            async move { body }
        }
    };
    let layer = configure(TenantTokenLayer::new(tracker.clone()).reservation_handle(true));
    let router = Router::new()
        .route("/v1/chat", post(chat))
        .route("/hold", post(hold))
        .layer(layer.clone());
    App {
        server: serve(router).await,
        layer,
        tracker,
        calls,
        streams,
    }
}

/// A header name and its raw value.
type Header<'a> = (&'a str, &'a [u8]);

impl App {
    fn request(&self, headers: &[Header<'_>]) -> Request<ReqBody> {
        let mut request = Request::post(self.server.url("/v1/chat"))
            .body(empty())
            .unwrap();
        for (name, value) in headers {
            request.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        request
    }

    /// The request is answered `ok` and reserved nothing once answered.
    async fn assert_still_serving(&self, tenant: &str, tokens: u64) {
        let calls = self.calls.get();
        let reply = call(&client(), metered(&self.server, "/v1/chat", tenant, tokens)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.text(), format!("ok {tenant} {tokens}"));
        assert_eq!(self.calls.get(), calls + 1);
        assert_eq!(self.tracker.in_flight(tenant), 0);
    }
}

#[tokio::test]
async fn missing_tenant_is_400_json_and_never_reaches_the_handler() {
    let app = app(1_000, |layer| layer).await;
    let reply = call(&client(), app.request(&[("x-token-estimate", b"10")])).await;
    let code = assert_openai_error(&reply, StatusCode::BAD_REQUEST);
    assert_eq!(code, "missing_tenant");
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
    assert!(reply.json()["error"]["param"].is_null());
    assert_eq!(reply.header("retry-after"), None);
    assert_eq!(app.calls.get(), 0);
    assert_eq!(app.tracker.tracked_tenants(), 0);
    app.assert_still_serving("acme", 10).await;
}

#[tokio::test]
async fn invalid_tenant_ids_are_400_and_reserve_nothing() {
    let app = app(1_000, |layer| layer).await;
    let too_long = vec![b'a'; 257];
    let ten_kib = vec![b'a'; 10 * 1024];
    let cases: Vec<(&str, Vec<Header<'_>>)> = vec![
        ("empty", vec![("x-tenant-id", b"")]),
        ("257 bytes", vec![("x-tenant-id", &too_long)]),
        ("10 KiB", vec![("x-tenant-id", &ten_kib)]),
        (
            "a tab (control character)",
            vec![("x-tenant-id", b"ac\tme")],
        ),
        ("non-ASCII bytes", vec![("x-tenant-id", "acmé".as_bytes())]),
        ("a raw 0xff byte", vec![("x-tenant-id", b"acme\xff")]),
        ("a space", vec![("x-tenant-id", b"ac me")]),
        (
            "a duplicated header",
            vec![("x-tenant-id", b"acme"), ("x-tenant-id", b"acme")],
        ),
    ];
    for (what, headers) in cases {
        let mut headers = headers;
        headers.push(("x-token-estimate", b"10"));
        let reply = call(&client(), app.request(&headers)).await;
        let code = assert_openai_error(&reply, StatusCode::BAD_REQUEST);
        assert_eq!(code, "invalid_tenant", "{what}: {}", reply.text());
    }
    assert_eq!(app.calls.get(), 0);
    assert_eq!(app.tracker.tracked_tenants(), 0, "no tenant was charged");

    // 256 bytes is the longest id accepted.
    let longest = "b".repeat(256);
    app.assert_still_serving(&longest, 10).await;
}

#[tokio::test]
async fn a_raw_control_byte_in_the_tenant_header_never_reaches_the_handler() {
    let app = app(1_000, |layer| layer).await;
    let (status, _) = raw_exchange(
        app.server.addr,
        b"POST /v1/chat HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\
          x-tenant-id: ac\x01me\r\nx-token-estimate: 10\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(app.calls.get(), 0);
    assert_eq!(app.tracker.tracked_tenants(), 0);
    app.assert_still_serving("acme", 10).await;
}

#[tokio::test]
async fn missing_and_malformed_estimates_are_400_and_reserve_nothing() {
    let app = app(1_000, |layer| layer).await;
    let reply = call(&client(), app.request(&[("x-tenant-id", b"acme")])).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::BAD_REQUEST),
        "missing_token_estimate"
    );
    for estimate in [
        "abc",
        "-1",
        "1e9",
        "18446744073709551616",
        "+5",
        "1.5",
        "0x10",
        "5 5",
        "",
    ] {
        let headers = [
            ("x-tenant-id", &b"acme"[..]),
            ("x-token-estimate", estimate.as_bytes()),
        ];
        let reply = call(&client(), app.request(&headers)).await;
        let code = assert_openai_error(&reply, StatusCode::BAD_REQUEST);
        assert_eq!(code, "invalid_token_estimate", "estimate {estimate:?}");
    }
    // Two estimates: which one would count is ambiguous, so neither does.
    let headers = [
        ("x-tenant-id", &b"acme"[..]),
        ("x-token-estimate", b"1"),
        ("x-token-estimate", b"900"),
    ];
    let reply = call(&client(), app.request(&headers)).await;
    let code = assert_openai_error(&reply, StatusCode::BAD_REQUEST);
    assert_eq!(code, "invalid_token_estimate", "a repeated estimate header");
    assert_eq!(app.calls.get(), 0);
    assert_eq!(app.tracker.in_flight("acme"), 0);
    assert!(app.tracker.tenant_state("acme").is_none(), "never charged");

    // Leading zeros are digits like any other, however many there are.
    let padded = format!("{:0>40}", 7);
    let headers = [
        ("x-tenant-id", &b"acme"[..]),
        ("x-token-estimate", padded.as_bytes()),
    ];
    let reply = call(&client(), app.request(&headers)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "ok acme 7");

    // The largest number that fits is an estimate (refused only because it is over the cap).
    let headers = [
        ("x-tenant-id", &b"acme"[..]),
        ("x-token-estimate", b"18446744073709551615"),
    ];
    let reply = call(&client(), app.request(&headers)).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::PAYLOAD_TOO_LARGE),
        "request_too_large"
    );
    app.assert_still_serving("acme", 1_000).await;
}

/// The layer finds its two headers by walking a small header map once and by looking them
/// up in a large one: either way, a missing or repeated header is refused the same, and
/// the right one is charged wherever it sits among the others.
#[tokio::test]
async fn the_tenant_and_estimate_headers_are_found_among_few_or_many_others() {
    let app = app(1_000, |layer| layer).await;
    let fillers: Vec<String> = (0..60).map(|i| format!("x-filler-{i}")).collect();
    for filler_count in [0, 3, 25, 60] {
        for (tenants, estimates) in [(1, 1), (0, 1), (2, 1), (1, 0), (1, 2), (2, 2)] {
            let mut headers: Vec<Header<'_>> = Vec::new();
            // Our headers in the middle of the others, the filler names close to theirs.
            let (before, after) = fillers[..filler_count].split_at(filler_count / 2);
            headers.extend(before.iter().map(|name| (name.as_str(), &b"x"[..])));
            headers.extend((0..tenants).map(|_| ("x-tenant-id", &b"acme"[..])));
            headers.extend((0..estimates).map(|_| ("x-token-estimate", &b"7"[..])));
            headers.extend(after.iter().map(|name| (name.as_str(), &b"x"[..])));
            let reply = call(&client(), app.request(&headers)).await;
            let case = format!("{filler_count} others, {tenants} tenants, {estimates} estimates");
            let expected = match (tenants, estimates) {
                (1, 1) => None,
                (0, _) => Some("missing_tenant"),
                (2, _) => Some("invalid_tenant"),
                (_, 0) => Some("missing_token_estimate"),
                _ => Some("invalid_token_estimate"),
            };
            match expected {
                None => {
                    assert_eq!(reply.status, StatusCode::OK, "{case}: {}", reply.text());
                    assert_eq!(reply.text(), "ok acme 7", "{case}");
                }
                Some(code) => {
                    let got = assert_openai_error(&reply, StatusCode::BAD_REQUEST);
                    assert_eq!(got, code, "{case}");
                }
            }
        }
    }
    assert_eq!(
        app.calls.get(),
        4,
        "only the well-formed requests were served"
    );
    assert_eq!(app.tracker.in_flight("acme"), 0);
}

/// Header names are compared a word at a time: a name one byte away from the layer's,
/// at any place, is another header, whether it comes before or after the real one.
#[tokio::test]
async fn a_header_name_one_byte_off_is_not_the_tenant_or_the_estimate() {
    let app = app(1_000, |layer| layer).await;
    let near_misses = |name: &str| -> Vec<String> {
        (0..name.len())
            .map(|at| {
                let mut bytes = name.as_bytes().to_vec();
                bytes[at] = if bytes[at] == b'q' { b'z' } else { b'q' };
                String::from_utf8(bytes).unwrap()
            })
            .collect()
    };
    let mut served = 0;
    for (real, value, other, other_value) in [
        ("x-tenant-id", &b"acme"[..], "x-token-estimate", &b"7"[..]),
        ("x-token-estimate", b"7", "x-tenant-id", b"acme"),
    ] {
        for miss in near_misses(real) {
            let evil = match real {
                "x-tenant-id" => &b"evil"[..],
                _ => b"999",
            };
            // The near miss beside the real header, before it and after it.
            for headers in [
                [(miss.as_str(), evil), (real, value), (other, other_value)],
                [(real, value), (miss.as_str(), evil), (other, other_value)],
            ] {
                let reply = call(&client(), app.request(&headers)).await;
                assert_eq!(reply.text(), "ok acme 7", "{miss}");
                served += 1;
            }
            // The near miss alone.
            let headers = [(miss.as_str(), evil), (other, other_value)];
            let reply = call(&client(), app.request(&headers)).await;
            let expected = match real {
                "x-tenant-id" => "missing_tenant",
                _ => "missing_token_estimate",
            };
            let code = assert_openai_error(&reply, StatusCode::BAD_REQUEST);
            assert_eq!(code, expected, "{miss}");
        }
    }
    assert_eq!(app.calls.get(), served);
    assert_eq!(app.tracker.in_flight("acme"), 0);
    assert!(app.tracker.tenant_state("evil").is_none());
}

#[tokio::test]
async fn over_the_cap_now_is_429_with_retry_after_and_rate_limit_headers() {
    let mut app = app(1_000, |layer| layer).await;
    let client = client();
    let holding = send(&client, metered(&app.server, "/hold", "acme", 700)).await;
    let chunks = app.streams.next().await;
    assert_eq!(app.tracker.in_flight("acme"), 700);
    assert_eq!(app.calls.get(), 1);

    let reply = call(&client, metered(&app.server, "/v1/chat", "acme", 400)).await;
    let code = assert_openai_error(&reply, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(code, "rate_limit_exceeded");
    assert_eq!(reply.json()["error"]["type"], "tokens");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("acme"), "{message}");
    let retry_after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(reply.header("x-ratelimit-remaining-tokens"), Some("300"));
    assert_eq!(
        app.calls.get(),
        1,
        "the refused request never reached a handler"
    );
    assert_eq!(app.tracker.in_flight("acme"), 700, "and reserved nothing");

    // What is left still fits.
    let reply = call(&client, metered(&app.server, "/v1/chat", "acme", 300)).await;
    assert_eq!(reply.text(), "ok acme 300");

    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    assert_eq!(app.tracker.in_flight("acme"), 0);
    app.assert_still_serving("acme", 400).await;
}

#[tokio::test]
async fn request_larger_than_the_cap_is_413_without_retry_after() {
    let app = app(1_000, |layer| layer).await;
    let reply = call(&client(), metered(&app.server, "/v1/chat", "acme", 1_001)).await;
    let code = assert_openai_error(&reply, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(code, "request_too_large");
    assert_eq!(reply.header("retry-after"), None, "retrying cannot help");
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(app.calls.get(), 0);
    assert_eq!(app.tracker.tracked_tenants(), 0);
    app.assert_still_serving("acme", 1_000).await;
}

#[tokio::test]
async fn unauthorized_policy_answers_401_for_a_missing_tenant_only() {
    let app = app(1_000, |layer| {
        layer.on_missing_tenant(MissingTenant::Unauthorized)
    })
    .await;
    let reply = call(&client(), app.request(&[("x-token-estimate", b"10")])).await;
    let code = assert_openai_error(&reply, StatusCode::UNAUTHORIZED);
    assert_eq!(code, "missing_tenant");
    assert_eq!(reply.json()["error"]["type"], "authentication_error");

    // A tenant that is present but invalid is still a client error.
    let headers = [("x-tenant-id", &b"a b"[..]), ("x-token-estimate", b"10")];
    let reply = call(&client(), app.request(&headers)).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::BAD_REQUEST),
        "invalid_tenant"
    );
    assert_eq!(app.calls.get(), 0);
    app.assert_still_serving("acme", 10).await;
}

#[tokio::test]
async fn default_tenant_policy_charges_the_shared_tenant() {
    let mut app = app(1_000, |layer| {
        layer.on_missing_tenant(MissingTenant::DefaultTenant("shared".into()))
    })
    .await;
    let client = client();

    let mut request = metered(&app.server, "/hold", "unused", 600);
    request.headers_mut().remove("x-tenant-id");
    let holding = send(&client, request).await;
    let chunks = app.streams.next().await;
    assert_eq!(app.tracker.in_flight("shared"), 600);

    // Every request without a tenant shares that one cap...
    let reply = call(&client, app.request(&[("x-token-estimate", b"500")])).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let reply = call(&client, app.request(&[("x-token-estimate", b"400")])).await;
    assert_eq!(reply.text(), "ok shared 400");
    // ...while a request naming its tenant is charged to it.
    let reply = call(&client, metered(&app.server, "/v1/chat", "acme", 900)).await;
    assert_eq!(reply.text(), "ok acme 900");

    drop(chunks);
    read(holding).await;
    assert_eq!(app.tracker.in_flight("shared"), 0);
    assert_eq!(app.tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn unmetered_missing_tenant_passes_through_without_reserving() {
    let app = app(1_000, |layer| {
        layer.on_missing_tenant(MissingTenant::Unmetered)
    })
    .await;
    // Even an estimate far over the cap, or none at all, passes without a tenant.
    for headers in [&[("x-token-estimate", &b"5000"[..])][..], &[]] {
        let reply = call(&client(), app.request(headers)).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "unmetered");
    }
    assert_eq!(app.calls.get(), 2);
    assert_eq!(app.tracker.tracked_tenants(), 0, "nothing was reserved");

    // A request naming a tenant is still metered and checked.
    let reply = call(&client(), metered(&app.server, "/v1/chat", "acme", 5_000)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    app.assert_still_serving("acme", 10).await;
}

#[tokio::test]
async fn unmetered_missing_estimate_passes_through_without_reserving() {
    let app = app(1_000, |layer| {
        layer.on_missing_estimate(MissingEstimate::Unmetered)
    })
    .await;
    let reply = call(&client(), app.request(&[("x-tenant-id", b"acme")])).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "unmetered");
    assert_eq!(app.tracker.tracked_tenants(), 0);

    // An estimate that is present but unusable is still refused.
    let headers = [("x-tenant-id", &b"acme"[..]), ("x-token-estimate", b"lots")];
    let reply = call(&client(), app.request(&headers)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(app.calls.get(), 1);
    app.assert_still_serving("acme", 10).await;
}

#[tokio::test]
async fn default_estimate_policy_reserves_the_default() {
    let mut app = app(1_000, |layer| {
        layer.on_missing_estimate(MissingEstimate::Default(250))
    })
    .await;
    let reply = call(&client(), app.request(&[("x-tenant-id", b"acme")])).await;
    assert_eq!(reply.text(), "ok acme 250");

    let mut request = metered(&app.server, "/hold", "acme", 0);
    request.headers_mut().remove("x-token-estimate");
    let holding = send(&client(), request).await;
    let chunks = app.streams.next().await;
    assert_eq!(app.tracker.in_flight("acme"), 250);
    let reply = call(&client(), metered(&app.server, "/v1/chat", "acme", 751)).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("x-ratelimit-remaining-tokens"), Some("750"));

    drop(chunks);
    read(holding).await;
    assert_eq!(app.tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn on_rejection_hook_replaces_the_response() {
    let mut app = app(1_000, |layer| {
        layer.on_rejection(|rejection: &Rejection| match rejection.error() {
            Error::TenantOverloaded { tenant_id, .. } => {
                let mut response = Response::new(Bytes::from(format!("{tenant_id} is busy")));
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                let seconds = rejection.retry_after().unwrap().as_secs();
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(seconds));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                response
            }
            _ => {
                let mut response = rejection.to_response();
                response
                    .headers_mut()
                    .insert("x-gateway", HeaderValue::from_static("tenant-tokens"));
                response
            }
        })
    })
    .await;
    let client = client();
    let holding = send(&client, metered(&app.server, "/hold", "acme", 900)).await;
    let chunks = app.streams.next().await;

    let reply = call(&client, metered(&app.server, "/v1/chat", "acme", 200)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.text(), "acme is busy");
    assert_eq!(reply.header("content-type"), Some("text/plain"));
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), None);

    // The hook may keep the default response and add to it.
    let reply = call(&client, app.request(&[("x-token-estimate", b"1")])).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::BAD_REQUEST),
        "missing_tenant"
    );
    assert_eq!(reply.header("x-gateway"), Some("tenant-tokens"));
    assert_eq!(
        app.calls.get(),
        1,
        "only the held request reached a handler"
    );
    assert_eq!(app.tracker.in_flight("acme"), 900);

    drop(chunks);
    read(holding).await;
    app.assert_still_serving("acme", 200).await;
}

#[tokio::test]
async fn retry_after_is_rounded_up_to_whole_seconds_and_never_zero() {
    for (configured, expected) in [
        (Duration::from_millis(1500), "2"),
        (Duration::from_secs(3), "3"),
        (Duration::ZERO, "1"),
        (Duration::from_millis(1), "1"),
    ] {
        let mut app = app(100, |layer| layer.retry_after(configured)).await;
        let holding = send(&client(), metered(&app.server, "/hold", "acme", 100)).await;
        let chunks = app.streams.next().await;
        let reply = call(&client(), metered(&app.server, "/v1/chat", "acme", 1)).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            reply.header("retry-after"),
            Some(expected),
            "retry_after({configured:?})"
        );
        drop(chunks);
        read(holding).await;
    }
}

#[tokio::test]
async fn custom_header_names_and_tenant_length_limit_are_honoured() {
    let app = app(1_000, |layer| {
        layer
            .tenant_header(http::HeaderName::from_static("x-org"))
            .estimate_header(http::HeaderName::from_static("x-cost"))
            .max_tenant_len(8)
    })
    .await;
    let reply = call(
        &client(),
        app.request(&[("x-org", b"acme"), ("x-cost", b"42")]),
    )
    .await;
    assert_eq!(reply.text(), "ok acme 42");

    // The default headers mean nothing now.
    let reply = call(&client(), metered(&app.server, "/v1/chat", "acme", 42)).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::BAD_REQUEST),
        "missing_tenant"
    );
    let headers = [("x-org", &b"acme"[..]), ("x-token-estimate", b"42")];
    let reply = call(&client(), app.request(&headers)).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::BAD_REQUEST),
        "missing_token_estimate"
    );

    // Eight bytes fit, nine do not.
    let headers = [("x-org", &b"12345678"[..]), ("x-cost", b"1")];
    assert_eq!(
        call(&client(), app.request(&headers)).await.status,
        StatusCode::OK
    );
    let headers = [("x-org", &b"123456789"[..]), ("x-cost", b"1")];
    let reply = call(&client(), app.request(&headers)).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::BAD_REQUEST),
        "invalid_tenant"
    );
    assert_eq!(app.calls.get(), 2);
    assert!(app.tracker.tenant_state("123456789").is_none());
}

#[tokio::test]
async fn tenant_source_from_fn_charges_what_the_function_returns() {
    let app = app(1_000, |layer| {
        layer.tenant_source(tower_tenant_tokens::TenantSource::from_fn(|parts| {
            // e.g. a tenant encoded in the host name: acme.gateway.test
            let host = parts.headers.get("x-forwarded-host")?.to_str().ok()?;
            host.strip_suffix(".gateway.test").map(str::to_owned)
        }))
    })
    .await;
    let with_host = |host: &str| {
        app.request(&[
            ("x-forwarded-host", host.as_bytes()),
            ("x-token-estimate", b"25"),
        ])
    };
    let reply = call(&client(), with_host("acme.gateway.test")).await;
    assert_eq!(reply.text(), "ok acme 25");
    assert_eq!(app.tracker.tenant_state("acme").unwrap().high_water, 25);

    // None, or an empty id, counts as missing.
    for host in ["elsewhere.test", ".gateway.test"] {
        let reply = call(&client(), with_host(host)).await;
        assert_eq!(
            assert_openai_error(&reply, StatusCode::BAD_REQUEST),
            "missing_tenant",
            "host {host}"
        );
    }
    assert_eq!(app.calls.get(), 1);
    assert_eq!(app.tracker.tracked_tenants(), 1);
}

/// A layer whose estimate is a function of the `Parts` reads the request in place first,
/// where that function cannot run, then taken apart: the class's function must still run
/// once per request, and refusals keep their order (tenant, then class, then estimate).
#[tokio::test]
async fn each_source_function_runs_once_per_request_and_refusals_keep_their_order() {
    let (classes, estimates) = (Calls::default(), Calls::default());
    let app = {
        let (classes, estimates) = (classes.clone(), estimates.clone());
        app(1_000, move |layer| {
            layer
                .priority_source(tower_tenant_tokens::PrioritySource::from_fn(
                    move |headers, _| {
                        classes.hit();
                        match headers.get("x-class")?.as_bytes() {
                            b"critical" => Some(tower_tenant_tokens::Priority::Critical),
                            _ => None,
                        }
                    },
                ))
                .estimator(tower_tenant_tokens::Estimator::from_fn(move |parts| {
                    estimates.hit();
                    let Some(value) = parts.headers.get("x-cost") else {
                        return Ok(None);
                    };
                    let text = value.to_str().unwrap_or_default();
                    let tokens = text.parse().map_err(|_| {
                        tower_tenant_tokens::EstimateError::invalid(format!("`{text}`"))
                    })?;
                    Ok(Some(tokens))
                }))
        })
        .await
    };
    let counts = || (classes.get(), estimates.get());
    let reply = call(
        &client(),
        app.request(&[
            ("x-tenant-id", b"acme"),
            ("x-class", b"critical"),
            ("x-cost", b"30"),
        ]),
    )
    .await;
    assert_eq!(reply.text(), "ok acme 30");
    assert_eq!(counts(), (1, 1), "(class, estimate) functions called");

    // A missing tenant is refused before the class or the estimate is read.
    let reply = call(&client(), app.request(&[("x-cost", b"30")])).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::BAD_REQUEST),
        "missing_tenant"
    );
    assert_eq!(counts(), (1, 1));

    // An unusable estimate is refused once the class is read.
    let headers = [("x-tenant-id", &b"acme"[..]), ("x-cost", b"lots")];
    let reply = call(&client(), app.request(&headers)).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::BAD_REQUEST),
        "invalid_token_estimate"
    );
    assert_eq!(counts(), (2, 2));
    assert_eq!(app.calls.get(), 1);
}

#[tokio::test]
async fn admitted_responses_carry_the_rate_limit_headers_only_when_asked() {
    let headers = [("x-tenant-id", &b"acme"[..]), ("x-token-estimate", b"300")];
    let plain = app(1_000, |layer| layer).await;
    let reply = call(&client(), plain.request(&headers)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("x-ratelimit-limit-tokens"),
        None,
        "off by default"
    );

    let app = app(1_000, |layer| layer.openai_ratelimit_headers(true)).await;
    let reply = call(&client(), app.request(&headers)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("1000"));
    // What is left as the response starts: this request's 300 are still held.
    assert_eq!(reply.header("x-ratelimit-remaining-tokens"), Some("700"));
    assert_eq!(
        app.tracker.in_flight("acme"),
        0,
        "released once the body was read"
    );
}

#[tokio::test]
async fn ietf_ratelimit_fields_are_sent_only_when_asked() {
    let headers = [("x-tenant-id", &b"acme"[..]), ("x-token-estimate", b"300")];
    let plain = app(1_000, |layer| layer.openai_ratelimit_headers(true)).await;
    let reply = call(&client(), plain.request(&headers)).await;
    assert_eq!(reply.header("ratelimit-policy"), None, "off by default");
    assert_eq!(reply.header("ratelimit"), None);

    let mut app = app(1_000, |layer| layer.ietf_ratelimit_headers(true)).await;
    let client = client();
    let policy = Some(r#""in-flight";q=1000;qu="tokens""#);
    let reply = call(&client, app.request(&headers)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("ratelimit-policy"), policy);
    // What is left as the response starts: this request's 300 are still held.
    assert_eq!(reply.header("ratelimit"), Some(r#""in-flight";r=700"#));
    assert_eq!(
        reply.header("x-ratelimit-limit-tokens"),
        None,
        "each kind on its own"
    );

    // Over the cap now: what is left, and when to retry (as Retry-After).
    let holding = send(&client, metered(&app.server, "/hold", "acme", 700)).await;
    let chunks = app.streams.next().await;
    let refused = call(&client, metered(&app.server, "/v1/chat", "acme", 400)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.header("ratelimit-policy"), policy);
    assert_eq!(
        refused.header("ratelimit"),
        Some(r#""in-flight";r=300;t=1"#)
    );
    assert_eq!(refused.header("retry-after"), Some("1"));

    // Never fits: the policy says why; nothing to wait for.
    let too_large = call(&client, metered(&app.server, "/v1/chat", "acme", 1_001)).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(too_large.header("ratelimit-policy"), policy);
    assert_eq!(too_large.header("ratelimit"), None);

    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    assert_eq!(app.tracker.in_flight("acme"), 0);
}

#[tokio::test]
async fn shadow_mode_counts_and_admits_what_the_cap_would_refuse() {
    let mut app = app(1_000, |layer| layer.shadow(ShadowMode::All)).await;
    let client = client();
    let holding = send(&client, metered(&app.server, "/hold", "acme", 700)).await;
    let chunks = app.streams.next().await;

    // Would be a 429, then a 413: both admitted, counted in flight and as shadowed.
    let over = call(&client, metered(&app.server, "/v1/chat", "acme", 400)).await;
    assert_eq!(over.status, StatusCode::OK);
    assert_eq!(over.text(), "ok acme 400");
    let huge = call(&client, metered(&app.server, "/v1/chat", "acme", 5_000)).await;
    assert_eq!(huge.text(), "ok acme 5000");
    assert_eq!(app.layer.shadow_refusals(), 2);
    let state = app.tracker.tenant_state("acme").expect("tracked");
    assert!(
        state.high_water >= 5_700,
        "shadowed work was counted: {state:?}"
    );
    assert!(
        state.overcommits >= 2,
        "and shows as overcommits: {state:?}"
    );
    // Under the cap: an ordinary admission, not counted as shadowed.
    let fits = call(&client, metered(&app.server, "/v1/chat", "acme", 300)).await;
    assert_eq!(fits.text(), "ok acme 300");
    assert_eq!(app.layer.shadow_refusals(), 2);
    // Bad input is still refused: shadow trials the cap, not the request format.
    let headers = [("x-tenant-id", &b"acme"[..]), ("x-token-estimate", b"lots")];
    assert_eq!(
        call(&client, app.request(&headers)).await.status,
        StatusCode::BAD_REQUEST
    );

    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    assert_eq!(app.tracker.in_flight("acme"), 0, "all released");
}

#[tokio::test]
async fn shadow_mode_for_some_tenants_enforces_the_others() {
    let mut app = app(1_000, |layer| {
        layer.shadow(ShadowMode::tenants(|tenant| tenant.starts_with("trial-")))
    })
    .await;
    let client = client();
    let enforced = call(&client, metered(&app.server, "/v1/chat", "acme", 1_001)).await;
    assert_eq!(enforced.status, StatusCode::PAYLOAD_TOO_LARGE);
    let trial = call(&client, metered(&app.server, "/v1/chat", "trial-1", 1_001)).await;
    assert_eq!(trial.text(), "ok trial-1 1001");
    assert_eq!(app.layer.shadow_refusals(), 1);

    let holding = send(&client, metered(&app.server, "/hold", "acme", 900)).await;
    let chunks = app.streams.next().await;
    let refused = call(&client, metered(&app.server, "/v1/chat", "acme", 200)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(app.layer.shadow_refusals(), 1);
    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    assert_eq!(app.tracker.in_flight("acme"), 0);
    assert_eq!(app.tracker.in_flight("trial-1"), 0);
}

#[tokio::test]
async fn retry_after_can_be_derived_from_hold_times_and_what_is_in_flight() {
    let mut app = app(1_000, |layer| {
        layer.retry_after_from_in_flight(std::time::Duration::from_secs(600))
    })
    .await;
    let client = client();
    let retry_after = |reply: &Reply| reply.header("retry-after").map(str::to_owned);

    // Nothing has been released yet: the fixed value.
    let holding = send(&client, metered(&app.server, "/hold", "acme", 1_000)).await;
    let chunks = app.streams.next().await;
    let refused = call(&client, metered(&app.server, "/v1/chat", "acme", 500)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retry_after(&refused).as_deref(), Some("1"));
    // Held for 1.5 s: the mean hold time is now about that.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);

    let holding = send(&client, metered(&app.server, "/hold", "acme", 1_000)).await;
    let chunks = app.streams.next().await;
    // Needs all that is in flight released: about the mean hold time, 1.5 s → 2.
    let whole = call(&client, metered(&app.server, "/v1/chat", "acme", 1_000)).await;
    assert_eq!(whole.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retry_after(&whole).as_deref(), Some("2"));
    // Needs a tenth of it: 0.15 s, which is still never under 1.
    let sliver = call(&client, metered(&app.server, "/v1/chat", "acme", 100)).await;
    assert_eq!(retry_after(&sliver).as_deref(), Some("1"));
    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    assert_eq!(app.tracker.in_flight("acme"), 0);
}
