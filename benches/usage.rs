//! The usage reader's cost per server-sent event frame, against the same layer passing
//! the body through without reading it.
//!
//! `cargo bench --bench usage`: each iteration is one admitted request whose streamed
//! response (an OpenAI chat stream of `FRAMES` content chunks, one per body frame, then a
//! usage chunk) is polled to its end; the layer with
//! [`read_usage`](tower_tenant_tokens::TenantTokenLayer::read_usage) on against the same
//! layer with it off. The difference, divided by the frames, is the reader's cost per
//! frame. After the timings it counts the heap allocations of one request in each mode
//! (a counting global allocator): the reader's own must not grow with the frames.
#![allow(clippy::incompatible_msrv)] // benches run on a current toolchain (`Waker::noop`)

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{Request, Response};
use http_body::Body;
use http_body_util::{Full, StreamBody};
use tower::{Layer, Service};
use tower_tenant_tokens::{OpenAiEstimator, TenantTokenLayer, TenantTokenTracker};

const FRAMES: usize = 256;

/// The system allocator, counting allocations.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        System.realloc(ptr, layout, size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type Frames = StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>,
>;

/// The upstream's stream: `FRAMES` chunks of a few words each, then the usage chunk.
fn frames() -> Vec<Bytes> {
    let mut frames: Vec<Bytes> = (0..FRAMES)
        .map(|i| {
            let event = serde_json::json!({
                "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": {"content": format!(" word{i}")},
                             "finish_reason": null}],
            });
            Bytes::from(format!("data: {event}\n\n"))
        })
        .collect();
    frames.push(Bytes::from_static(
        b"data: {\"id\":\"chatcmpl-bench\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\
          \"completion_tokens\":512,\"total_tokens\":516}}\n\ndata: [DONE]\n\n",
    ));
    frames
}

/// Sends one request through `service` and polls its response body to the end.
fn run_one<S, B>(service: &mut S, request: Request<Full<Bytes>>)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(matches!(service.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let response = match pin!(service.call(request)).poll(&mut cx) {
        Poll::Ready(Ok(response)) => response,
        _ => panic!("response not ready"),
    };
    let mut body = pin!(response.into_body());
    loop {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => drop(std::hint::black_box(frame)),
            Poll::Ready(None) => break,
            _ => panic!("frame not ready"),
        }
    }
}

fn request() -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("x-tenant-id", "tenant-a")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello."}]}"#,
        )))
        .expect("valid request")
}

fn bench(c: &mut Criterion) {
    let frames = frames();
    let upstream = move |_request| {
        let body: Frames = StreamBody::new(futures_util::stream::iter(
            frames
                .iter()
                .map(|frame| Ok(http_body::Frame::data(frame.clone())))
                .collect::<Vec<_>>(),
        ));
        let response = Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .expect("valid response");
        std::future::ready(Ok::<_, Infallible>(response))
    };
    let tracker = Arc::new(TenantTokenTracker::new(u64::MAX));
    let layer = TenantTokenLayer::new(tracker).estimator(OpenAiEstimator::new());
    let mut group = c.benchmark_group("usage");
    group.throughput(Throughput::Elements(FRAMES as u64 + 1));
    let mut allocations = Vec::new();
    for (name, read_usage) in [("passed through", false), ("read", true)] {
        let mut service = layer
            .clone()
            .read_usage(read_usage)
            .layer(tower::service_fn(upstream.clone()));
        group.bench_function(name, |b| b.iter(|| run_one(&mut service, request())));
        let requests = 100;
        let before = ALLOCATIONS.load(Relaxed);
        for _ in 0..requests {
            run_one(&mut service, request());
        }
        let per_request = (ALLOCATIONS.load(Relaxed) - before) as f64 / requests as f64;
        allocations.push((name, per_request));
    }
    group.finish();
    for (name, per_request) in &allocations {
        println!("usage/{name}: {per_request:.1} allocations per request of {FRAMES} frames");
    }
    let extra = allocations[1].1 - allocations[0].1;
    println!(
        "the reader's allocations: {extra:.1} per request, {:.4} per frame",
        extra / (FRAMES as f64 + 1.0)
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
