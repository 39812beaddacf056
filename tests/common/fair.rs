//! What the fair-share tests share, in one process and across replicas: the routes the
//! layer guards and the clients that keep them busy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use futures_util::StreamExt;

use super::*;

/// What every request reserves.
pub const TOKENS: u64 = 400;
/// The upstream's capacity: two requests at once.
pub const UPSTREAM: u64 = 1_000;

/// Who was admitted when, in the order the upstream saw them.
pub type Admitted = Arc<Mutex<Vec<(String, Instant)>>>;

/// `/stream` answers four chunks `chunk_ms` apart (recording who was admitted when in
/// `admitted`); `/hold` streams what the test sends through `source`.
pub fn routes(chunk_ms: u64, admitted: Admitted, source: StreamSource) -> Router {
    Router::new()
        .route(
            "/stream",
            post(move |headers: http::HeaderMap| {
                let tenant = headers["x-tenant-id"].to_str().unwrap().to_owned();
                admitted.lock().unwrap().push((tenant, Instant::now()));
                async move {
                    let chunks = futures_util::stream::iter(0..4).then(move |i| async move {
                        tokio::time::sleep(Duration::from_millis(chunk_ms)).await;
                        Ok::<_, std::convert::Infallible>(format!("data: {i}\n\n"))
                    });
                    Body::from_stream(chunks)
                }
            }),
        )
        .route(
            "/hold",
            post(move || {
                let body = source.body();
                async move { body }
            }),
        )
}

/// Keeps `loops` requests of `tenant` going on `server` until `stop`, each read to its
/// end; returns how long each waited for its response head.
pub async fn keep_busy(
    server: Arc<TestServer>,
    tenant: &'static str,
    loops: usize,
    stop: Arc<AtomicBool>,
) -> Vec<Duration> {
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let (server, stop) = (server.clone(), stop.clone());
            tokio::spawn(async move {
                let client = pooled_client();
                let mut waits = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let response = send(&client, metered(&server, "/stream", tenant, TOKENS)).await;
                    waits.push(sent.elapsed());
                    let reply = read(response).await;
                    assert_eq!(reply.status, StatusCode::OK, "{tenant}: {}", reply.text());
                }
                waits
            })
        })
        .collect();
    let mut waits = Vec::new();
    for task in tasks {
        waits.extend(task.await.unwrap());
    }
    waits
}

/// The median of `times`.
pub fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Sends one request of `tokens` by `tenant` in priority class `class` to `server`'s
/// `/stream`.
pub fn spawn_request(
    server: &TestServer,
    tenant: &'static str,
    tokens: u64,
    class: &'static str,
) -> tokio::task::JoinHandle<Reply> {
    let mut request = metered(server, "/stream", tenant, tokens);
    request
        .headers_mut()
        .insert("x-priority", class.parse().unwrap());
    tokio::spawn(async move { call(&client(), request).await })
}
