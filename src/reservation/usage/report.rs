//! Finding the usage an upstream reports, in a response body read frame by frame.
//!
//! Every format this reads reports usage as an object under a `"usage"` key: OpenAI's chat
//! answers (`prompt_tokens`, `completion_tokens`) and its stream's last chunk, the
//! Responses API's answers and its `response.completed` event (`input_tokens`,
//! `output_tokens`, under `"response"`), Anthropic's answers and its `message_start`
//! (under `"message"`) and `message_delta` events. Inside a JSON string a quote is always
//! escaped, so the bytes `"usage"` followed by `:` are a key wherever they appear: the
//! finder looks for them in the raw bytes, without parsing the rest of the body, then
//! reads the object after them (up to [`WINDOW`] bytes) with the crate's JSON scanner.

use std::sync::OnceLock;

use memchr::memmem;

use crate::extract::openai::json_scan::{read_number, Number, Scanner, Str};
use crate::window::Usage;

/// The longest usage object read, in bytes; a longer one is passed over.
pub(crate) const WINDOW: usize = 4096;

/// The key looked for, quotes included.
const KEY: &[u8] = b"\"usage\"";

/// A searcher for [`KEY`], built once.
pub(super) fn key_searcher() -> &'static memmem::Finder<'static> {
    static SEARCHER: OnceLock<memmem::Finder<'static>> = OnceLock::new();
    SEARCHER.get_or_init(|| memmem::Finder::new(KEY))
}

/// What the upstream has reported so far: each usage object found sets the fields it
/// carries (Anthropic's `message_delta` repeats the output count, cumulative).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reported {
    /// Prompt tokens (`prompt_tokens`, `input_tokens`, plus Anthropic's cache reads and
    /// writes, which it counts apart).
    pub(crate) input: Option<u64>,
    /// Output tokens (`completion_tokens`, `output_tokens`), reasoning included.
    pub(crate) output: Option<u64>,
    /// `total_tokens`, for a report that gives only that.
    pub(crate) total: Option<u64>,
    /// The input tokens read from a cache (OpenAI's
    /// `prompt_tokens_details.cached_tokens`, Anthropic's `cache_read_input_tokens`),
    /// counted in `input` too.
    pub(crate) cached: Option<u64>,
}

impl Reported {
    /// The tokens used by kind, if the upstream reported anything: a report that gives
    /// only a total cannot tell input from output.
    pub(crate) fn used(&self) -> Option<Usage> {
        if let (None, None) = (self.input, self.output) {
            let unsplit = self.total?;
            return Some(Usage {
                unsplit,
                ..Usage::default()
            });
        }
        let input = self.input.unwrap_or(0);
        Some(Usage {
            input,
            cached_input: self.cached.unwrap_or(0).min(input),
            output: self.output.unwrap_or(0),
            unsplit: 0,
        })
    }

    fn merge(&mut self, found: Reported) {
        self.input = found.input.or(self.input);
        self.output = found.output.or(self.output);
        self.total = found.total.or(self.total);
        self.cached = found.cached.or(self.cached);
    }
}

/// Looks for usage objects in a byte stream fed in pieces of any size.
#[derive(Debug, Default)]
pub(crate) struct Finder {
    state: Position,
    /// The usage object being read, when it spans pieces (kept, with its capacity, for
    /// the next one).
    window: Vec<u8>,
    /// What has been found so far.
    pub(crate) reported: Reported,
}

/// Where the search for the usage object stands.
#[derive(Debug, Default, Clone, Copy)]
enum Position {
    /// `n` bytes of [`KEY`] matched.
    #[default]
    Seek,
    Key(usize),
    /// After the key: whitespace, then `:`.
    Colon,
    /// After the colon: whitespace, then the value; only an object is read.
    Value,
    /// Inside the object, `depth` levels deep.
    Object {
        depth: u32,
        string: bool,
        escaped: bool,
    },
}

impl Finder {
    /// Reads the next piece of the stream.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                Position::Seek => {
                    let rest = &bytes[i..];
                    match key_searcher().find(rest) {
                        Some(at) => {
                            i += at + KEY.len();
                            self.state = Position::Colon;
                        }
                        None => {
                            // The key may begin in this piece's last bytes and end in
                            // the next: only its first byte is a quote, so the last quote
                            // within reach is the one place it can start.
                            let reach = rest.len().saturating_sub(KEY.len() - 1);
                            self.state = match memchr::memrchr(b'"', &rest[reach..]) {
                                Some(at) if KEY.starts_with(&rest[reach + at..]) => {
                                    Position::Key(rest.len() - reach - at)
                                }
                                _ => Position::Seek,
                            };
                            return;
                        }
                    }
                }
                Position::Key(n) => {
                    if bytes[i] == KEY[n] {
                        i += 1;
                        self.state = if n + 1 == KEY.len() {
                            Position::Colon
                        } else {
                            Position::Key(n + 1)
                        };
                    } else {
                        self.state = Position::Seek; // this byte may start the key again
                    }
                }
                Position::Colon | Position::Value => {
                    let byte = bytes[i];
                    if matches!(byte, b' ' | b'\n' | b'\t' | b'\r') {
                        i += 1;
                    } else if matches!(self.state, Position::Colon) && byte == b':' {
                        i += 1;
                        self.state = Position::Value;
                    } else if matches!(self.state, Position::Value) && byte == b'{' {
                        self.window.clear();
                        self.state = Position::Object {
                            depth: 0,
                            string: false,
                            escaped: false,
                        };
                    } else {
                        self.state = Position::Seek; // not a key, or not an object (null)
                    }
                }
                Position::Object { .. } => i += self.object(&bytes[i..]),
            }
        }
    }

    /// Reads what `bytes` holds of the object being read; returns how many bytes it took.
    fn object(&mut self, bytes: &[u8]) -> usize {
        let Position::Object {
            mut depth,
            mut string,
            mut escaped,
        } = self.state
        else {
            return 0;
        };
        let mut end = None;
        for (at, &byte) in bytes.iter().enumerate() {
            if string {
                match byte {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => string = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(at + 1);
                        break;
                    }
                }
                _ => {}
            }
        }
        let taken = end.unwrap_or(bytes.len());
        if self.window.len() + taken > WINDOW {
            // Too long for a usage object: look for the next key from here.
            self.window.clear();
            self.state = Position::Seek;
            return taken;
        }
        match end {
            Some(_) => {
                let found = if self.window.is_empty() {
                    read_usage(&bytes[..taken])
                } else {
                    self.window.extend_from_slice(&bytes[..taken]);
                    read_usage(&self.window)
                };
                if let Some(found) = found {
                    self.reported.merge(found);
                }
                self.window.clear();
                self.state = Position::Seek;
            }
            None => {
                self.window.extend_from_slice(bytes);
                self.state = Position::Object {
                    depth,
                    string,
                    escaped,
                };
            }
        }
        taken
    }
}

/// The counts in one usage object; `None` if it is not valid JSON or counts nothing.
/// Counts that are not whole non-negative numbers are ignored.
fn read_usage(object: &[u8]) -> Option<Reported> {
    let mut json = Scanner::new(object);
    let mut found = Reported::default();
    let mut cached = 0u64;
    let mut any = false;
    walk_object(&mut json, |json, key| {
        let field = match key.raw {
            b"prompt_tokens" | b"input_tokens" => &mut found.input,
            b"completion_tokens" | b"output_tokens" => &mut found.output,
            b"total_tokens" => &mut found.total,
            b"cache_creation_input_tokens" | b"cache_read_input_tokens" => {
                let read = key.raw == b"cache_read_input_tokens";
                if let Some(tokens) = count(json)? {
                    cached = cached.saturating_add(tokens);
                    if read {
                        found.cached = Some(found.cached.unwrap_or(0).saturating_add(tokens));
                    }
                    any = true;
                }
                return Ok(());
            }
            b"prompt_tokens_details" | b"input_tokens_details" if json.peek() == Some(b'{') => {
                return walk_object(json, |json, key| match key.raw {
                    b"cached_tokens" => {
                        found.cached = count(json)?.or(found.cached);
                        Ok(())
                    }
                    _ => json.skip_value(),
                });
            }
            _ => return json.skip_value(),
        };
        if let Some(tokens) = count(json)? {
            *field = Some(tokens);
            any = true;
        }
        Ok(())
    })
    .ok()?;
    if cached > 0 {
        found.input = Some(found.input.unwrap_or(0).saturating_add(cached));
    }
    any.then_some(found)
}

/// A whole, non-negative count; anything else is skipped (`None`).
fn count(
    json: &mut Scanner<'_>,
) -> Result<Option<u64>, crate::extract::openai::json_scan::Malformed> {
    match json.peek() {
        Some(b'0'..=b'9') => Ok(match read_number(json.number()?) {
            Some(Number::Unsigned(tokens)) => Some(tokens),
            _ => None,
        }),
        _ => json.skip_value().map(|()| None),
    }
}

/// Walks one JSON object, handing each key (as written) to `field` with the scanner at
/// its value, which `field` must read.
pub(crate) fn walk_object<'a, E: From<crate::extract::openai::json_scan::Malformed>>(
    json: &mut Scanner<'a>,
    mut field: impl FnMut(&mut Scanner<'a>, Str<'a>) -> Result<(), E>,
) -> Result<(), E> {
    if json.peek() != Some(b'{') {
        return Err(json.error("expected an object").into());
    }
    json.bump();
    if json.peek() == Some(b'}') {
        json.bump();
        return Ok(());
    }
    loop {
        if json.peek() != Some(b'"') {
            return Err(json.error("key must be a string").into());
        }
        let key = json.string()?;
        json.colon()?;
        field(json, key)?;
        match json.peek() {
            Some(b',') => json.bump(),
            Some(b'}') => {
                json.bump();
                return Ok(());
            }
            _ => return Err(json.error("expected `,` or `}`").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a finder reports after reading `body` in pieces of `size` bytes.
    fn found(body: &[u8], size: usize) -> Reported {
        let mut finder = Finder::default();
        for piece in body.chunks(size.max(1)) {
            finder.feed(piece);
        }
        finder.reported
    }

    fn every_split(body: &[u8], expected: Reported) {
        for size in 1..=body.len() {
            assert_eq!(found(body, size), expected, "pieces of {size}");
        }
    }

    #[test]
    fn reads_openai_chat_usage_in_any_split() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"say \"usage\": {\"prompt_tokens\":9}"}}],
            "usage" : {"prompt_tokens":12,"completion_tokens":30,"total_tokens":42,
            "prompt_tokens_details":{"cached_tokens":4}}}"#;
        every_split(
            body,
            Reported {
                input: Some(12),
                output: Some(30),
                total: Some(42),
                cached: Some(4),
            },
        );
    }

    #[test]
    fn anthropic_stream_keeps_the_input_and_the_last_output() {
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",",
            "\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":",
            "\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n"
        );
        let reported = found(stream.as_bytes(), 7);
        assert_eq!((reported.input, reported.output), (Some(30), Some(15)));
        assert_eq!(reported.cached, Some(5));
        assert_eq!(reported.used().map(|used| used.total()), Some(45));
    }

    #[test]
    fn passes_over_null_strings_garbage_and_oversized_objects() {
        let long = format!(
            r#"{{"usage":{{"pad":"{}","input_tokens":1}}}}"#,
            "x".repeat(WINDOW)
        );
        for body in [
            &br#"{"usage":null,"a":"usage","b":"\"usage\":{\"input_tokens\":3}"}"#[..],
            br#"{"usage":{"input_tokens":-3,"output_tokens":1.5,"total_tokens":"9"}}"#,
            br#"{"usage":{"input_tokens":3,}}"#,
            br#"{"usage":{"input_tokens":3"#,
            long.as_bytes(),
            b"\xff\xfe\"usage\":{\x00}",
        ] {
            assert_eq!(found(body, 3), Reported::default(), "{body:?}");
            assert_eq!(found(body, body.len()), Reported::default(), "{body:?}");
        }
    }

    #[test]
    fn total_only_when_nothing_finer_is_given() {
        let reported = found(br#"{"usage":{"total_tokens":7}}"#, 5);
        assert_eq!(reported.used().map(|used| used.total()), Some(7));
        let reported = found(br#"{"usage":{"output_tokens":2,"total_tokens":7}}"#, 5);
        assert_eq!(reported.used().map(|used| used.total()), Some(2));
    }
}
