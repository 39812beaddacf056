//! Estimates: what a request reserves, and how the reservation follows what the upstream
//! really does.
//!
//! Everything the cap guarantees is about estimates: a tenant's requests in flight never
//! reserve more than its cap. An estimate far above the real cost throttles a tenant long
//! before its real load warrants; one far below lets more work through than the cap says.
//! The layer therefore starts from an estimate and then keeps the reservation true to the
//! response as it runs.
//!
//! # At admission
//!
//! An [`OpenAiEstimator`](crate::OpenAiEstimator) reserves the prompt (its text bytes ÷ 4)
//! plus the output allowance: the request's `max_tokens` (or `max_completion_tokens`,
//! `max_output_tokens`), times `n`. The official OpenAI SDKs send no limit unless asked,
//! so most chat requests get the estimator's default allowance
//! ([`default_output_tokens`](crate::OpenAiEstimator::default_output_tokens)), whatever
//! they really produce.
//!
//! # While the response runs: `read_usage`
//!
//! With [`read_usage`](crate::TenantTokenLayer::read_usage) the layer reads each response
//! as it passes (OpenAI Chat Completions and Responses, Anthropic Messages; JSON and
//! server-sent events):
//!
//! - a stream's output is counted as it passes: the usage it reports where it does, else
//!   the text of its deltas at 4 bytes a token. A stream that outruns its reservation grows
//!   it as it goes, so what is in flight never falls below what has been produced. Admitted
//!   work is never refused: growth past the cap is allowed, and visible as an overcommit;
//! - when the response ends, the reservation is resized to the reported total just before
//!   it is released, so the release and the accuracy metrics are exact.
//!
//! # Asking streams for their usage: `ask_stream_usage`
//!
//! A chat completion stream reports its usage only when the request asks for it
//! (`stream_options.include_usage`). With
//! [`ask_stream_usage`](crate::TenantTokenLayer::ask_stream_usage) the layer asks every
//! streamed request that did not say, and takes the answer (a `"usage":null` member in
//! each chunk, and a last chunk with the usage) out of the stream again: the client
//! receives the bytes it would have received without the option, and the reservation
//! settles on the usage the upstream reported. A client that asked itself, either way, is
//! left alone.
//!
//! # Learning allowances: `adaptive_output`
//!
//! With [`adaptive_output`](crate::TenantTokenLayer::adaptive_output), a request with no
//! output limit reserves what its tenant's requests to that model really produced: a high
//! quantile of the recent outputs of that (tenant, model), within a floor and a ceiling,
//! once enough are known (the default allowance until then). The window is short, so an
//! allowance follows a change in a tenant's traffic within tens of requests; the table is
//! bounded like the tracker's idle tenants. An allowance that proves too small costs
//! nothing in safety: the stream grows as above.
//! [`AdaptiveOutput::cap_explicit_limits`](crate::AdaptiveOutput::cap_explicit_limits)
//! also caps explicit limits at the learned allowance, for clients that always ask for the
//! model's maximum "to be safe".
//!
//! ```rust
//! use std::sync::Arc;
//! use tower_tenant_tokens::{AdaptiveOutput, OpenAiEstimator, TenantTokenLayer, TenantTokenTracker};
//!
//! let learned = Arc::new(AdaptiveOutput::new());
//! let layer = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(4_096)))
//!     .estimator(OpenAiEstimator::new())
//!     .adaptive_output(learned.clone()) // turns read_usage on
//!     .ask_stream_usage(true);
//! // An admin page can show what was learned, per tenant and model.
//! for allowance in learned.snapshot() {
//!     println!("{} / {}: {:?}", allowance.tenant, allowance.model, allowance.allowance);
//! }
//! # drop(layer);
//! ```
//!
//! # Watching the estimates
//!
//! With the feature `metrics` (see [`observing`](super::observing)):
//! `tenant_tokens_usage_ratio` is actual ÷ estimated per request, with a `route` label
//! per layer (`TenantTokenLayer::metrics_route`);
//! `tenant_tokens_streams_outran_total` counts the streams that grew past their
//! estimate; `tenant_tokens_output_allowance` shows the learned allowances of labelled
//! tenants. The `gateway` example serves the learned allowances at `/admin/estimates`.
