//! Windows over time kept in Redis for every replica, against a real `redis-server`: two
//! replicas (two layers, each with its own tracker and connection) share one bucket per
//! tenant, charged in the same call as the tenant's lease, all or nothing, and settled on
//! the usage reported.
#![cfg(all(feature = "redis", feature = "openai"))]

mod common;

use std::time::{Duration, Instant};

use axum::http::header::CONTENT_TYPE;
use axum::routing::post;
use axum::Router;
use common::redis_server::RedisServer;
use common::*;
use http::StatusCode;
use tower_tenant_tokens::redis::RedisTokenTracker;
use tower_tenant_tokens::{Price, Prices, TenantTokenLayer, TokenWindow};

/// Starts this test's server, or returns from the test where none is installed.
macro_rules! redis_or_skip {
    ($test:literal) => {
        match RedisServer::start($test) {
            Some(server) => server,
            None => return,
        }
    };
}

/// A replica: its own tracker (and connection) on `redis`, a layer with `windows`, and
/// an app whose `/ok` answers at once and whose `/json` answers `body` as JSON.
async fn replica(
    redis: &RedisServer,
    cap: u64,
    windows: &[TokenWindow],
    body: &'static str,
) -> (TestServer, RedisTokenTracker) {
    let tracker = RedisTokenTracker::builder(cap)
        .connect(redis.url())
        .expect("a valid redis url");
    let mut layer = TenantTokenLayer::new(tracker.clone()).read_usage(true);
    for window in windows {
        layer = layer.window(window.clone());
    }
    let app = Router::new()
        .route("/ok", post(|| async { "ok" }))
        .route(
            "/json",
            post(move || async move { ([(CONTENT_TYPE, "application/json")], body) }),
        )
        .layer(layer);
    (serve(app).await, tracker)
}

/// An upstream's answer reporting 100 tokens used: 40 of prompt, 60 of output.
const USAGE: &str = r#"{"usage":{"prompt_tokens":40,"completion_tokens":60,"total_tokens":100}}"#;

async fn remaining(tracker: &RedisTokenTracker, window: &TokenWindow, tenant: &str) -> u64 {
    tracker
        .window_remaining(window, tenant)
        .await
        .expect("redis answers")
}

#[tokio::test]
async fn two_replicas_share_one_bucket_and_concurrent_requests_cannot_get_past_it() {
    let redis = redis_or_skip!("two_replicas_share_one_bucket");
    let window = TokenWindow::per_minute(5_000);
    let windows = [window.clone()];
    let (first, tracker) = replica(&redis, 1_000_000, &windows, "").await;
    let (second, _) = replica(&redis, 1_000_000, &windows, "").await;
    burst_against_a_window(&[&first, &second], "acme", 100, 5_000).await;
    assert!(remaining(&tracker, &window, "acme").await < 100);
    // A refusal by the window took nothing from the tenant's cap.
    assert_eq!(tracker.in_flight("acme").await.unwrap(), 0);
}

#[tokio::test]
async fn a_refusal_on_one_replica_says_when_and_a_retry_then_is_admitted_on_the_other() {
    let redis = redis_or_skip!("a_refusal_says_when_across_replicas");
    // 100 tokens per 10 s: 10 a second.
    let window = TokenWindow::new(100, Duration::from_secs(10));
    let windows = [window.clone()];
    let (first, _) = replica(&redis, 10_000, &windows, "").await;
    let (second, _) = replica(&redis, 10_000, &windows, "").await;
    let client = client();

    let used = call(&client, metered(&first, "/ok", "acme", 100)).await;
    assert_eq!(used.status, StatusCode::OK);
    let refused = call(&client, metered(&second, "/ok", "acme", 30)).await;
    let refused_at = Instant::now();
    assert_eq!(refused.error_code(), "window_exceeded");
    assert_eq!(refused.header("retry-after"), Some("3"));
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("100"));
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), Some("0"));

    tokio::time::sleep_until((refused_at + Duration::from_secs(2)).into()).await;
    let early = call(&client, metered(&first, "/ok", "acme", 30)).await;
    assert_eq!(early.status, StatusCode::TOO_MANY_REQUESTS);
    tokio::time::sleep_until((refused_at + Duration::from_secs(3)).into()).await;
    let retried = call(&client, metered(&first, "/ok", "acme", 30)).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.text());
}

#[tokio::test]
async fn reported_usage_settles_the_charge_in_redis() {
    let redis = redis_or_skip!("reported_usage_settles_the_charge_in_redis");
    let window = TokenWindow::per_30_days(100_000);
    let windows = std::slice::from_ref(&window);
    let (server, tracker) = replica(&redis, 1_000_000, windows, USAGE).await;
    let client = client();

    for _ in 0..5 {
        let reply = call(&client, metered(&server, "/json", "acme", 1_000)).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    // Each settles in the background after its response: 900 back, five times.
    let deadline = Instant::now() + WAIT;
    loop {
        let left = remaining(&tracker, &window, "acme").await;
        if left == 100_000 - 5 * 100 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} left");
        tokio::time::sleep(POLL).await;
    }
    // A request larger than the limit is 413, and charges nothing.
    let reply = call(&client, metered(&server, "/ok", "acme", 100_001)).await;
    assert_eq!(reply.error_code(), "request_too_large_for_window");
    assert_eq!(remaining(&tracker, &window, "acme").await, 100_000 - 500);
}

#[tokio::test]
async fn all_windows_or_none_and_spend_in_redis() {
    let redis = redis_or_skip!("all_windows_or_none_and_spend_in_redis");
    let tokens = TokenWindow::per_30_days(10_000);
    // 0.01 for 1,000 unsplit tokens at 10.0 a million.
    let price = Price::per_million(10.0, 10.0, 10.0).unwrap();
    let spend = TokenWindow::spend_per_30_days(0.02, Prices::new().with_default(price));
    let windows = [tokens.clone(), spend.clone()];
    let (server, tracker) = replica(&redis, 100_000, &windows, "").await;
    let client = client();

    for _ in 0..2 {
        let reply = call(&client, metered(&server, "/ok", "acme", 1_000)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let refused = call(&client, metered(&server, "/ok", "acme", 1_000)).await;
    assert_eq!(refused.error_code(), "window_exceeded");
    assert!(
        refused.text().contains("spend per 30 days"),
        "{}",
        refused.text()
    );
    // The token window took nothing for the refused request.
    assert_eq!(remaining(&tracker, &tokens, "acme").await, 10_000 - 2_000);
    assert_eq!(remaining(&tracker, &spend, "acme").await, 0);
    assert_eq!(tracker.in_flight("acme").await.unwrap(), 0);
}

#[tokio::test]
async fn the_bucket_sits_beside_the_tenants_leases_and_expires_once_full_again() {
    let redis = redis_or_skip!("the_bucket_sits_beside_the_leases");
    let window = TokenWindow::new(1_000, Duration::from_secs(1));
    let (server, _) = replica(&redis, 100_000, &[window], "").await;
    let client = client();

    let reply = call(&client, metered(&server, "/ok", "acme", 500)).await;
    assert_eq!(reply.status, StatusCode::OK);
    // Beside the tenant's leases, under the same hash tag (one cluster slot).
    let bucket = "tenant-tokens:{t:acme}:w:tokens-per-1s";
    assert_eq!(redis.command(&format!("EXISTS {bucket}")), ":1");
    assert_eq!(redis.command("EXISTS tenant-tokens:{t:acme}:tokens"), ":1");
    // Half a bucket refills in half a second; the key goes with it (a missing key is a
    // full bucket).
    let deadline = Instant::now() + WAIT;
    while redis.command(&format!("EXISTS {bucket}")) != ":0" {
        assert!(
            Instant::now() < deadline,
            "the bucket's key outlived its refill"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test]
async fn while_redis_is_down_the_windows_count_in_this_process() {
    let mut redis = redis_or_skip!("while_redis_is_down_the_windows_count_here");
    let window = TokenWindow::per_30_days(1_000);
    let tracker = RedisTokenTracker::builder(100_000)
        .on_unavailable(tower_tenant_tokens::redis::FailurePolicy::FailOpen)
        .call_timeout(Duration::from_millis(250))
        .connect(redis.url())
        .expect("a valid redis url");
    let layer = TenantTokenLayer::new(tracker).window(window.clone());
    let app = Router::new()
        .route("/ok", post(|| async { "ok" }))
        .layer(layer);
    let server = serve(app).await;
    let client = client();

    redis.kill();
    // Admitted uncounted by the failure policy, but still charged to the window, here.
    let first = call(&client, metered(&server, "/ok", "acme", 600)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert_eq!(window.remaining("acme"), 400);
    let second = call(&client, metered(&server, "/ok", "acme", 600)).await;
    assert_eq!(second.error_code(), "window_exceeded");
}

/// Script calls Redis has run since `CONFIG RESETSTAT`.
async fn script_calls(redis: &RedisServer) -> u64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    stats
        .lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| {
            line.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test]
async fn a_window_adds_no_call_to_redis() {
    let redis = redis_or_skip!("a_window_adds_no_call_to_redis");
    let window = TokenWindow::per_30_days(1_000_000);
    let (plain, _) = replica(&redis, 1_000_000, &[], "").await;
    let (windowed, _) = replica(&redis, 1_000_000, std::slice::from_ref(&window), "").await;
    let client = client();
    let mut calls = Vec::new();
    for server in [&plain, &windowed] {
        // Warm: the scripts loaded, the connections made.
        call(&client, metered(server, "/ok", "warm", 1)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        redis.command("CONFIG RESETSTAT");
        for _ in 0..20 {
            let reply = call(&client, metered(server, "/ok", "acme", 100)).await;
            assert_eq!(reply.status, StatusCode::OK);
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // the last release
        calls.push(script_calls(&redis).await);
    }
    let (without, with) = (calls[0], calls[1]);
    // One call to reserve (and the window's charge with it), one to release, each request;
    // a window charged in a call of its own would add 20.
    assert!(without >= 20, "{without} calls without a window");
    assert!(
        with <= without + 2,
        "{with} calls with a window, {without} without"
    );
}

#[tokio::test]
async fn a_window_per_model_keeps_each_models_bucket_in_redis() {
    let redis = redis_or_skip!("a_window_per_model_keeps_each_models_bucket_in_redis");
    let window = TokenWindow::per_30_days(1_000).per_model();
    let tracker = RedisTokenTracker::builder(100_000)
        .connect(redis.url())
        .expect("a valid redis url");
    let layer = TenantTokenLayer::new(tracker.clone())
        .estimator(tower_tenant_tokens::OpenAiEstimator::new())
        .window(window.clone());
    let app = Router::new()
        .route("/ok", post(|| async { "ok" }))
        .layer(layer);
    let server = serve(app).await;
    let client = client();
    let chat = |model: &str| {
        let body = serde_json::json!({"model": model, "max_tokens": 600, "messages": []});
        http::Request::post(server.url("/ok"))
            .header("x-tenant-id", "acme")
            .header(CONTENT_TYPE, "application/json")
            .body(full(body.to_string()))
            .unwrap()
    };

    assert_eq!(call(&client, chat("model-a")).await.status, StatusCode::OK);
    let again = call(&client, chat("model-a")).await;
    assert_eq!(again.error_code(), "window_exceeded");
    assert_eq!(call(&client, chat("model-b")).await.status, StatusCode::OK);
    for model in ["model-a", "model-b"] {
        let left = tracker
            .window_remaining_for_model(&window, "acme", model)
            .await
            .unwrap();
        assert!(left <= 400, "{left} left for {model}");
    }
    let bucket = "tenant-tokens:{t:acme}:w:tokens-per-30-days-per-model-m:model-a";
    assert_eq!(redis.command(&format!("EXISTS {bucket}")), ":1");
}

#[tokio::test]
async fn a_limit_of_nothing_refuses_everything_and_breaks_nothing() {
    let redis = redis_or_skip!("a_limit_of_nothing_refuses_everything");
    let window = TokenWindow::per_30_days(1_000);
    window.set_limit("blocked", 0);
    let windows = std::slice::from_ref(&window);
    let (server, tracker) = replica(&redis, 100_000, windows, USAGE).await;
    let client = client();

    let refused = call(&client, metered(&server, "/ok", "blocked", 1)).await;
    assert_eq!(refused.error_code(), "request_too_large_for_window");
    // Nothing estimated fits nothing; the usage it reports then charges a bucket that can
    // hold nothing, which must not fail the calls batched with it.
    let free = call(&client, metered(&server, "/json", "blocked", 0)).await;
    assert_eq!(free.status, StatusCode::OK);
    for _ in 0..3 {
        let reply = call(&client, metered(&server, "/ok", "acme", 10)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    assert_eq!(tracker.stats().unavailable, 0);
    assert_eq!(remaining(&tracker, &window, "blocked").await, 0);
    // No key is left behind for a bucket that holds nothing (nor one without an expiry).
    let bucket = "tenant-tokens:{t:blocked}:w:tokens-per-30-days";
    assert_eq!(redis.command(&format!("EXISTS {bucket}")), ":0");
}

#[tokio::test]
async fn admitted_responses_say_what_the_shared_bucket_held_after_their_charge() {
    let redis = redis_or_skip!("admitted_responses_say_what_the_shared_bucket_held");
    let window = TokenWindow::per_minute(6_000);
    let tracker = RedisTokenTracker::builder(100_000)
        .connect(redis.url())
        .expect("a valid redis url");
    let layer = TenantTokenLayer::new(tracker)
        .openai_ratelimit_headers(true)
        .window(window);
    let app = Router::new()
        .route("/ok", post(|| async { "ok" }))
        .layer(layer);
    let server = serve(app).await;
    let client = client();

    let first = call(&client, metered(&server, "/ok", "acme", 600)).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("6000"));
    assert_eq!(first.header("x-ratelimit-remaining-tokens"), Some("5400"));
    // 600 tokens at 100 a second: full again in 6 s.
    assert_eq!(first.header("x-ratelimit-reset-tokens"), Some("6s"));
    let second = call(&client, metered(&server, "/ok", "acme", 400)).await;
    let left: u64 = second
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (5_000..=5_010).contains(&left),
        "{left} left after 1,000 of 6,000"
    );
}
