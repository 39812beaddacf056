//! A request-rate limit (tower_governor) and the in-flight token cap, stacked both ways.
//!
//! Both key on the tenant in `x-tenant-id`. Per tenant: 5 requests at once, then one more
//! every 2 s (30 a minute), and 1,000 tokens in flight (estimate from `x-token-estimate`).
//! Each answer streams 5 chunks over 2.5 s, holding its reservation to the last one. The two
//! route groups have the same limits, on their own limiters, in opposite orders:
//!
//! - `/governor-first/stream`: the rate limit runs first. A request over the rate never
//!   reserves tokens; but a request then refused for tokens has used up a rate slot.
//! - `/tokens-first/stream`: the token cap runs first. A request refused for tokens does
//!   not use up the rate quota; but one refused by the rate limit held its reservation for
//!   the moment it took to refuse it. Pick this when tokens are the scarcer resource.
//!
//! ```text
//! cargo run --example stacked                   # listens on 127.0.0.1:3004
//!
//! G=127.0.0.1:3004/governor-first/stream   # then all again with G=…/tokens-first/stream
//! # 200, streamed: holds 800 of acme's 1,000 tokens for 2.5 s, and uses one rate slot
//! curl -sN -X POST $G -H 'x-tenant-id: acme' -H 'x-token-estimate: 800' & sleep 0.2
//! # 6 requests of 400 tokens meanwhile. governor-first: 4 token 429s (JSON, "type":"tokens"),
//! # each using a rate slot, then the rate limit's "Too Many Requests! Wait for 1s".
//! # tokens-first: 6 token 429s, and the rate limiter never saw them
//! for i in 1 2 3 4 5 6; do
//!   curl -s -X POST $G -H 'x-tenant-id: acme' -H 'x-token-estimate: 400'; echo; done
//! # 4 requests of 50 tokens, which fit beside the stream: governor-first 429 (no rate
//! # slots left), tokens-first 200
//! for i in 1 2 3 4; do curl -s -X POST $G -H 'x-tenant-id: acme' \
//!   -H 'x-token-estimate: 50' -o /dev/null -w '%{http_code} ' & done; wait
//! ```

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Extension, Router};
use futures_util::{stream, StreamExt};
use governor::middleware::NoOpMiddleware;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};
use tower_tenant_tokens::{ReservationHandle, TenantTokenLayer, TenantTokenTracker};

const USAGE: &str = "usage: cargo run --example stacked -- [--addr ADDR]  (default 127.0.0.1:3004)";

/// The rate limiter's key: the same `x-tenant-id` the token layer reads.
#[derive(Clone)]
struct TenantKey;

impl KeyExtractor for TenantKey {
    type Key = String;

    fn extract<T>(&self, request: &Request<T>) -> Result<String, GovernorError> {
        let tenant = request.headers().get("x-tenant-id");
        match tenant.and_then(|value| value.to_str().ok()) {
            Some(tenant) if !tenant.is_empty() => Ok(tenant.to_owned()),
            _ => Err(GovernorError::Other {
                code: StatusCode::BAD_REQUEST,
                msg: Some("missing x-tenant-id".to_owned()),
                headers: None,
            }),
        }
    }
}

/// 5 requests at once per tenant, then one every 2 s. The limiter keeps a state per key:
/// forget the idle ones now and then, or a spray of tenant ids grows it without bound.
fn rate_limit() -> GovernorLayer<TenantKey, NoOpMiddleware, Body> {
    let config = GovernorConfigBuilder::default()
        .key_extractor(TenantKey)
        .period(Duration::from_secs(2))
        .burst_size(5)
        .finish()
        .expect("period and burst size are not zero");
    let limiter = config.limiter().clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            limiter.retain_recent();
        }
    });
    GovernorLayer::new(config)
}

#[tokio::main]
async fn main() {
    let addr = common::start(3004, USAGE);

    // x-tenant-id and x-token-estimate are the layer's defaults; each group its own tracker.
    // The handle lets `stream_answer` reconcile.
    let tokens =
        || TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(1_000))).reservation_handle(true);

    // With axum, the layer added *last* runs *first*. Each `route_layer` call also turns the
    // refusals of the layers below it into plain axum responses, as tower_governor needs (its
    // inner service's response must be `From<GovernorError>`).
    let governor_first = Router::new()
        .route("/governor-first/stream", post(stream_answer))
        .route_layer(tokens()) // second: only requests within the rate reserve tokens
        .route_layer(rate_limit()); // first: spends a slot even if tokens then refuse
    let tokens_first = Router::new()
        .route("/tokens-first/stream", post(stream_answer))
        .route_layer(rate_limit()) // second: only requests within the cap use a rate slot
        .route_layer(tokens()); // first: reserves even if the rate then refuses, briefly
    let app = governor_first.merge(tokens_first);

    common::serve(addr, app).await;
}

/// The mock upstream: 5 chunks, one every 500 ms; the reservation ends with the last one.
async fn stream_answer(Extension(reservation): Extension<ReservationHandle>) -> Body {
    let (tenant, tokens) = (reservation.tenant_id().to_owned(), reservation.tokens());
    let chunks = stream::iter(1..=5).then(move |i| {
        let line = format!("{tenant}: chunk {i} of 5, {tokens} tokens reserved\n");
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok::<_, Infallible>(Bytes::from(line))
        }
    });
    Body::from_stream(chunks)
}
