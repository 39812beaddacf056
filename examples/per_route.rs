//! Per-route estimators and caps: one layer per route, on shared or separate trackers.
//!
//! - `POST /v1/chat/completions` estimates with [`OpenAiEstimator`] (prompt bytes / 4 plus
//!   `max_tokens`) and `POST /v1/embeddings` with `Content-Length / 4`. Both layers count
//!   against **one** tracker, so a tenant's chat and embeddings traffic draws from one cap
//!   of 4,096 tokens.
//! - `POST /v1/batch` has its **own** tracker with a cap of 100,000 tokens (estimate from
//!   `x-token-estimate`): batch work never eats into the interactive cap, nor the reverse.
//!
//! The mock upstream takes 3 s to answer, holding each reservation meanwhile.
//!
//! ```text
//! cargo run --example per_route                 # listens on 127.0.0.1:3002
//!
//! # a chat call holds 4,000 of acme's 4,096 shared tokens for 3 s...
//! curl -s 127.0.0.1:3002/v1/chat/completions -H 'x-tenant-id: acme' \
//!   -d '{"model":"m","max_tokens":4000,"messages":[]}' & sleep 0.2
//! # ...so a 500-byte embeddings call (about 130 tokens) gets 429
//! curl -si 127.0.0.1:3002/v1/embeddings -H 'x-tenant-id: acme' \
//!   -d "{\"input\":\"$(printf '%0500d' 0)\"}"
//! # while the batch route, on its own tracker, still admits acme: 200 (in 3 s)
//! curl -si -X POST 127.0.0.1:3002/v1/batch -H 'x-tenant-id: acme' \
//!   -H 'x-token-estimate: 50000' & sleep 0.2
//! # what each tracker holds: acme 4,000 in "shared", 50,000 in "batch"
//! curl -s 127.0.0.1:3002/admin/tenants
//! ```

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderName, Uri};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};
use tower_tenant_tokens::{
    Estimator, OpenAiEstimator, ReservationHandle, TenantTokenLayer, TenantTokenTracker,
};

const USAGE: &str =
    "usage: cargo run --example per_route -- [--addr ADDR]  (default 127.0.0.1:3002)";
const UPSTREAM_LATENCY: Duration = Duration::from_secs(3);

#[derive(Clone)]
struct Trackers {
    shared: Arc<TenantTokenTracker>,
    batch: Arc<TenantTokenTracker>,
}

#[tokio::main]
async fn main() {
    let addr = common::start(3002, USAGE);

    let trackers = Trackers {
        shared: Arc::new(TenantTokenTracker::new(4_096)),
        batch: Arc::new(TenantTokenTracker::new(100_000)),
    };
    // One layer per route, each with its own estimator. The tenant comes from a header to
    // keep the demo curl-friendly; in production take it from your authentication (see the
    // auth_tenant example).
    let tenant = HeaderName::from_static("x-tenant-id");
    let layer = |tracker: &Arc<TenantTokenTracker>| {
        TenantTokenLayer::new(tracker.clone())
            .tenant_header(tenant.clone())
            .reservation_handle(true) // the handlers reconcile through it
    };
    let chat = layer(&trackers.shared).estimator(OpenAiEstimator::new());
    let embeddings = layer(&trackers.shared).estimator(Estimator::content_length(4));
    let batch = layer(&trackers.batch).estimate_header(HeaderName::from_static("x-token-estimate"));

    // `MethodRouter::route_layer` runs the layer for POST only: a GET still gets axum's 405.
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(mock_upstream).route_layer(chat),
        )
        .route(
            "/v1/embeddings",
            post(mock_upstream).route_layer(embeddings),
        )
        .route("/v1/batch", post(mock_upstream).route_layer(batch))
        .route("/admin/tenants", get(tenants)) // no layer: needs no tenant
        .with_state(trackers);

    common::serve(addr, app).await;
}

/// The mock upstream of every route: wait, then say what was reserved, for whom.
async fn mock_upstream(
    uri: Uri,
    Extension(reservation): Extension<ReservationHandle>,
) -> Json<Value> {
    tokio::time::sleep(UPSTREAM_LATENCY).await;
    let (tenant, tokens) = (reservation.tenant_id(), reservation.tokens());
    Json(json!({"route": uri.path(), "tenant": tenant, "reserved_tokens": tokens}))
}

/// `GET /admin/tenants`: what each tracker holds, per tenant.
async fn tenants(State(trackers): State<Trackers>) -> Json<Value> {
    let list = |tracker: &TenantTokenTracker| {
        let mut snapshot = tracker.snapshot();
        snapshot.sort_by(|a, b| a.0.cmp(&b.0));
        let tenants = snapshot.into_iter().map(|(tenant, state)| {
            json!({"tenant": tenant, "in_flight": state.in_flight, "cap": state.cap})
        });
        tenants.collect::<Vec<_>>()
    };
    Json(json!({"shared": list(&trackers.shared), "batch": list(&trackers.batch)}))
}
