//! Counting the output a server-sent event stream carries as it passes, before the
//! upstream reports its usage (if it ever does).
//!
//! Each `data:` line is one JSON event. The text it adds to the answer is the decoded
//! UTF-8 of the strings under the event's delta: OpenAI chat chunks'
//! `choices[].delta` (`content`, `refusal`, reasoning, tool call `arguments`), the
//! Responses API's `delta` strings, Anthropic's `content_block_delta` (`text`,
//! `partial_json`, `thinking`). Whole answers repeated at the end of a stream
//! (`response.completed`, `response.output_text.done`) are not deltas and are not
//! counted. Only the tail of a line that a frame left unfinished is kept, up to
//! [`LINE`] bytes: the events that carry deltas are short, and a longer line is passed
//! over.

use std::sync::OnceLock;

use memchr::memmem;

use crate::extract::openai::json_scan::{Malformed, Scanner};

use super::report::walk_object;

/// The longest line kept across frames, in bytes.
pub(crate) const LINE: usize = 64 * 1024;

/// How deep under a delta text is looked for.
const DEPTH: u32 = 6;

/// Splits a stream into lines and counts the delta text of its `data:` lines.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    /// The start of a line a frame left unfinished (its capacity kept for the next).
    tail: Vec<u8>,
    /// The unfinished line outgrew [`LINE`]: the rest of it is passed over.
    skipping: bool,
    /// Decoded bytes of delta text so far.
    pub(crate) text_bytes: u64,
    /// The stream has said it is complete (see [`is_end`]): whatever the transport does
    /// after that, the answer is whole.
    pub(crate) complete: bool,
}

impl Lines {
    /// Reads the next piece of the stream.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        if !self.tail.is_empty() || self.skipping {
            let Some(newline) = memchr::memchr(b'\n', rest) else {
                self.keep(rest);
                return;
            };
            self.keep(&rest[..newline]);
            if !self.skipping {
                let tail = std::mem::take(&mut self.tail);
                self.line(&tail);
                self.tail = tail;
            }
            self.tail.clear();
            self.skipping = false;
            rest = &rest[newline + 1..];
        }
        while let Some(newline) = memchr::memchr(b'\n', rest) {
            self.line(&rest[..newline]);
            rest = &rest[newline + 1..];
        }
        self.keep(rest);
    }

    /// Keeps `bytes` as part of the unfinished line, up to [`LINE`].
    fn keep(&mut self, bytes: &[u8]) {
        if self.skipping || bytes.is_empty() {
            return;
        }
        if self.tail.len() + bytes.len() > LINE {
            self.tail.clear();
            self.skipping = true;
        } else {
            self.tail.extend_from_slice(bytes);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data.first() == Some(&b'{') {
            self.text_bytes = self.text_bytes.saturating_add(delta_text(data));
        }
        self.complete |= is_end(data);
    }
}

/// Whether one event's data says the stream is complete: OpenAI's `[DONE]`, a chat
/// chunk with a `finish_reason` other than `null`, Anthropic's `message_stop`, the
/// Responses API's `response.completed`.
///
/// As for deltas, a quoted `"finish_reason"` followed by `:` is a key wherever it stands,
/// and a quoted `"message_stop"` or `"response.completed"` is a whole JSON string (a quote
/// inside a string is escaped): the event is not parsed.
fn is_end(data: &[u8]) -> bool {
    if data.first() != Some(&b'{') {
        return data == b"[DONE]";
    }
    let searchers = end_searchers();
    if let Some(at) = searchers.finish_reason.find(data) {
        let mut json = Scanner::new(&data[at + FINISH_REASON.len()..]);
        if json.colon().is_ok() && !matches!(json.peek(), Some(b'n') | None) {
            return true;
        }
    }
    searchers.message_stop.find(data).is_some() || searchers.completed.find(data).is_some()
}

const FINISH_REASON: &[u8] = b"\"finish_reason\"";

/// Searchers for what ends a stream, built once.
struct EndSearchers {
    finish_reason: memmem::Finder<'static>,
    message_stop: memmem::Finder<'static>,
    completed: memmem::Finder<'static>,
}

fn end_searchers() -> &'static EndSearchers {
    static SEARCHERS: OnceLock<EndSearchers> = OnceLock::new();
    SEARCHERS.get_or_init(|| EndSearchers {
        finish_reason: memmem::Finder::new(FINISH_REASON),
        message_stop: memmem::Finder::new(b"\"message_stop\""),
        completed: memmem::Finder::new(b"\"response.completed\""),
    })
}

/// The decoded bytes of delta text in one event.
///
/// Inside a JSON string every quote is escaped, so the bytes `"delta"` followed by `:`
/// are a key wherever they appear: each is found in the raw bytes and only its value is
/// read (a string, or the text strings of an object), without parsing the rest of the
/// event. A value that is not valid JSON counts nothing.
pub(crate) fn delta_text(event: &[u8]) -> u64 {
    let mut bytes = 0;
    let mut from = 0;
    while let Some(at) = delta_searcher().find(&event[from..]) {
        let mut json = Scanner::new(&event[from + at + DELTA.len()..]);
        if json.colon().is_err() {
            from += at + 1; // `"delta"` as a value, not a key
            continue;
        }
        let read = match json.peek() {
            Some(b'"') => json.string().map(|text| bytes += text.decoded_len as u64),
            _ => text(&mut json, DEPTH, &mut bytes),
        };
        if read.is_err() {
            break;
        }
        from += at + DELTA.len() + json.position();
    }
    bytes
}

/// The key whose value is the text an event adds, quotes included.
const DELTA: &[u8] = b"\"delta\"";

/// A searcher for [`DELTA`], built once.
fn delta_searcher() -> &'static memmem::Finder<'static> {
    static SEARCHER: OnceLock<memmem::Finder<'static>> = OnceLock::new();
    SEARCHER.get_or_init(|| memmem::Finder::new(DELTA))
}

/// Adds the text strings of a delta's value to `bytes`, looking `depth` levels down.
fn text(json: &mut Scanner<'_>, depth: u32, bytes: &mut u64) -> Result<(), Malformed> {
    match json.peek() {
        Some(b'{') if depth > 0 => walk_object(json, |json, key| match key.raw {
            b"content" | b"refusal" | b"reasoning" | b"reasoning_content" | b"arguments"
            | b"text" | b"partial_json" | b"thinking"
                if json.peek() == Some(b'"') =>
            {
                *bytes += json.string()?.decoded_len as u64;
                Ok(())
            }
            _ => text(json, depth - 1, bytes),
        }),
        Some(b'[') if depth > 0 => each_element(json, |json| text(json, depth - 1, bytes)),
        _ => json.skip_value(),
    }
}

/// Walks a JSON array, handing `element` the scanner at each element, which it must
/// read. Anything but an array is skipped.
fn each_element<'a>(
    json: &mut Scanner<'a>,
    mut element: impl FnMut(&mut Scanner<'a>) -> Result<(), Malformed>,
) -> Result<(), Malformed> {
    if json.peek() != Some(b'[') {
        return json.skip_value();
    }
    json.bump();
    if json.peek() == Some(b']') {
        json.bump();
        return Ok(());
    }
    loop {
        element(json)?;
        match json.peek() {
            Some(b',') => json.bump(),
            Some(b']') => {
                json.bump();
                return Ok(());
            }
            _ => return Err(json.error("expected `,` or `]`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(stream: &[u8], size: usize) -> u64 {
        let mut lines = Lines::default();
        for piece in stream.chunks(size) {
            lines.feed(piece);
        }
        lines.text_bytes
    }

    #[test]
    fn counts_delta_text_of_each_format_in_any_split() {
        let stream = concat!(
            // OpenAI chat: content (escaped: 5 bytes decoded), tool call arguments.
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"a\\\"b\\u00e9\"}}]}\r\n\r\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]}}]}\n\n",
            // Responses API: a delta string; a completed answer is not a delta.
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi!\"}\n\n",
            "data: {\"type\":\"response.output_text.done\",\"text\":\"Hi!\"}\n\n",
            // Anthropic: text and partial JSON; message_delta's stop reason is not text.
            "data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hey\"}}\n\n",
            "data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\"}}\n\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"}}\n\n",
            "data: [DONE]\n\n",
        );
        let expected = 5 + 2 + 3 + 3 + 3;
        for size in 1..=stream.len() {
            assert_eq!(
                counted(stream.as_bytes(), size),
                expected,
                "pieces of {size}"
            );
        }
    }

    fn completes(stream: &str) -> bool {
        (1..=stream.len()).all(|size| {
            let mut lines = Lines::default();
            stream
                .as_bytes()
                .chunks(size)
                .for_each(|piece| lines.feed(piece));
            lines.complete
        })
    }

    #[test]
    fn a_stream_is_complete_at_its_end_marker_in_any_split() {
        let chunk =
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\": null}]}\n\n";
        assert!(!completes(chunk));
        assert!(!completes(
            "data: {\"delta\":\"the text says \\\"message_stop\\\"\"}\n\n"
        ));
        assert!(!completes("data: [DONE]")); // no end of line yet
        for end in [
            "data: [DONE]\n\n",
            "data: [DONE]\r\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\": \"stop\"}]}\n",
            "data: {\"choices\":[{\"finish_reason\":\"length\",\"delta\":{}}]}\n",
            "event: message_stop\ndata: {\"type\": \"message_stop\"}\n\n",
            "data: {\"type\":\"response.completed\",\"response\":{}}\n",
        ] {
            assert!(completes(&format!("{chunk}{end}")), "{end:?}");
        }
    }

    #[test]
    fn garbage_and_overlong_lines_count_nothing() {
        let long = format!(
            "data: {{\"delta\":\"{}\"}}\ndata: {{\"delta\":\"ok\"}}\n",
            "x".repeat(LINE)
        );
        assert_eq!(counted(long.as_bytes(), 1000), 2);
        for garbage in [
            &b"data: {\"delta\":\"abc\n"[..],
            b"data: {\"type\":\"delta\",\"delta\" \"x\"}\n",
            b"data: {\"choices\":[{\"delta\":{\"content\":\"\\ud800\"}}]\n",
            b"data: \xff\xff\n",
            b"data: {\"delta\":{\"a\":[[[[[[[[{\"text\":\"deep\"}]]]]]]]]}}\n",
        ] {
            assert_eq!(counted(garbage, 3), 0, "{garbage:?}");
        }
    }
}
