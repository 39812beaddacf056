//! Limits over time (`TokenWindow`) over real HTTP: charged in the same admission as the
//! in-flight cap, all or nothing, grown with a stream, settled on the reported usage, and
//! refused with OpenAI's headers and a `Retry-After` computed from the refill rate.
#![cfg(feature = "openai")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use tower_tenant_tokens::{
    OpenAiEstimator, Price, Prices, ReservationHandle, ShadowMode, SharedBudget, TenantTokenLayer,
    TenantTokenTracker, TokenWindow,
};

/// `/ok` answers at once; `/json` answers `body` as JSON; `/stream` answers server-sent
/// events the test drives; `/used` settles its reservation on `x-used` through the handle.
async fn app(layer: TenantTokenLayer, body: &'static str) -> (TestServer, Streams) {
    let (source, streams) = streams();
    let app = Router::new()
        .route("/ok", post(|| async { "ok" }))
        .route(
            "/json",
            post(move || async move { ([(CONTENT_TYPE, "application/json")], body) }),
        )
        .route(
            "/stream",
            post(move || {
                let body = source.body();
                async move { ([(CONTENT_TYPE, "text/event-stream")], body).into_response() }
            }),
        )
        .route(
            "/used",
            post(
                |Extension(handle): Extension<ReservationHandle>, headers: http::HeaderMap| async move {
                    let used = headers["x-used"].to_str().unwrap().parse().unwrap();
                    handle.resize(used);
                    "settled"
                },
            ),
        )
        .layer(layer);
    (serve(app).await, streams)
}

fn tracker(cap: u64) -> Arc<TenantTokenTracker> {
    Arc::new(TenantTokenTracker::new(cap))
}

fn chunk(content: &str) -> Bytes {
    let event = serde_json::json!({"choices": [{"index": 0, "delta": {"content": content}}]});
    Bytes::from(format!("data: {event}\n\n"))
}

#[tokio::test]
async fn concurrent_requests_cannot_get_past_the_window() {
    let window = TokenWindow::per_minute(5_000);
    let layer = TenantTokenLayer::new(tracker(1_000_000)).window(window.clone());
    let (server, _streams) = app(layer, "").await;
    // The bucket holds 5,000 and refills 5,000 a minute while the requests run.
    burst_against_a_window(&[&server], "acme", 100, 5_000).await;
    assert!(window.remaining("acme") < 100);
}

#[tokio::test]
async fn a_refusal_says_when_the_window_holds_the_request_and_it_does_then() {
    // 100 tokens per 10 s: 10 tokens a second.
    let window = TokenWindow::new(100, Duration::from_secs(10));
    let layer = TenantTokenLayer::new(tracker(10_000)).window(window.clone());
    let (server, _streams) = app(layer, "").await;
    let client = client();

    let first = call(&client, metered(&server, "/ok", "acme", 100)).await;
    assert_eq!(first.status, StatusCode::OK);
    let refused = call(&client, metered(&server, "/ok", "acme", 30)).await;
    let refused_at = Instant::now();
    assert_eq!(
        assert_openai_error(&refused, StatusCode::TOO_MANY_REQUESTS),
        "window_exceeded"
    );
    let json = refused.json();
    assert_eq!(json["error"]["type"], "tokens");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains("tokens per 10s"), "{message}");
    // 30 tokens at 10 a second: 3 s.
    assert_eq!(refused.header("retry-after"), Some("3"));
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("100"));
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), Some("0"));
    // Full again in 10 s.
    assert_eq!(refused.header("x-ratelimit-reset-tokens"), Some("10s"));

    // Not before: a second early, it is refused again.
    tokio::time::sleep_until((refused_at + Duration::from_secs(2)).into()).await;
    let early = call(&client, metered(&server, "/ok", "acme", 30)).await;
    assert_eq!(early.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(early.header("retry-after"), Some("1"));
    // At its Retry-After, it is admitted.
    tokio::time::sleep_until((refused_at + Duration::from_secs(3)).into()).await;
    let retried = call(&client, metered(&server, "/ok", "acme", 30)).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.text());
}

#[tokio::test]
async fn a_request_larger_than_the_window_is_413() {
    let layer = TenantTokenLayer::new(tracker(10_000)).window(TokenWindow::per_minute(500));
    let (server, _streams) = app(layer, "").await;
    let client = client();

    let reply = call(&client, metered(&server, "/ok", "acme", 501)).await;
    assert_eq!(
        assert_openai_error(&reply, StatusCode::PAYLOAD_TOO_LARGE),
        "request_too_large_for_window"
    );
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("500"));
    assert_eq!(reply.header("retry-after"), None);
    let fits = call(&client, metered(&server, "/ok", "acme", 500)).await;
    assert_eq!(fits.status, StatusCode::OK);
}

#[tokio::test]
async fn a_refused_request_charges_nothing_anywhere() {
    let tenants = tracker(1_000);
    let upstream = tracker(100_000);
    let window = TokenWindow::per_30_days(10_000);
    let layer = TenantTokenLayer::new(tenants.clone())
        .shared_budget(SharedBudget::new("upstream", upstream.clone()))
        .window(window.clone());
    let (server, mut streams) = app(layer, "").await;
    let client = client();

    // Refused by the tenant's cap: the window is not charged.
    let held = send(&client, metered(&server, "/stream", "acme", 900)).await;
    let chunks = streams.next().await;
    assert_eq!(window.remaining("acme"), 9_100);
    let over_cap = call(&client, metered(&server, "/ok", "acme", 200)).await;
    assert_eq!(over_cap.error_code(), "rate_limit_exceeded");
    assert_eq!(window.remaining("acme"), 9_100);
    drop(chunks);
    read(held).await;
    wait_for_in_flight(&tenants, "acme", 0).await;

    // Refused by the window: the tenant's cap and the budget are given back.
    window.set_limit("acme", 1_000);
    assert_eq!(window.remaining("acme"), 100);
    let over_window = call(&client, metered(&server, "/ok", "acme", 200)).await;
    assert_eq!(over_window.error_code(), "window_exceeded");
    assert_eq!(tenants.in_flight("acme"), 0);
    assert_eq!(upstream.in_flight("upstream"), 0);
    assert_eq!(window.remaining("acme"), 100);
}

#[tokio::test]
async fn all_windows_or_none() {
    let minute = TokenWindow::per_minute(1_000);
    let day = TokenWindow::per_day(300);
    let layer = TenantTokenLayer::new(tracker(10_000))
        .window(minute.clone())
        .window(day.clone());
    let (server, _streams) = app(layer, "").await;
    let client = client();

    assert_eq!(
        call(&client, metered(&server, "/ok", "acme", 200))
            .await
            .status,
        StatusCode::OK
    );
    let refused = call(&client, metered(&server, "/ok", "acme", 200)).await;
    assert_eq!(refused.error_code(), "window_exceeded");
    assert!(
        refused.text().contains("tokens per day"),
        "{}",
        refused.text()
    );
    // The minute's window took nothing for the refused request.
    assert_eq!(minute.remaining("acme"), 800);
    assert_eq!(day.remaining("acme"), 100);
}

#[tokio::test]
async fn reported_usage_settles_the_charge_and_an_unreported_stream_stays_charged() {
    const USAGE: &str =
        r#"{"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":60,"total_tokens":100}}"#;
    let window = TokenWindow::per_30_days(100_000);
    let layer = TenantTokenLayer::new(tracker(100_000))
        .read_usage(true)
        .window(window.clone());
    let (server, mut streams) = app(layer, USAGE).await;
    let client = client();

    // Estimated at 1,000, reported 100: 900 go back each time.
    for _ in 0..5 {
        let reply = call(&client, metered(&server, "/json", "acme", 1_000)).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(window.remaining("acme"), 100_000 - 5 * 100);

    // A complete stream that reports no usage: the reservation settles on the text it
    // counted, the window stays charged at the estimate, the larger.
    let response = send(&client, metered(&server, "/stream", "beta", 1_000)).await;
    let chunks = streams.next().await;
    chunks.send(chunk(&"a".repeat(40))).unwrap();
    chunks
        .send(Bytes::from_static(b"data: [DONE]\n\n"))
        .unwrap();
    drop(chunks);
    read(response).await;
    assert_eq!(window.remaining("beta"), 100_000 - 1_000);

    // A stream that outgrows its estimate is charged as it grows, never refused.
    let response = send(&client, metered(&server, "/stream", "gamma", 100)).await;
    let chunks = streams.next().await;
    let mut body = response.into_body();
    let big = chunk(&"x".repeat(2_000)); // 500 tokens counted
    chunks.send(big.clone()).unwrap();
    assert_eq!(next_data(&mut body).await, Some(big));
    assert_eq!(window.remaining("gamma"), 100_000 - 500);
    drop(chunks);
    assert_eq!(next_data(&mut body).await, None);
    assert_eq!(window.remaining("gamma"), 100_000 - 500);
}

#[tokio::test]
async fn a_handler_settles_the_charge_through_its_handle() {
    let window = TokenWindow::per_30_days(10_000);
    let layer = TenantTokenLayer::new(tracker(10_000))
        .reservation_handle(true)
        .window(window.clone());
    let (server, _streams) = app(layer, "").await;
    let client = client();

    let mut request = metered(&server, "/used", "acme", 1_000);
    request.headers_mut().insert("x-used", 250.into());
    assert_eq!(call(&client, request).await.status, StatusCode::OK);
    assert_eq!(window.remaining("acme"), 10_000 - 250);

    let mut request = metered(&server, "/used", "acme", 1_000);
    request.headers_mut().insert("x-used", 3_000.into());
    assert_eq!(call(&client, request).await.status, StatusCode::OK);
    assert_eq!(window.remaining("acme"), 10_000 - 250 - 3_000);
}

#[tokio::test]
async fn admitted_responses_describe_the_tightest_window() {
    let layer = TenantTokenLayer::new(tracker(10_000))
        .openai_ratelimit_headers(true)
        .window(TokenWindow::per_minute(6_000))
        .window(TokenWindow::per_day(1_000_000));
    let (server, _streams) = app(layer, "").await;
    let client = client();

    let reply = call(&client, metered(&server, "/ok", "acme", 600)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("6000"));
    assert_eq!(reply.header("x-ratelimit-remaining-tokens"), Some("5400"));
    // 600 tokens at 100 a second: full again in 6 s.
    assert_eq!(reply.header("x-ratelimit-reset-tokens"), Some("6s"));
}

#[tokio::test]
async fn limits_come_from_a_function_and_change_at_run_time() {
    let window = TokenWindow::per_30_days(100);
    window.set_limit_fn(|tenant| (tenant == "pro").then_some(10_000));
    let layer = TenantTokenLayer::new(tracker(100_000)).window(window.clone());
    let (server, _streams) = app(layer, "").await;
    let client = client();

    let free = call(&client, metered(&server, "/ok", "free", 1_000)).await;
    assert_eq!(free.error_code(), "request_too_large_for_window");
    let pro = call(&client, metered(&server, "/ok", "pro", 1_000)).await;
    assert_eq!(pro.status, StatusCode::OK);

    window.set_limit("free", 5_000);
    let free = call(&client, metered(&server, "/ok", "free", 1_000)).await;
    assert_eq!(free.status, StatusCode::OK);
    assert_eq!(
        (window.limit("free"), window.remaining("free")),
        (5_000, 4_000)
    );

    // Back to the function's limit: what was used stays used.
    assert!(window.remove_limit("free"));
    assert_eq!(window.limit("free"), 100);
    assert_eq!(window.remaining("free"), 0);
    window.set_default_limit(20_000);
    window.refresh_limits();
    assert_eq!(window.remaining("free"), 19_000);
}

#[tokio::test]
async fn shadow_mode_admits_over_the_window_and_counts_it() {
    let window = TokenWindow::per_30_days(100);
    let layer = TenantTokenLayer::new(tracker(10_000))
        .shadow(ShadowMode::All)
        .window(window.clone());
    let (server, _streams) = app(layer.clone(), "").await;
    let client = client();

    for _ in 0..2 {
        let reply = call(&client, metered(&server, "/ok", "acme", 80)).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(layer.shadow_refusals(), 1);
    assert_eq!(window.remaining("acme"), 0, "what was admitted is charged");
}

#[tokio::test]
async fn a_guessed_output_allowance_is_cut_to_fit_the_window() {
    // No max_tokens: the estimator guesses the output (1,024 by default), which must not
    // make the request unadmittable under a smaller window.
    let window = TokenWindow::per_30_days(600);
    let layer = TenantTokenLayer::new(tracker(100_000))
        .estimator(OpenAiEstimator::new())
        .window(window.clone());
    let (server, _streams) = app(layer, "").await;
    let client = client();

    let body = r#"{"model":"m","messages":[{"role":"user","content":"Hi!"}]}"#;
    let request = Request::post(server.url("/ok"))
        .header("x-tenant-id", "acme")
        .header(CONTENT_TYPE, "application/json")
        .body(full(body))
        .unwrap();
    let reply = call(&client, request).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(window.remaining("acme"), 0);
}

/// A request to `/json` with an OpenAI body for `model`, `max_tokens` output, and a prompt
/// of about `prompt_bytes` bytes.
fn chat(server: &TestServer, tenant: &str, model: &str, max_tokens: u64) -> Request<ReqBody> {
    let body = serde_json::json!({
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "x".repeat(400)}],
    });
    Request::post(server.url("/json"))
        .header("x-tenant-id", tenant)
        .header(CONTENT_TYPE, "application/json")
        .body(full(body.to_string()))
        .unwrap()
}

#[tokio::test]
async fn input_and_output_windows_count_their_kind_and_weigh_cached_input() {
    // Reported: 1,000 input, 600 of them cached, 200 output.
    const USAGE: &str = r#"{"usage":{"prompt_tokens":1000,"completion_tokens":200,"total_tokens":1200,"prompt_tokens_details":{"cached_tokens":600}}}"#;
    let input = TokenWindow::per_30_days(100_000).input_only();
    let output = TokenWindow::per_30_days(100_000).output_only();
    let weighed = TokenWindow::per_30_days(100_000).cached_input_weight(0.5);
    let layer = TenantTokenLayer::new(tracker(100_000))
        .estimator(OpenAiEstimator::new())
        .read_usage(true)
        .window(input.clone())
        .window(output.clone())
        .window(weighed.clone());
    let (server, _streams) = app(layer, USAGE).await;
    let client = client();

    let reply = call(&client, chat(&server, "acme", "m", 300)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(input.remaining("acme"), 100_000 - 1_000);
    assert_eq!(output.remaining("acme"), 100_000 - 200);
    // 400 uncached + 600 cached at half + 200 output.
    assert_eq!(weighed.remaining("acme"), 100_000 - 400 - 300 - 200);
}

#[tokio::test]
async fn an_output_window_refuses_on_the_output_allowance_alone() {
    let output = TokenWindow::per_30_days(500).output_only();
    let layer = TenantTokenLayer::new(tracker(100_000))
        .estimator(OpenAiEstimator::new())
        .window(output.clone());
    let (server, _streams) = app(layer, "{}").await;
    let client = client();

    // A prompt of about 100 tokens and 450 output fits 500 output tokens; 600 never does.
    let fits = call(&client, chat(&server, "acme", "m", 450)).await;
    assert_eq!(fits.status, StatusCode::OK, "{}", fits.text());
    assert_eq!(output.remaining("acme"), 50);
    let never = call(&client, chat(&server, "acme", "m", 600)).await;
    assert_eq!(never.error_code(), "request_too_large_for_window");
}

#[tokio::test]
async fn spend_is_priced_per_model_and_refused_when_used_up() {
    // 0.01 a request: 1,000 output tokens at 10.0 a million, the prompt free.
    let prices = Prices::new().with("m", Price::per_million(0.0, 0.0, 10.0).unwrap());
    let spend = TokenWindow::spend_per_day(1.0, prices);
    let layer = TenantTokenLayer::new(tracker(1_000_000))
        .estimator(OpenAiEstimator::new())
        .window(spend.clone());
    let (server, _streams) = app(layer, "{}").await;
    let client = client();

    let mut admitted = 0;
    let refused = loop {
        let reply = call(&client, chat(&server, "acme", "m", 1_000)).await;
        if reply.status != StatusCode::OK {
            break reply;
        }
        admitted += 1;
        assert!(admitted <= 100, "more than 1.00 spent");
    };
    assert_eq!(admitted, 100);
    assert_eq!(refused.error_code(), "window_exceeded");
    assert!(
        refused.text().contains("spend per day"),
        "{}",
        refused.text()
    );
    // 0.01 at 1.00 a day refills in 864 s; no token headers for a spend window.
    assert_eq!(refused.header("retry-after"), Some("864"));
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), None);
    assert_eq!(spend.limit("acme"), 1_000_000);

    // A model without a price is refused, and charges nothing.
    let unpriced = call(&client, chat(&server, "beta", "other", 10)).await;
    assert_eq!(
        assert_openai_error(&unpriced, StatusCode::BAD_REQUEST),
        "unpriced_model"
    );
    assert_eq!(spend.remaining("beta"), 1_000_000);
}

#[tokio::test]
async fn spend_settles_on_the_reported_usage_and_a_default_price_covers_unknown_models() {
    const USAGE: &str =
        r#"{"usage":{"prompt_tokens":100,"completion_tokens":50,"total_tokens":150}}"#;
    let prices = Prices::new()
        .with("cheap", Price::per_million(1.0, 0.5, 2.0).unwrap())
        .with_default(Price::per_million(10.0, 5.0, 20.0).unwrap());
    let spend = TokenWindow::spend_per_30_days(100.0, prices);
    let layer = TenantTokenLayer::new(tracker(1_000_000))
        .estimator(OpenAiEstimator::new())
        .read_usage(true)
        .window(spend.clone());
    let (server, _streams) = app(layer, USAGE).await;
    let client = client();

    let reply = call(&client, chat(&server, "acme", "cheap", 2_000)).await;
    assert_eq!(reply.status, StatusCode::OK);
    // 100 × 1.0 + 50 × 2.0 millionths.
    assert_eq!(spend.remaining("acme"), 100_000_000 - 200);
    let reply = call(&client, chat(&server, "acme", "unknown", 2_000)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(spend.remaining("acme"), 100_000_000 - 200 - 2_000);
}

#[tokio::test]
async fn busy_traffic_never_gets_more_than_the_bucket_allows_at_any_instant() {
    // 1,000 tokens per 2 s: 500 a second, after a full bucket of 1,000.
    let (limit, rate) = (1_000.0, 500.0);
    let window = TokenWindow::new(1_000, Duration::from_secs(2));
    let admitted: Arc<std::sync::Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let seen = admitted.clone();
    let started = Instant::now();
    let app = Router::new()
        .route(
            "/ok",
            post(move |headers: http::HeaderMap| {
                let tokens = headers["x-token-estimate"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                seen.lock().unwrap().push((Instant::now(), tokens));
                async { "ok" }
            }),
        )
        .layer(TenantTokenLayer::new(tracker(1_000_000)).window(window));
    let server = serve(app).await;
    let client = pooled_client();

    // Eight clients send requests of 10 to 100 tokens as fast as they are answered, for
    // three periods.
    let clients = (0..8u64).map(|n| {
        let (client, url) = (client.clone(), server.url("/ok"));
        tokio::spawn(async move {
            let mut sent = 0u64;
            while started.elapsed() < Duration::from_secs(6) {
                let tokens = 10 + (n * 37 + sent * 53) % 91;
                let request = Request::post(&url)
                    .header("x-tenant-id", "acme")
                    .header("x-token-estimate", tokens)
                    .body(empty())
                    .unwrap();
                let status = call(&client, request).await.status;
                assert!(status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS);
                sent += 1;
            }
        })
    });
    for client in clients {
        client.await.unwrap();
    }

    // Whatever reached the service by any instant was charged by then: never more than
    // the full bucket plus what refilled since the test started.
    let mut admitted = admitted.lock().unwrap().clone();
    admitted.sort();
    let mut total = 0.0;
    for (at, tokens) in &admitted {
        total += *tokens as f64;
        let allowed = limit + rate * at.duration_since(started).as_secs_f64();
        assert!(
            total <= allowed,
            "{total} tokens by {at:?}, {allowed:.0} allowed"
        );
    }
    // And the refills were used: more than the first bucket got through.
    assert!(total > 2.0 * limit, "only {total} tokens admitted");
}

#[tokio::test]
async fn a_window_per_model_keeps_a_bucket_for_each_model_a_tenant_names() {
    let window = TokenWindow::per_30_days(1_000).per_model();
    window.set_limit("big", 10_000);
    let layer = TenantTokenLayer::new(tracker(100_000))
        .estimator(OpenAiEstimator::new())
        .window(window.clone());
    let (server, _streams) = app(layer, "{}").await;
    let client = client();

    // About 100 tokens of prompt and 500 of output a request: one fits a model's bucket.
    let first = call(&client, chat(&server, "acme", "model-a", 500)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    let again = call(&client, chat(&server, "acme", "model-a", 500)).await;
    assert_eq!(again.error_code(), "window_exceeded");
    let other = call(&client, chat(&server, "acme", "model-b", 500)).await;
    assert_eq!(
        other.status,
        StatusCode::OK,
        "another model, another bucket"
    );
    let a = window.remaining_for_model("acme", "model-a");
    assert!((300..=400).contains(&a), "{a} left for model-a");
    assert_eq!(window.remaining_for_model("acme", "model-c"), 1_000);
    // A tenant's own limit holds for each of its models.
    for model in ["model-a", "model-b"] {
        let reply = call(&client, chat(&server, "big", model, 500)).await;
        assert_eq!(reply.status, StatusCode::OK);
        let left = window.remaining_for_model("big", model);
        assert!((9_300..=9_400).contains(&left), "{left} left for {model}");
    }
}

#[tokio::test]
async fn buckets_full_again_are_dropped_so_a_spray_of_tenants_holds_no_memory() {
    use tower::ServiceExt;
    // Refilled a millisecond after each use: every bucket is full again by the next.
    let window = TokenWindow::new(1_000, Duration::from_millis(1));
    let app = Router::new()
        .route("/ok", post(|| async { "ok" }))
        .layer(TenantTokenLayer::new(tracker(1_000)).window(window.clone()));
    for n in 0..5_000 {
        let request = Request::post("/ok")
            .header("x-tenant-id", format!("one-off-{n}"))
            .header("x-token-estimate", "10")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        if n % 1_000 == 999 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let kept = window.tracked_buckets();
    assert!(
        kept < 2_500,
        "{kept} buckets kept for 5,000 one-off tenants"
    );
}

#[tokio::test]
async fn layers_sharing_a_tracker_each_charge_their_own_window() {
    use tower::ServiceExt;
    // One tracker under two routes, each with its own window: a tenant's requests on one
    // route must never be charged to the other's window, however often it returns.
    let tracker = tracker(100_000);
    let first = TokenWindow::per_day(10_000);
    let second = TokenWindow::per_day(10_000);
    let ok = || post(|| async { "ok" });
    let app = Router::new()
        .route("/first", ok())
        .route_layer(TenantTokenLayer::new(tracker.clone()).window(first.clone()))
        .merge(
            Router::new()
                .route("/second", ok())
                .route_layer(TenantTokenLayer::new(tracker).window(second.clone())),
        );
    let send = |path: &'static str, tokens: u64| {
        let request = Request::post(path)
            .header("x-tenant-id", "acme")
            .header("x-token-estimate", tokens.to_string())
            .body(axum::body::Body::empty())
            .unwrap();
        app.clone().oneshot(request)
    };
    for _ in 0..3 {
        assert_eq!(send("/first", 100).await.unwrap().status(), StatusCode::OK);
    }
    for _ in 0..2 {
        assert_eq!(
            send("/second", 1_000).await.unwrap().status(),
            StatusCode::OK
        );
    }
    assert_eq!(send("/first", 100).await.unwrap().status(), StatusCode::OK);
    // A day's window refills about a token every nine seconds: nothing in this test.
    let (first, second) = (first.remaining("acme"), second.remaining("acme"));
    assert!(
        (9_600..=9_601).contains(&first),
        "{first} left in the first"
    );
    assert!(
        (8_000..=8_001).contains(&second),
        "{second} left in the second"
    );
}

#[tokio::test]
async fn a_lone_window_describes_itself_on_admitted_responses() {
    let layer = TenantTokenLayer::new(tracker(10_000))
        .openai_ratelimit_headers(true)
        .window(TokenWindow::per_minute(6_000));
    let (server, _streams) = app(layer, "").await;
    let client = client();

    // The first request finds the tenant's bucket in the window, the next ones beside
    // the tenant's entry in the tracker: both describe it.
    for (n, left) in [(1, 5_400), (2, 4_800), (3, 4_200)] {
        let reply = call(&client, metered(&server, "/ok", "acme", 600)).await;
        assert_eq!(reply.status, StatusCode::OK, "request {n}");
        assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("6000"));
        let remaining: u64 = reply
            .header("x-ratelimit-remaining-tokens")
            .unwrap()
            .parse()
            .unwrap();
        // 100 tokens a second refill while the test runs.
        assert!(
            (left..left + 100).contains(&remaining),
            "request {n}: {remaining} left"
        );
    }
}
