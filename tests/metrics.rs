//! What the layer records through the `metrics` facade, read back as Prometheus text from
//! `metrics-exporter-prometheus` (as the gateway's `/metrics` serves it), over real HTTP.
#![cfg(feature = "metrics")]

mod common;

use std::sync::{Arc, OnceLock};

use axum::routing::post;
use axum::{Extension, Router};
use common::*;
use http::StatusCode;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_tenant_tokens::metrics::TenantLabels;
use tower_tenant_tokens::{
    Price, Prices, ReservationHandle, ShadowMode, SharedBudget, TenantTokenLayer,
    TenantTokenTracker, TokenWindow,
};

/// One recorder for the whole test binary (a process has one); tests use distinct tenants.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("the only recorder")
    })
}

/// The value of the sample `series` (name and labels, as rendered), if present.
fn sample(series: &str) -> Option<f64> {
    let text = recorder().render();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// An app whose `/chat` handler reconciles to `x-used` (when sent), whose `/ok` handler
/// answers at once, and whose `/hold` handler streams events until the test ends the
/// stream.
async fn app(layer: TenantTokenLayer) -> (TestServer, Streams) {
    let (source, streams) = streams();
    let app = Router::new()
        .route(
            "/chat",
            post(
                |Extension(handle): Extension<ReservationHandle>, headers: http::HeaderMap| async move {
                    if let Some(used) = headers.get("x-used") {
                        handle.resize(used.to_str().unwrap().parse().unwrap());
                    }
                    "ok"
                },
            ),
        )
        .route("/ok", post(|| async { "ok" }))
        .route(
            "/hold",
            post(move || {
                let body = source.body();
                async move { ([(http::header::CONTENT_TYPE, "text/event-stream")], body) }
            }),
        )
        .layer(layer.reservation_handle(true));
    (serve(app).await, streams)
}

#[tokio::test]
async fn outcomes_tokens_in_flight_and_usage_are_recorded_per_tenant() {
    recorder();
    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let layer = TenantTokenLayer::new(tracker.clone())
        .metrics_tenant_labels(TenantLabels::All)
        .shadow(ShadowMode::tenants(|tenant| tenant == "m-trial"));
    let (server, mut streams) = app(layer).await;
    let client = client();

    // Admitted at 300, reconciled to 150 by the handler.
    let mut request = metered(&server, "/chat", "m-acme", 300);
    request
        .headers_mut()
        .insert("x-used", "150".parse().unwrap());
    assert_eq!(call(&client, request).await.status, StatusCode::OK);
    wait_until("the release", || tracker.in_flight("m-acme") == 0).await;
    let admitted = r#"tenant_tokens_requests_total{outcome="admitted",tenant="m-acme"}"#;
    assert_eq!(sample(admitted), Some(1.0));
    assert_eq!(
        sample(r#"tenant_tokens_reserved_sum{tenant="m-acme"}"#),
        Some(300.0)
    );
    assert_eq!(
        sample(r#"tenant_tokens_usage_ratio_sum{tenant="m-acme"}"#),
        Some(0.5)
    );
    assert_eq!(
        sample(r#"tenant_tokens_usage_ratio_count{tenant="m-acme"}"#),
        Some(1.0)
    );
    let in_flight = r#"tenant_tokens_in_flight{tenant="m-acme"}"#;
    assert_eq!(sample(in_flight), Some(0.0));

    // Held by a stream: the gauge shows it until the stream ends.
    let holding = send(&client, metered(&server, "/hold", "m-acme", 700)).await;
    let chunks = streams.next().await;
    assert_eq!(sample(in_flight), Some(700.0));
    // Refused over the cap; refused for a bad estimate (no tenant label: the request
    // was refused before its tenant counted).
    let refused = call(&client, metered(&server, "/chat", "m-acme", 400)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let over = r#"tenant_tokens_requests_total{outcome="refused",reason="rate_limit_exceeded",tenant="m-acme"}"#;
    assert_eq!(sample(over), Some(1.0));
    let bad = http::Request::post(server.url("/chat"))
        .header("x-tenant-id", "m-acme")
        .header("x-token-estimate", "many")
        .body(empty())
        .unwrap();
    assert_eq!(call(&client, bad).await.status, StatusCode::BAD_REQUEST);
    let invalid =
        r#"tenant_tokens_requests_total{outcome="refused",reason="invalid_token_estimate"}"#;
    assert!(sample(invalid).is_some_and(|n| n >= 1.0));
    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    wait_until("the stream's release", || tracker.in_flight("m-acme") == 0).await;
    assert_eq!(sample(in_flight), Some(0.0));

    // Shadowed: admitted, counted apart with the refusal it escaped.
    let trial = call(&client, metered(&server, "/chat", "m-trial", 5_000)).await;
    assert_eq!(trial.status, StatusCode::OK);
    let shadowed = r#"tenant_tokens_requests_total{outcome="shadowed",reason="request_too_large",tenant="m-trial"}"#;
    assert_eq!(sample(shadowed), Some(1.0));
}

#[tokio::test]
async fn bounded_tenant_labels_fold_the_rest_into_other() {
    recorder();
    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let layer = TenantTokenLayer::new(tracker).metrics_tenant_labels(TenantLabels::Bounded(1));
    let (server, _streams) = app(layer).await;
    let client = client();
    for tenant in ["b-first", "b-second", "b-third", "b-first"] {
        let reply = call(&client, metered(&server, "/ok", tenant, 10)).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let first = r#"tenant_tokens_requests_total{outcome="admitted",tenant="b-first"}"#;
    assert_eq!(sample(first), Some(2.0));
    let other = r#"tenant_tokens_requests_total{outcome="admitted",tenant="other"}"#;
    assert_eq!(sample(other), Some(2.0));
    let text = recorder().render();
    assert!(
        !text.contains("b-second") && !text.contains("b-third"),
        "{text}"
    );
}

#[tokio::test]
async fn waiting_requests_their_waits_sheds_and_budget_shares_are_recorded() {
    recorder();
    let tracker = Arc::new(TenantTokenTracker::new(10_000));
    let upstream = Arc::new(TenantTokenTracker::new(1_000));
    let layer = TenantTokenLayer::new(tracker)
        .metrics_tenant_labels(TenantLabels::All)
        .shared_budget(SharedBudget::new("w-upstream", upstream.clone()))
        .wait_for_capacity(std::time::Duration::from_secs(5))
        .priority_header(http::HeaderName::from_static("x-priority"));
    let (server, mut streams) = app(layer).await;
    let client = client();

    let holding = send(&client, metered(&server, "/hold", "w-holder", 1_000)).await;
    let chunks = streams.next().await;
    let waiting = tokio::spawn({
        let (client, request) = (client.clone(), metered(&server, "/ok", "w-a", 500));
        async move { call(&client, request).await }
    });
    let gauge = r#"tenant_tokens_waiting{class="standard"}"#;
    wait_until("the request to wait", || sample(gauge) == Some(1.0)).await;

    let mut shed = metered(&server, "/ok", "w-b", 100);
    shed.headers_mut()
        .insert("x-priority", "sheddable".parse().unwrap());
    assert_eq!(
        call(&client, shed).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let sheds = r#"tenant_tokens_requests_total{outcome="refused",reason="shed",tenant="w-b"}"#;
    assert_eq!(sample(sheds), Some(1.0));

    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    assert_eq!(waiting.await.unwrap().status, StatusCode::OK);
    assert_eq!(sample(gauge), Some(0.0));
    let waits = r#"tenant_tokens_wait_seconds_count{class="standard"}"#;
    assert_eq!(sample(waits), Some(1.0));
    let served = |tenant: &str| {
        sample(&format!(
            r#"tenant_tokens_budget_tokens_total{{tenant="{tenant}"}}"#
        ))
    };
    assert_eq!(served("w-holder"), Some(1_000.0));
    assert_eq!(served("w-a"), Some(500.0));
}

/// With usage read and allowances learned: a stream past its estimate is counted, its
/// actual ÷ estimated recorded (per tenant and route), and the allowance learned from it
/// shown per tenant and model.
#[cfg(feature = "openai")]
#[tokio::test]
async fn streams_that_outrun_their_estimate_and_learned_allowances_are_recorded() {
    use axum::http::header::CONTENT_TYPE;
    use axum::response::IntoResponse;
    use tower_tenant_tokens::{AdaptiveOutput, OpenAiEstimator};

    recorder();
    let tracker = Arc::new(TenantTokenTracker::new(100_000));
    let learned = Arc::new(AdaptiveOutput::new().warmup(1));
    let layer = TenantTokenLayer::new(tracker.clone())
        .metrics_route("chat")
        .metrics_tenant_labels(TenantLabels::All)
        .estimator(OpenAiEstimator::new())
        .adaptive_output(learned);
    let (source, mut streams) = streams();
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(move || {
                let body = source.body();
                async move { ([(CONTENT_TYPE, "text/event-stream")], body).into_response() }
            }),
        )
        .layer(layer);
    let server = serve(app).await;
    let client = client();

    // "user" + "Say hello." = 4 tokens of prompt, plus the default 1,024.
    let request = http::Request::post(server.url("/v1/chat/completions"))
        .header("x-tenant-id", "m-usage")
        .body(full(
            r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"Say hello."}]}"#,
        ))
        .unwrap();
    let response = send(&client, request).await;
    let chunks = streams.next().await;
    let mut body = response.into_body();
    let outran = r#"tenant_tokens_streams_outran_total{tenant="m-usage",route="chat"}"#;
    // 1,000 tokens of text: still within the estimate.
    let text = |bytes: usize| {
        let event = serde_json::json!({"choices": [{"delta": {"content": "a".repeat(bytes)}}]});
        bytes::Bytes::from(format!("data: {event}\n\n"))
    };
    chunks.send(text(4_000)).unwrap();
    assert!(next_data(&mut body).await.is_some());
    assert_eq!(tracker.in_flight("m-usage"), 1_028);
    assert_eq!(sample(outran), None);
    // 2,000 in all: past it, counted once however far it goes.
    for _ in 0..2 {
        chunks.send(text(2_000)).unwrap();
        assert!(next_data(&mut body).await.is_some());
    }
    assert_eq!(tracker.in_flight("m-usage"), 2_004);
    assert_eq!(sample(outran), Some(1.0));
    let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\
                 \"completion_tokens\":2052,\"total_tokens\":2056}}\n\n";
    chunks
        .send(bytes::Bytes::from_static(usage.as_bytes()))
        .unwrap();
    assert!(next_data(&mut body).await.is_some());
    drop(chunks);
    assert_eq!(next_data(&mut body).await, None);
    wait_until("the release", || tracker.in_flight("m-usage") == 0).await;

    // 2,056 held at the end of 1,028 estimated.
    assert_eq!(
        sample(r#"tenant_tokens_usage_ratio_sum{tenant="m-usage",route="chat"}"#),
        Some(2.0)
    );
    // 2,052 learned, plus a quarter.
    assert_eq!(
        sample(r#"tenant_tokens_output_allowance{tenant="m-usage",model="m"}"#),
        Some(2_565.0)
    );
}

#[tokio::test]
async fn a_complete_stream_that_reports_no_usage_settles_on_what_was_counted() {
    recorder();
    let tracker = Arc::new(TenantTokenTracker::new(10_000));
    let layer = TenantTokenLayer::new(tracker.clone())
        .estimator(tower_tenant_tokens::OpenAiEstimator::new())
        .ask_stream_usage(true)
        .metrics_tenant_labels(TenantLabels::All);
    let (server, mut streams) = app(layer).await;
    let client = client();
    // "user" + "Say hello." (14 bytes, 4 tokens) and a limit of 1,000.
    let body = r#"{"model":"m","stream":true,"max_tokens":1000,
                   "messages":[{"role":"user","content":"Say hello."}]}"#;
    let request = http::Request::post(server.url("/hold"))
        .header("x-tenant-id", "m-unreported")
        .header("content-type", "application/json")
        .body(full(body))
        .unwrap();
    let response = send(&client, request).await;
    let chunks = streams.next().await;
    assert_eq!(tracker.in_flight("m-unreported"), 1_004);
    // 400 bytes of text (100 tokens), the end, and no usage although it was asked for.
    let event =
        serde_json::json!({"choices": [{"index": 0, "delta": {"content": "abcd".repeat(100)}}]});
    chunks.send(format!("data: {event}\n\n").into()).unwrap();
    chunks.send("data: [DONE]\n\n".into()).unwrap();
    drop(chunks);
    assert_eq!(read(response).await.status, StatusCode::OK);
    wait_until("the release", || tracker.in_flight("m-unreported") == 0).await;
    let ratio = sample(r#"tenant_tokens_usage_ratio_sum{tenant="m-unreported"}"#);
    assert_eq!(ratio, Some(104.0 / 1_004.0), "settled on 4 + 100 of 1,004");
    let missing = r#"tenant_tokens_stream_usage_missing_total{tenant="m-unreported"}"#;
    assert_eq!(sample(missing), Some(1.0));
}

#[tokio::test]
async fn windows_record_what_they_charged_and_what_is_left() {
    recorder();
    let tracker = Arc::new(TenantTokenTracker::new(100_000));
    let tokens = TokenWindow::per_30_days(10_000);
    let price = Price::per_million(2.0, 1.0, 3.0).unwrap();
    let spend = TokenWindow::spend_per_30_days(1.0, Prices::new().with_default(price));
    let layer = TenantTokenLayer::new(tracker)
        .metrics_tenant_labels(TenantLabels::All)
        .window(tokens)
        .window(spend);
    let (server, _streams) = app(layer).await;
    let client = client();

    let mut request = metered(&server, "/chat", "w-acme", 1_000);
    request.headers_mut().insert("x-used", 400.into());
    assert_eq!(call(&client, request).await.status, StatusCode::OK);
    let remaining =
        r#"tenant_tokens_window_remaining{window="tokens per 30 days",tenant="w-acme"}"#;
    assert_eq!(sample(remaining), Some(9_000.0), "at admission");
    wait_until("the release to be recorded", || {
        let charged = r#"tenant_tokens_window_tokens_total{tenant="w-acme",window="tokens per 30 days",kind="unsplit"}"#;
        sample(charged) == Some(400.0)
    })
    .await;
    // 400 tokens not told apart, at the dearer price, 3.0 a million.
    let spent = r#"tenant_tokens_spend_total{tenant="w-acme",window="spend per 30 days"}"#;
    assert_eq!(sample(spent), Some(1_200.0));
}
