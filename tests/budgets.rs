//! Shared budgets over real HTTP: a cap every tenant draws from next to its own, one per
//! model from the JSON body, all or nothing, released and reconciled together.

mod common;

use std::sync::Arc;

use axum::routing::post;
use axum::{Extension, Router};
use common::*;
use http::StatusCode;
use tower_tenant_tokens::{
    OpenAiEstimator, ReservationHandle, ShadowMode, SharedBudget, TenantTokenLayer,
    TenantTokenTracker,
};

struct App {
    server: TestServer,
    tenants: Arc<TenantTokenTracker>,
    streams: Streams,
}

/// `/hold` streams until the test ends it, after resizing to `x-used` if sent; `/grow`
/// grows its reservation within the caps to `x-used` and says how that went.
async fn app(tenant_cap: u64, configure: impl FnOnce(TenantTokenLayer) -> TenantTokenLayer) -> App {
    let tenants = Arc::new(TenantTokenTracker::new(tenant_cap));
    let (source, streams) = streams();
    let used = |headers: &http::HeaderMap| -> Option<u64> {
        headers.get("x-used")?.to_str().ok()?.parse().ok()
    };
    let router =
        Router::new()
            .route(
                "/hold",
                post(
                    move |Extension(handle): Extension<ReservationHandle>,
                          headers: http::HeaderMap| {
                        if let Some(used) = used(&headers) {
                            handle.resize(used);
                        }
                        let body = source.body();
                        async move { body }
                    },
                ),
            )
            .route(
                "/grow",
                post(
                    move |Extension(handle): Extension<ReservationHandle>,
                          headers: http::HeaderMap| async move {
                        match handle.try_resize(used(&headers).unwrap()) {
                            Ok(()) => format!("ok {}", handle.tokens()),
                            Err(error) => format!("{} {}", error.code(), handle.tokens()),
                        }
                    },
                ),
            )
            .layer(configure(
                TenantTokenLayer::new(tenants.clone()).reservation_handle(true),
            ));
    App {
        server: serve(router).await,
        tenants,
        streams,
    }
}

/// `request`, telling the handler it used `tokens`.
fn used(mut request: http::Request<ReqBody>, tokens: u64) -> http::Request<ReqBody> {
    let value = tokens.to_string().parse().unwrap();
    request.headers_mut().insert("x-used", value);
    request
}

/// A `/grow` request of tenant `acme` with a JSON `body` (for the body estimator).
fn chat(server: &TestServer, body: &str) -> http::Request<ReqBody> {
    http::Request::post(server.url("/grow"))
        .header("x-tenant-id", "acme")
        .body(full(body.to_owned()))
        .unwrap()
}

/// An app estimating OpenAI bodies, with one budget per model in `models`.
async fn per_model_app(models: &Arc<TenantTokenTracker>) -> App {
    let budget = SharedBudget::per_model(models.clone());
    app(10_000, |layer| {
        layer
            .estimator(OpenAiEstimator::new())
            .shared_budget(budget)
    })
    .await
}

#[tokio::test]
async fn an_upstream_budget_caps_all_tenants_together_all_or_nothing() {
    let upstream = Arc::new(TenantTokenTracker::new(1_000));
    let budget = SharedBudget::new("upstream", upstream.clone());
    let mut app = app(2_000, |layer| layer.shared_budget(budget)).await;
    let client = client();

    let holding = send(&client, metered(&app.server, "/hold", "acme", 600)).await;
    let chunks = app.streams.next().await;
    assert_eq!(upstream.in_flight("upstream"), 600);

    // globex is far under its own cap, but the upstream has only 400 left.
    let refused = call(&client, metered(&app.server, "/grow", "globex", 500)).await;
    assert_eq!(
        assert_openai_error(&refused, StatusCode::TOO_MANY_REQUESTS),
        "budget_exceeded"
    );
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("upstream"),
        "the refusal names the budget: {message}"
    );
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), Some("400"));
    assert!(refused.header("retry-after").is_some());
    assert_eq!(
        app.tenants.in_flight("globex"),
        0,
        "nothing partial is kept"
    );
    assert_eq!(upstream.in_flight("upstream"), 600);

    // Within the tenant's cap, never within the budget's: 413 naming the budget.
    let too_large = call(&client, metered(&app.server, "/grow", "globex", 1_500)).await;
    assert_eq!(
        assert_openai_error(&too_large, StatusCode::PAYLOAD_TOO_LARGE),
        "request_too_large_for_budget"
    );
    assert_eq!(app.tenants.in_flight("globex"), 0);

    // What is left fits; growth past the budget is refused and changes nothing.
    let grow = used(metered(&app.server, "/grow", "globex", 300), 500);
    assert_eq!(call(&client, grow).await.text(), "budget_exceeded 300");
    let grow = used(metered(&app.server, "/grow", "globex", 300), 400);
    assert_eq!(call(&client, grow).await.text(), "ok 400");

    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    assert_eq!(upstream.in_flight("upstream"), 0, "released together");
    assert_eq!(app.tenants.in_flight("acme"), 0);
    assert_eq!(app.tenants.in_flight("globex"), 0);
}

#[tokio::test]
async fn a_reconciled_reservation_resizes_its_budgets_too() {
    let upstream = Arc::new(TenantTokenTracker::new(1_000));
    let budget = SharedBudget::new("upstream", upstream.clone());
    let mut app = app(2_000, |layer| layer.shared_budget(budget)).await;
    let client = client();
    let holding = send(
        &client,
        used(metered(&app.server, "/hold", "acme", 900), 150),
    )
    .await;
    let chunks = app.streams.next().await;
    assert_eq!(app.tenants.in_flight("acme"), 150);
    assert_eq!(upstream.in_flight("upstream"), 150);
    let fits = used(metered(&app.server, "/grow", "globex", 850), 850);
    assert_eq!(
        call(&client, fits).await.text(),
        "ok 850",
        "the shrink freed the budget"
    );
    drop(chunks);
    assert_eq!(read(holding).await.status, StatusCode::OK);
    assert_eq!(upstream.in_flight("upstream"), 0);
}

#[tokio::test]
async fn per_model_budgets_come_from_the_json_body() {
    let models = Arc::new(TenantTokenTracker::new(100_000));
    models.set_cap("big-model", 1_500);
    let app = per_model_app(&models).await;
    let client = client();
    let chat = |tenant: &str, model: &str| {
        let body = format!(r#"{{"model":"{model}","max_tokens":1000,"messages":[]}}"#);
        http::Request::post(app.server.url("/hold"))
            .header("x-tenant-id", tenant)
            .body(full(body))
            .unwrap()
    };
    let mut streams = app.streams;
    let holding = send(&client, chat("acme", "big-model")).await;
    assert_eq!(holding.status(), StatusCode::OK);
    let chunks = streams.next().await;
    assert_eq!(models.in_flight("big-model"), 1_000);

    // Another tenant, the same model: its budget is spent.
    let refused = call(&client, chat("globex", "big-model")).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("big-model"));
    // Another model has its own budget.
    let other = send(&client, chat("globex", "small-model")).await;
    assert_eq!(other.status(), StatusCode::OK);
    let other_chunks = streams.next().await;
    assert_eq!(models.in_flight("small-model"), 1_000);

    drop((chunks, other_chunks));
    assert_eq!(read(holding).await.status, StatusCode::OK);
    assert_eq!(read(other).await.status, StatusCode::OK);
    assert_eq!(models.in_flight("big-model"), 0);
    assert_eq!(models.in_flight("small-model"), 0);
    assert_eq!(app.tenants.in_flight("acme"), 0);
}

#[tokio::test]
async fn shadow_mode_admits_over_a_budget_and_counts_it() {
    let upstream = Arc::new(TenantTokenTracker::new(100));
    let budget = SharedBudget::new("upstream", upstream.clone());
    let layer = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(1_000)))
        .reservation_handle(true)
        .shared_budget(budget)
        .shadow(ShadowMode::All);
    let app = Router::new()
        .route("/ok", post(|| async { "ok" }))
        .layer(layer.clone());
    let server = serve(app).await;
    let reply = call(&client(), metered(&server, "/ok", "acme", 500)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(layer.shadow_refusals(), 1);
    assert_eq!(upstream.tenant_state("upstream").unwrap().high_water, 500);
    assert_eq!(upstream.in_flight("upstream"), 0);
}

#[tokio::test]
async fn a_body_without_a_model_string_draws_from_no_model_budget() {
    let models = Arc::new(TenantTokenTracker::new(1));
    let app = per_model_app(&models).await;
    let client = client();
    for body in [
        r#"{"max_tokens":10,"messages":[]}"#,
        r#"{"model":42,"max_tokens":10,"messages":[]}"#,
        r#"{"model":null,"max_tokens":10,"messages":[]}"#,
        r#"{"model":{"name":"m"},"max_tokens":10,"messages":[]}"#,
    ] {
        let reply = call(&client, used(chat(&app.server, body), 10)).await;
        assert_eq!(reply.text(), "ok 10", "{body}");
    }
    // A model string, even repeated, draws from its budget (the first one counts).
    let body = r#"{"model":"m","model":"n","max_tokens":10,"messages":[]}"#;
    let refused = call(&client, used(chat(&app.server, body), 10)).await;
    assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`m`"));
    assert_eq!(models.tracked_tenants(), 0);
}

#[tokio::test]
async fn a_long_model_name_draws_from_the_budget_of_its_bounded_prefix() {
    let models = Arc::new(TenantTokenTracker::new(100_000));
    // 401 bytes, and the bound falls inside a two-byte character: the key ends before it.
    let prefix = format!("a{}", "é".repeat(200));
    assert!(!prefix.is_char_boundary(SharedBudget::MAX_MODEL_KEY_LEN));
    let bounded = &prefix[..SharedBudget::MAX_MODEL_KEY_LEN - 1];
    models.set_cap(bounded, 5);
    let app = per_model_app(&models).await;
    let body = format!(r#"{{"model":"{prefix}-and-a-tail","max_tokens":10,"messages":[]}}"#);
    let refused = call(&client(), used(chat(&app.server, &body), 10)).await;
    assert_eq!(
        refused.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "the bounded key's cap applies"
    );
    assert_eq!(
        models.tracked_tenants(),
        1,
        "only the configured, bounded key is kept"
    );
}
