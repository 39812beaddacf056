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
//! ## A guess never locks anyone out
//!
//! An allowance the client did not ask for (the default, or a learned one) is a guess, and
//! a guess must never make a request unadmittable. So the output part of such an estimate
//! is cut to what the smallest cap the request is charged to (its tenant's, or a shared
//! budget's) can hold next to its prompt: a request without `max_tokens` in front of a
//! 600-token cap reserves at most 600, and waits at worst for the whole cap; it is never
//! `413`. Only what the client sent can be too large: its prompt, or an explicit
//! `max_tokens` larger than the cap. A response that produces more than its reservation
//! grows it as it streams (below).
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
//!   it is released, so the release and the accuracy metrics are exact. A stream that
//!   reported no usage settles on what was counted (the estimate's prompt plus the text
//!   streamed), down as well as up.
//!
//! A stream is complete at its end marker, not at the transport's end: OpenAI's
//! `data: [DONE]` or a chunk with a `finish_reason`, Anthropic's `message_stop`, the
//! Responses API's `response.completed`. The official SDKs stop reading there and close
//! the connection without reading the end of the body; such a stream still settles and
//! teaches (below) as one read to the end. A stream cut off before its end marker keeps
//! what it holds until its release and teaches nothing.
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
//! Some upstreams ignore the option (llama.cpp's Python server does). Their streams settle
//! on what was counted; the layer logs a warning once per model, and counts such streams
//! in `tenant_tokens_stream_usage_missing_total` (feature `metrics`).
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
//! An allowance learned from long answers comes down when the answers shorten: guesses
//! are cut to the cap (above), so requests keep being admitted and learned from, and the
//! long answers leave the window.
//!
//! # Calibrating prompts: `calibrate_prompts`
//!
//! Bytes ÷ 4 is a rule of thumb for English prose. A real tokenizer gives each digit a
//! token of its own, spends tokens on the punctuation of code and JSON, takes about one
//! per CJK character, and a chat template adds a few tokens per message, which dominates
//! short prompts: in front of a small model's server, bytes ÷ 4 was off two to four times
//! for digits, code and JSON. With
//! [`calibrate_prompts`](crate::TenantTokenLayer::calibrate_prompts) the layer learns,
//! per model, what a prompt's letters, digits, white space, punctuation, other characters
//! and strings cost there, from the `prompt_tokens` (`input_tokens`) the responses report
//! (a least-squares fit over the model's recent requests, held towards the byte rule where
//! the requests seen so far say nothing). A later prompt to that model is estimated from
//! what its text is made of. The table is bounded (least recently used models are
//! forgotten), and calibration is off unless asked for; see
//! [`PromptCalibration`](crate::PromptCalibration).
//!
//! ```rust
//! use std::sync::Arc;
//! use tower_tenant_tokens::{OpenAiEstimator, PromptCalibration, TenantTokenLayer, TenantTokenTracker};
//!
//! let calibration = Arc::new(PromptCalibration::new());
//! let layer = TenantTokenLayer::new(Arc::new(TenantTokenTracker::new(4_096)))
//!     .estimator(OpenAiEstimator::new())
//!     .calibrate_prompts(calibration.clone()); // turns read_usage on
//! for model in calibration.snapshot() {
//!     println!("{}: {} prompts, weights {:?}", model.model, model.samples, model.weights);
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
