//! Asking a streamed chat completion for its usage, and keeping the answer to that from
//! the client: [`TenantTokenLayer::ask_stream_usage`](crate::TenantTokenLayer::ask_stream_usage).
//!
//! The request gets `"stream_options":{"include_usage":true}`. OpenAI then adds a field
//! `"usage":null` to every chunk and one last chunk with empty `choices` and the usage;
//! [`Strip`] takes both out again, so the client receives the bytes it would have received
//! without the option.

use bytes::{Bytes, BytesMut};

use super::stream::LINE;
use crate::extract::openai::json_scan::{Malformed, Scanner};

/// The body to forward in place of `body`, when `body` is a streamed request that did not
/// say whether it wants usage: `stream` is `true` and `stream_options` is absent, or an
/// object without `include_usage`. `None` for every other body, which is forwarded as it
/// is: one that is not a stream, one whose client chose (`include_usage` set either way,
/// or `stream_options` not an object), one that is not a JSON object.
pub(crate) fn ask(body: &[u8]) -> Option<Bytes> {
    let mut json = Scanner::new(body);
    let mut stream = false;
    // Where `include_usage` goes: just after this `{`, and whether a `,` must follow.
    let mut insert: Option<(usize, bool)> = None;
    let mut options_given = false;
    let top = json
        .peek()
        .filter(|&byte| byte == b'{')
        .map(|_| json.position())?;
    let walked = super::report::walk_object::<Malformed>(&mut json, |json, key| match key.raw {
        b"stream" => {
            stream = json.peek() == Some(b't');
            json.skip_value()
        }
        b"stream_options" => {
            options_given = true;
            insert = None;
            if json.peek() != Some(b'{') {
                return json.skip_value();
            }
            let open = json.position();
            let mut members = 0;
            let mut chosen = false;
            super::report::walk_object::<Malformed>(json, |json, key| {
                members += 1;
                chosen |= key.raw == b"include_usage";
                json.skip_value()
            })?;
            if !chosen {
                insert = Some((open, members > 0));
            }
            Ok(())
        }
        _ => json.skip_value(),
    });
    if walked.is_err() || !stream || json.peek().is_some() {
        return None;
    }
    let (at, field) = match (options_given, insert) {
        (false, _) => (top, &b"\"stream_options\":{\"include_usage\":true},"[..]),
        (true, Some((open, true))) => (open, &b"\"include_usage\":true,"[..]),
        (true, Some((open, false))) => (open, &b"\"include_usage\":true"[..]),
        (true, None) => return None,
    };
    let mut asked = BytesMut::with_capacity(body.len() + field.len());
    asked.extend_from_slice(&body[..=at]);
    asked.extend_from_slice(field);
    asked.extend_from_slice(&body[at + 1..]);
    Some(asked.freeze())
}

/// Takes out of a chat completion stream what asking for usage added to it: the
/// `"usage":null` member of each chunk, and the chunk that carries the usage (its `data:`
/// line and the blank line after it). Every other byte passes unchanged, in order.
///
/// Lines are passed on whole: the unfinished last line of a frame waits for the next
/// frame (up to [`LINE`] bytes; a longer line is passed on as it comes, unchanged).
#[derive(Debug, Default)]
pub(crate) struct Strip {
    /// The start of a line a frame left unfinished.
    line: Vec<u8>,
    /// The unfinished line outgrew [`LINE`]: it passes unchanged to its end.
    passing: bool,
    /// The usage chunk was taken out: so is the blank line that ends its event.
    dropped: bool,
}

impl Strip {
    /// What to pass on of the next piece of the stream (possibly nothing yet).
    pub(crate) fn pass(&mut self, bytes: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        let mut rest = bytes;
        if self.passing {
            match memchr::memchr(b'\n', rest) {
                Some(newline) => {
                    out.extend_from_slice(&rest[..=newline]);
                    rest = &rest[newline + 1..];
                    self.passing = false;
                }
                None => return Bytes::copy_from_slice(rest),
            }
        } else if !self.line.is_empty() {
            let Some(newline) = memchr::memchr(b'\n', rest) else {
                self.keep(rest, &mut out);
                return out.freeze();
            };
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(&rest[..=newline]);
            self.line(&line, &mut out);
            line.clear();
            self.line = line;
            rest = &rest[newline + 1..];
        }
        while let Some(newline) = memchr::memchr(b'\n', rest) {
            self.line(&rest[..=newline], &mut out);
            rest = &rest[newline + 1..];
        }
        self.keep(rest, &mut out);
        out.freeze()
    }

    /// What is left when the stream ends: an unfinished last line, as it came.
    pub(crate) fn rest(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.line))
    }

    /// Keeps the start of an unfinished line; past [`LINE`] bytes it is passed on.
    fn keep(&mut self, bytes: &[u8], out: &mut BytesMut) {
        if bytes.is_empty() {
            return;
        }
        if self.line.len() + bytes.len() > LINE {
            out.extend_from_slice(&self.line);
            out.extend_from_slice(bytes);
            self.line.clear();
            self.passing = true;
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    /// Passes on one whole line (its `\n` included), edited.
    fn line(&mut self, line: &[u8], out: &mut BytesMut) {
        if line.len() > LINE {
            self.dropped = false;
            out.extend_from_slice(line); // too long to be one this edits
            return;
        }
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if std::mem::take(&mut self.dropped) && text.is_empty() {
            return;
        }
        let Some(data) = text.strip_prefix(b"data:") else {
            out.extend_from_slice(line);
            return;
        };
        let start = text.len() - data.len();
        match edit(data) {
            Edit::Keep => out.extend_from_slice(line),
            Edit::Drop => self.dropped = true,
            Edit::Cut(from, to) => {
                out.extend_from_slice(&line[..start + from]);
                out.extend_from_slice(&line[start + to..]);
            }
        }
    }
}

/// What becomes of one event's data.
#[derive(Debug, PartialEq, Eq)]
enum Edit {
    Keep,
    /// The usage chunk: taken out whole.
    Drop,
    /// These bytes (`"usage":null` and a comma) are taken out.
    Cut(usize, usize),
}

/// Reads one event's data: a JSON object with `"usage":null` among its members loses that
/// member; one whose `choices` is empty and whose `usage` is an object is the usage chunk.
fn edit(data: &[u8]) -> Edit {
    if super::report::key_searcher().find(data).is_none() {
        return Edit::Keep;
    }
    members(data).unwrap_or(Edit::Keep)
}

fn members(data: &[u8]) -> Result<Edit, Malformed> {
    let mut json = Scanner::new(data);
    if json.peek() != Some(b'{') {
        return Ok(Edit::Keep);
    }
    json.bump();
    let mut empty_choices = false;
    let mut usage_object = false;
    let mut cut = None;
    // Just after the `{`, or after the previous member's value.
    let mut after_previous = json.position();
    let mut first = true;
    loop {
        match json.peek() {
            Some(b'}') if first => break,
            Some(b'"') => {}
            _ => return Ok(Edit::Keep),
        }
        let key_start = json.position();
        let key = json.string()?;
        json.colon()?;
        let mut null_usage = false;
        match (key.raw, json.peek()) {
            (b"usage", Some(b'n')) => {
                json.literal()?;
                null_usage = true;
            }
            (b"usage", Some(b'{')) => {
                json.skip_value()?;
                usage_object = true;
            }
            (b"choices", Some(b'[')) => {
                let mut look = json.clone();
                look.bump();
                empty_choices = look.peek() == Some(b']');
                json.skip_value()?;
            }
            _ => json.skip_value()?,
        }
        let value_end = json.position();
        let last = match json.peek() {
            Some(b',') => false,
            Some(b'}') => true,
            _ => return Ok(Edit::Keep),
        };
        if null_usage {
            cut = Some(match (first, last) {
                // `"usage":null,` and the space before the next key.
                (true, false) => {
                    json.bump();
                    json.peek();
                    (key_start, json.position())
                }
                // `,"usage":null` from the end of the member before it.
                (false, _) => (after_previous, value_end),
                (true, true) => (key_start, value_end),
            });
            if first && !last {
                after_previous = key_start;
                first = false;
                continue; // the comma after it is already read
            }
        }
        if last {
            break;
        }
        json.bump();
        after_previous = value_end;
        first = false;
    }
    Ok(match cut {
        _ if empty_choices && usage_object => Edit::Drop,
        Some((from, to)) => Edit::Cut(from, to),
        None => Edit::Keep,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(body: &str) -> Option<String> {
        ask(body.as_bytes()).map(|bytes| String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[test]
    fn asks_a_stream_that_did_not_choose() {
        assert_eq!(
            asked(r#"{"model":"m","stream":true}"#).as_deref(),
            Some(r#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#)
        );
        assert_eq!(
            asked(r#" { "stream" : true, "stream_options" : { } } "#).as_deref(),
            Some(r#" { "stream" : true, "stream_options" : {"include_usage":true } } "#)
        );
        assert_eq!(
            asked(r#"{"stream_options":{"x":1},"stream":true}"#).as_deref(),
            Some(r#"{"stream_options":{"include_usage":true,"x":1},"stream":true}"#)
        );
        for body in [
            r#"{"model":"m"}"#,
            r#"{"stream":false}"#,
            r#"{"stream":"true"}"#,
            r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"stream":true,"stream_options":null}"#,
            r#"{"stream":true,"#,
            r#"{"stream":true} {}"#,
            r#"[{"stream":true}]"#,
            "",
        ] {
            assert_eq!(asked(body), None, "{body}");
        }
    }

    fn stripped(stream: &str, size: usize) -> String {
        let mut strip = Strip::default();
        let mut out = Vec::new();
        for piece in stream.as_bytes().chunks(size) {
            out.extend_from_slice(&strip.pass(piece));
        }
        out.extend_from_slice(&strip.rest());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn takes_out_what_asking_added_in_any_split() {
        let asked = concat!(
            ": comment\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"usage\\\"\"}}],\"usage\":null}\n\n",
            "data: {\"usage\":null,\"choices\":[{\"delta\":{}}]}\r\n\r\n",
            "data: {\"usage\": null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        );
        let plain = concat!(
            ": comment\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"usage\\\"\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{}}]}\r\n\r\n",
            "data: {}\n\n",
            "data: [DONE]\n\n",
        );
        for size in 1..=asked.len() {
            assert_eq!(stripped(asked, size), plain, "pieces of {size}");
        }
    }

    #[test]
    fn leaves_everything_else_alone() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"total_tokens\":3}}\n\n",
            "data: {\"choices\":[],\"usage\":null}\n\n",
            "data: {\"a\":{\"usage\":null}}\n\n",
            "data: {\"usage\":null,}\n\n",
            "event: x\ndata: not json \"usage\":null\n\n",
            "data: {\"choices\":[]",
        );
        let expected = stream.replace(",\"usage\":null}", "}");
        assert_eq!(stripped(stream, 5), expected);
        let long = format!(
            "data: {{\"usage\":null,\"pad\":\"{}\"}}\n",
            "x".repeat(LINE)
        );
        for size in [1000, 4096, long.len()] {
            assert!(
                stripped(&long, size) == long,
                "a line too long passes unchanged"
            );
        }
    }
}
