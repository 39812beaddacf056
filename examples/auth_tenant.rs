//! The tenant from authentication, not from a header the client chooses.
//!
//! An auth middleware checks `Authorization: Bearer <key>` against a small in-memory table,
//! answers 401 itself for a missing or unknown key, and inserts the key's
//! [`TenantScope`] (tenant and user) into the request extensions. The
//! [`TenantTokenLayer`] runs *inside* it and takes the tenant from that scope, so an
//! `x-tenant-id` header sent by the client changes nothing. Each tenant may have 1,000
//! tokens in flight (estimate from `x-token-estimate`); the mock upstream takes 3 s.
//!
//! Keys: `sk-acme-alice` and `sk-acme-bob` (tenant `acme`), `sk-globex-carol` (`globex`).
//!
//! ```text
//! cargo run --example auth_tenant               # listens on 127.0.0.1:3003
//!
//! U=127.0.0.1:3003/v1/chat/completions
//! # 200: alice holds 600 of acme's 1,000 tokens for 3 s
//! curl -s -X POST $U -H 'authorization: Bearer sk-acme-alice' -H 'x-token-estimate: 600' &
//! sleep 0.2
//! # 429: bob claims to be globex, but his key says acme, and acme has 400 tokens left
//! curl -si -X POST $U -H 'authorization: Bearer sk-acme-bob' -H 'x-tenant-id: globex' \
//!   -H 'x-token-estimate: 600'
//! # 200 meanwhile: carol really is globex
//! curl -s -X POST $U -H 'authorization: Bearer sk-globex-carol' -H 'x-token-estimate: 600'
//! # 401: no key, or an unknown one; nothing is counted
//! curl -si -X POST $U -H 'x-tenant-id: acme' -H 'x-token-estimate: 1'
//! curl -si -X POST $U -H 'authorization: Bearer sk-nope' -H 'x-token-estimate: 1'
//! # once alice is done, bob's spoofed request is served, and charged to acme:
//! # {"ignored_x_tenant_id":"globex","reserved_tokens":600,"tenant":"acme","user":"bob"}
//! curl -s -X POST $U -H 'authorization: Bearer sk-acme-bob' -H 'x-tenant-id: globex' \
//!   -H 'x-token-estimate: 600'
//! ```

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use serde_json::{json, Value};
use tower::ServiceBuilder;
use tower_tenant_tokens::{
    MissingTenant, ReservationHandle, TenantScope, TenantTokenLayer, TenantTokenTracker,
};

const USAGE: &str =
    "usage: cargo run --example auth_tenant -- [--addr ADDR]  (default 127.0.0.1:3003)";

/// API key → (tenant, user). A real service looks up a hash of the key in its database.
const API_KEYS: [(&str, &str, &str); 3] = [
    ("sk-acme-alice", "acme", "alice"),
    ("sk-acme-bob", "acme", "bob"),
    ("sk-globex-carol", "globex", "carol"),
];

#[tokio::main]
async fn main() {
    let addr = common::start(3003, USAGE);

    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let tokens = TenantTokenLayer::new(tracker)
        .tenant_from_extension() // the TenantScope `authenticate` inserted
        // Only reachable if a route is ever mounted without `authenticate`: refuse with 401
        // rather than let the request through uncounted.
        .on_missing_tenant(MissingTenant::Unauthorized)
        .estimate_header(HeaderName::from_static("x-token-estimate"))
        .reservation_handle(true); // `chat` reconciles through it
                                   // ServiceBuilder runs its layers top to bottom: authentication first (outer), so the
                                   // token layer only ever sees verified tenants, and a bad key is never counted.
    let layers = ServiceBuilder::new()
        .layer(middleware::from_fn(authenticate))
        .layer(tokens);
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route_layer(layers);

    common::serve(addr, app).await;
}

/// Checks the bearer key; on success the request carries its [`TenantScope`].
async fn authenticate(mut request: Request, next: Next) -> Response {
    let key = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(&(_, tenant, user)) = API_KEYS.iter().find(|(k, ..)| Some(*k) == key) else {
        let error = json!({"error": {
            "message": "missing or invalid API key", "type": "invalid_request_error",
            "param": null, "code": "invalid_api_key",
        }});
        let headers = [(WWW_AUTHENTICATE, "Bearer")];
        return (StatusCode::UNAUTHORIZED, headers, Json(error)).into_response();
    };
    let scope = TenantScope::new(tenant).with_user(user);
    request.extensions_mut().insert(scope);
    next.run(request).await
}

/// The mock upstream: wait, then say who was charged (and what the client claimed).
async fn chat_completions(
    Extension(scope): Extension<TenantScope>,
    Extension(reservation): Extension<ReservationHandle>,
    headers: HeaderMap,
) -> Json<Value> {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let claimed = headers.get("x-tenant-id").and_then(|v| v.to_str().ok());
    Json(json!({
        "tenant": reservation.tenant_id(), "user": scope.user_id,
        "reserved_tokens": reservation.tokens(), "ignored_x_tenant_id": claimed,
    }))
}
