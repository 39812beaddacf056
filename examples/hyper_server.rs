//! The layer on a plain hyper 1 server, without axum.
//!
//! The tenant comes from `x-tenant-id` and the estimate from `x-token-estimate` (the
//! layer's defaults); every tenant may have 1,000 tokens in flight, and each answer streams
//! for about a second, holding its reservation until the last chunk is sent.
//!
//! ```text
//! cargo run --example hyper_server              # listens on 127.0.0.1:3001
//!
//! # 200, streamed
//! curl -N 127.0.0.1:3001 -H 'x-tenant-id: acme' -H 'x-token-estimate: 600'
//! # 429 with Retry-After while the first holds 600 of acme's 1,000 tokens
//! curl -sN 127.0.0.1:3001 -H 'x-tenant-id: acme' -H 'x-token-estimate: 600' -o /dev/null &
//! sleep 0.2; curl -i 127.0.0.1:3001 -H 'x-tenant-id: acme' -H 'x-token-estimate: 600'
//! # 413: larger than the cap; 400: no tenant or no estimate
//! curl -i 127.0.0.1:3001 -H 'x-tenant-id: acme' -H 'x-token-estimate: 5000'
//! curl -i 127.0.0.1:3001 -H 'x-token-estimate: 10'
//! ```

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_tenant_tokens::body::RequestBody;
use tower_tenant_tokens::{ReservationHandle, TenantTokenLayer, TenantTokenTracker};

/// The inner service: admitted requests only, with their reservation in the extensions.
async fn handle(
    request: Request<RequestBody<Incoming>>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let (tenant, tokens) = match request.extensions().get::<ReservationHandle>() {
        Some(reservation) => (reservation.tenant_id().to_owned(), reservation.tokens()),
        None => ("unmetered".to_owned(), 0), // not with this layer's settings
    };
    let chunks = stream::iter(1..=5).then(move |i| {
        let line = format!("{tenant}: chunk {i} of 5, {tokens} tokens reserved\n");
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok(Frame::data(Bytes::from(line)))
        }
    });
    Ok(Response::new(BoxBody::new(StreamBody::new(chunks))))
}

const USAGE: &str =
    "usage: cargo run --example hyper_server -- [--addr ADDR]  (default 127.0.0.1:3001)";

#[tokio::main]
async fn main() {
    let addr = common::start(3001, USAGE);

    let tracker = Arc::new(TenantTokenTracker::new(1_000));
    let service = ServiceBuilder::new()
        // x-tenant-id and x-token-estimate; the handle lets `handle` read the reservation.
        .layer(TenantTokenLayer::new(tracker).reservation_handle(true))
        .service_fn(handle);

    let listener = common::bind(addr).await;
    println!("try: curl -N {addr} -H 'x-tenant-id: acme' -H 'x-token-estimate: 600'");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!("accept failed: {error}");
                continue;
            }
        };
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let connection = auto::Builder::new(TokioExecutor::new());
            if let Err(error) = connection
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("connection ended: {error}");
            }
        });
    }
}
