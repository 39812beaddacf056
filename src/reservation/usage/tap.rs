//! The response body's usage reader: it reads each frame as it passes and keeps the
//! reservation at least what the response has produced, then exact once usage is known.

use bytes::{Buf, Bytes};
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::HeaderMap;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use super::ask::Strip;
use super::report::Finder;
use super::stream::Lines;
use crate::extract::openai::{AdaptiveOutput, Features, PromptCalibration};
use crate::extract::Estimated;
use crate::metrics::Tag;
use crate::reservation::Reserved;
use crate::window::Usage;

/// Output text bytes counted as one token while no usage has been reported.
const BYTES_PER_TOKEN: u64 = 4;

/// Reads the usage of one response and holds its reservation.
///
/// While the body streams, the reservation is grown whenever the prompt plus the output
/// so far (as reported, else the delta text counted) passes what it holds: admitted work
/// is never refused, and the growth shows as an overcommit when it passes the cap. When
/// the body ends (or is dropped, or fails) after usage was reported, the reservation is
/// resized to the reported total just before it is released.
pub(crate) struct Tap {
    /// The estimate's prompt part: what the request costs before any output.
    prompt: u64,
    usage: Finder,
    /// Present for a server-sent event stream.
    lines: Option<Lines>,
    /// The response has outrun its reservation (told once).
    outran: bool,
    /// Where the output is recorded when the response ends (a request without an output
    /// limit, on a layer that learns allowances).
    learn: Option<Learn>,
    /// The layer asked the request for its stream's usage (`ask_stream_usage`).
    asked: bool,
    /// The body ended (not dropped, not failed).
    ended: bool,
    /// What asking added is taken out of the stream (a stream the layer asked).
    strip: Option<Strip>,
    /// The reservation was settled: the response ended, failed, or was dropped.
    finished: bool,
}

/// What a response teaches beyond its own reservation: the request's model, and where
/// its output and its prompt's size are learned.
pub(crate) struct Learn {
    /// The model the request named ("" for none).
    pub(crate) model: String,
    /// The output allowances and the request's tenant, when its output is learned from
    /// (a request without an output limit, on a layer that learns allowances).
    pub(crate) output: Option<(Arc<AdaptiveOutput>, String)>,
    /// The prompt calibrations and what the prompt was made of, on a layer that
    /// calibrates prompts.
    pub(crate) prompt: Option<(Arc<PromptCalibration>, Features)>,
}

impl Learn {
    /// What the response of a request by `tenant`, `estimated` so, teaches: its output (a
    /// request without an output limit, or any with `cap_explicit_limits`, on a layer
    /// that learns allowances in `adaptive`), its prompt's size (a layer that calibrates
    /// prompts in `calibration`), and whether a stream `asked` for its usage reported it.
    /// `None` when there is nothing to learn.
    pub(crate) fn new(
        adaptive: Option<&Arc<AdaptiveOutput>>,
        calibration: Option<&Arc<PromptCalibration>>,
        tenant: &str,
        estimated: Estimated,
        asked: bool,
    ) -> Option<Self> {
        let output =
            adaptive.filter(|adaptive| estimated.unlimited || adaptive.caps_explicit_limits());
        let output = output.map(|table| (Arc::clone(table), tenant.to_owned()));
        let prompt = calibration.cloned().zip(estimated.features);
        if output.is_none() && prompt.is_none() && !asked {
            return None;
        }
        Some(Learn {
            model: estimated.model.unwrap_or_default(),
            output,
            prompt,
        })
    }
}

/// The models whose missing stream usage was warned about, in this process.
static WARNED: Mutex<Option<HashSet<Box<str>>>> = Mutex::new(None);

/// How many models are warned about at most: names come from request bodies.
const WARNED_MODELS: usize = 1_000;

/// Warns, once per model, that an upstream asked for a stream's usage did not report it.
#[cold]
fn warn_usage_missing(model: &str) {
    let mut warned = WARNED.lock().unwrap_or_else(PoisonError::into_inner);
    let warned = warned.get_or_insert_with(HashSet::new);
    if warned.len() >= WARNED_MODELS || !warned.insert(Box::from(model)) {
        return;
    }
    tracing::warn!(
        model,
        "the upstream reported no usage in a stream asked for it (stream_options.include_usage); \
         such streams settle on the text counted (warned once per model)"
    );
}

impl Tap {
    /// A reader for a request whose estimate has `prompt` tokens of prompt (0 when the
    /// estimate does not say), `asked` when the layer asked the request for its stream's
    /// usage. Always made here: the `None` is the no-op twin's.
    #[inline]
    pub(crate) fn new(prompt: u64, learn: Option<Learn>, asked: bool) -> Option<Self> {
        Some(Self {
            prompt,
            usage: Finder::default(),
            lines: None,
            outran: false,
            learn,
            asked,
            ended: false,
            strip: None,
            finished: false,
        })
    }

    /// Starts reading a response with these headers: whether its body is one this reads
    /// (JSON or server-sent events, not compressed).
    pub(crate) fn start(&mut self, headers: &HeaderMap) -> bool {
        let encoded = headers
            .get(CONTENT_ENCODING)
            .is_some_and(|value| value.as_bytes() != b"identity");
        let kind = headers.get(CONTENT_TYPE).map(|value| value.as_bytes());
        let stream = match kind {
            _ if encoded => return false,
            Some(kind) if kind.starts_with(b"text/event-stream") => true,
            Some(kind) if contains(kind, b"json") => false,
            _ => return false,
        };
        self.lines = stream.then(Lines::default);
        self.strip = (stream && self.asked).then(Strip::default);
        true
    }

    /// Whether the stream is edited as it passes: see [`pass`](Self::pass).
    pub(crate) fn strips(&self) -> bool {
        self.strip.is_some()
    }

    /// Reads one data frame of a stream the layer asked for its usage, and returns what
    /// to pass on of it: the frame without what asking added (possibly nothing yet).
    pub(crate) fn pass(&mut self, data: Bytes, held: &mut Reserved<'_>) -> Bytes {
        self.read(&data, held);
        match &mut self.strip {
            Some(strip) => strip.pass(&data),
            None => data,
        }
    }

    /// What an edited stream still holds back when it ends (an unfinished last line).
    pub(crate) fn rest(&mut self) -> Bytes {
        self.strip.as_mut().map(Strip::rest).unwrap_or_default()
    }

    /// Reads one data frame.
    pub(crate) fn read(&mut self, data: &impl Buf, held: &mut Reserved<'_>) {
        let chunk = data.chunk();
        if chunk.len() == data.remaining() {
            self.read_bytes(chunk);
        } else {
            let mut slices = [std::io::IoSlice::new(&[]); 16];
            let n = data.chunks_vectored(&mut slices);
            for slice in &slices[..n] {
                self.read_bytes(slice);
            }
        }
        self.keep_up(held);
    }

    fn read_bytes(&mut self, bytes: &[u8]) {
        self.usage.feed(bytes);
        if let Some(lines) = &mut self.lines {
            lines.feed(bytes);
        }
    }

    /// What the response has produced so far: the prompt (as reported, else as
    /// estimated) plus the output (the larger of what was reported and the text counted).
    fn produced(&self) -> u64 {
        let reported = &self.usage.reported;
        let counted = self
            .lines
            .as_ref()
            .map_or(0, |lines| lines.text_bytes.div_ceil(BYTES_PER_TOKEN));
        let output = reported.output.unwrap_or(0).max(counted);
        reported.input.unwrap_or(self.prompt).saturating_add(output)
    }

    /// Grows the reservation to what has been produced, when that is more.
    fn keep_up(&mut self, held: &mut Reserved<'_>) {
        let produced = self.produced();
        if !self.finished && produced > held.tokens() {
            held.resize(produced);
            if !self.outran && self.lines.is_some() {
                self.outran = true;
                held.tell(Tag::outran);
            }
        }
    }

    /// The body ended: the response is complete, whatever its content said.
    pub(crate) fn end(&mut self, held: &mut Reserved<'_>) {
        self.ended = true;
        self.finish(held);
    }

    /// Settles and releases the reservation, once: the response ended, failed, or was
    /// dropped.
    ///
    /// A response is complete when its body ended or, for a stream, once it carried its
    /// end marker (an SDK may hang up right after `[DONE]` without reading the end of
    /// the body). A complete response teaches its output; any that reported its prompt
    /// teaches the prompt's size. The reservation settles on the reported usage; a
    /// complete stream that reported none settles on what was counted (the estimate's
    /// prompt and the text streamed), down as well as up. One cut short keeps what it
    /// holds until the release.
    pub(crate) fn finish(&mut self, held: &mut Reserved<'_>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let complete = self.ended || self.lines.as_ref().is_some_and(|lines| lines.complete);
        let learn = self.learn.take();
        if let Some(learn) = &learn {
            self.teach(learn, complete, held);
        }
        match self.usage.reported.used() {
            Some(used) => {
                held.settle(used);
            }
            None if complete && self.lines.is_some() => {
                if self.asked {
                    warn_usage_missing(learn.as_ref().map_or("", |learn| &learn.model));
                    held.tell(Tag::usage_missing);
                }
                held.resize(self.produced());
            }
            None => {}
        }
    }

    /// Learns from the response what `learn` says: its output when it is `complete` (as
    /// reported, else as counted), its prompt's size when reported.
    fn teach(&self, learn: &Learn, complete: bool, held: &Reserved<'_>) {
        let reported = &self.usage.reported;
        if let (Some((table, tenant)), true) = (&learn.output, complete) {
            let counted = self.lines.as_ref().and_then(|lines| {
                (lines.text_bytes > 0).then(|| lines.text_bytes.div_ceil(BYTES_PER_TOKEN))
            });
            if let Some(output) = reported.output.or(counted) {
                if let Some(allowance) = table.record(tenant, &learn.model, output) {
                    held.tell(|tag| tag.learned(&learn.model, allowance));
                }
            }
        }
        if let (Some((table, features)), Some(input)) = (&learn.prompt, reported.input) {
            table.record(&learn.model, features, input);
        }
    }
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("finished", &self.finished)
            .field("reported", &self.usage.reported)
            .finish_non_exhaustive()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle))
}

impl Reserved<'_> {
    /// Settles the reservation on what the request used, as the upstream reported: the
    /// windows are charged exactly that (what [`resize`](Self::resize) never takes back).
    fn settle(&mut self, used: Usage) -> u64 {
        let now = self.resize(used.total());
        self.charges().for_each(|charge| charge.settle(used));
        now
    }
}
