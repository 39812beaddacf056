//! A single-pass JSON scanner: the parts of a JSON parser the
//! [`OpenAiEstimator`](super::OpenAiEstimator) needs, without building values or copying
//! strings.
//!
//! What the estimator accepts and refuses is defined as what a walk with `serde_json`'s
//! `Deserializer` over the same fields accepts. This scanner reproduces that walk exactly,
//! on its three paths:
//!
//! - **read** strings (object keys, and every string under a counted field): valid
//!   escapes, `\u` surrogates only in proper pairs, no raw control characters, valid UTF-8;
//!   [`Scanner::string`].
//! - **skipped** values (fields the estimate does not read, `serde::de::IgnoredAny`): the
//!   JSON grammar only. Their strings are not checked for UTF-8 or unpaired surrogates
//!   (escapes must still be well-formed and control characters are still refused), their
//!   numbers are not range-checked, and their nesting has no depth limit;
//!   [`Scanner::skip_value`].
//! - **numbers** that are read: the grammar here, the value from `serde_json` itself
//!   ([`read_number`]), so that what counts as an integer, a float or out of range stays
//!   `serde_json`'s answer.
//!
//! Error messages use `serde_json`'s wording and line/column positions where that is
//! simple, but only whether a body is refused is guaranteed to match.
//!
//! Strings are where nearly all the time goes. They are scanned 16 bytes at a time with
//! word-wide bit tricks ([`specials`]) for the next byte that is not plain printable ASCII;
//! UTF-8 is validated one character at a time at those stops, so each byte is read once.

use std::fmt;

use crate::extract::words::{word, HIGH_BITS, ONES};

/// Why a body is not the JSON it should be: what was wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed {
    what: &'static str,
    line: usize,
    column: usize,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at line {} column {}",
            self.what, self.line, self.column
        )
    }
}

/// A result whose error is a [`Malformed`] body.
pub(crate) type Result<T> = std::result::Result<T, Malformed>;

/// A string the scanner has read and validated.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Str<'a> {
    /// The bytes between the quotes, escapes as written.
    pub(crate) raw: &'a [u8],
    /// How many UTF-8 bytes the string decodes to.
    pub(crate) decoded_len: usize,
}

impl Str<'_> {
    /// The first `out.len()` bytes of the decoded string (fewer if it is shorter), written
    /// to `out`; returns how many were written.
    pub(crate) fn decode_prefix(&self, out: &mut [u8]) -> usize {
        // Every escape decodes to fewer bytes than it takes, so a string without any is
        // its own decoding.
        if self.raw.len() == self.decoded_len {
            let n = out.len().min(self.raw.len());
            out[..n].copy_from_slice(&self.raw[..n]);
            return n;
        }
        let raw = self.raw;
        let (mut i, mut n) = (0, 0);
        while n < out.len() {
            let Some(&byte) = raw.get(i) else { break };
            if byte != b'\\' {
                out[n] = byte;
                n += 1;
                i += 1;
                continue;
            }
            // `raw` was validated by `Scanner::string`: escapes are well-formed and
            // surrogates paired. Anything else just ends the prefix.
            let (code, len) = match raw.get(i + 1) {
                Some(b'u') => match hex4(raw, i + 2) {
                    Some(high @ 0xD800..=0xDBFF) => match hex4(raw, i + 8) {
                        Some(low) => {
                            let pair = ((u32::from(high) - 0xD800) << 10)
                                | (u32::from(low).wrapping_sub(0xDC00) & 0x3FF);
                            (pair + 0x1_0000, 12)
                        }
                        None => break,
                    },
                    Some(unit) => (u32::from(unit), 6),
                    None => break,
                },
                Some(&c) => match simple_escape(c) {
                    Some(decoded) => (u32::from(decoded), 2),
                    None => break,
                },
                None => break,
            };
            let Some(ch) = char::from_u32(code) else {
                break;
            };
            let mut buf = [0; 4];
            for &b in ch.encode_utf8(&mut buf).as_bytes() {
                if n == out.len() {
                    break;
                }
                out[n] = b;
                n += 1;
            }
            i += len;
        }
        n
    }

    /// The whole decoded string, for a string [`Scanner::string`] read.
    pub(crate) fn decode(&self) -> String {
        let mut bytes = vec![0; self.decoded_len];
        let len = self.decode_prefix(&mut bytes);
        bytes.truncate(len);
        match String::from_utf8(bytes) {
            Ok(text) => text,
            // Not reached: `Scanner::string` validated the UTF-8 and the escapes.
            Err(error) => String::from_utf8_lossy(error.as_bytes()).into_owned(),
        }
    }
}

/// What a simple (one-letter) escape decodes to.
fn simple_escape(letter: u8) -> Option<u8> {
    Some(match letter {
        b'"' => b'"',
        b'\\' => b'\\',
        b'/' => b'/',
        b'b' => 0x08,
        b'f' => 0x0C,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        _ => return None,
    })
}

/// A JSON number as `serde_json` reads it (what a `Visitor` is handed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Number {
    /// A non-negative integer that fits 64 bits (`visit_u64`).
    Unsigned(u64),
    /// A negative integer that fits 64 bits (`visit_i64`).
    Negative(i64),
    /// Anything else: a fraction, an exponent, `-0`, an integer beyond 64 bits
    /// (`visit_f64`).
    Float(f64),
}

/// The value of a number literal that [`Scanner::number`] accepted, or `None` when
/// `serde_json` refuses it as out of range (a float that would be infinite).
pub(crate) fn read_number(literal: &[u8]) -> Option<Number> {
    // Most literals are short integers: read those here, exactly as serde_json does
    // (19 digits always fit a u64; a negative one is an i64 unless it is -0 or below
    // i64::MIN, which serde_json turns into a float).
    let (negative, digits) = match literal.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, literal),
    };
    if digits.len() <= 19 && digits.iter().all(u8::is_ascii_digit) {
        let magnitude = digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if !negative {
            return Some(Number::Unsigned(magnitude));
        }
        let value = (magnitude as i64).wrapping_neg();
        return Some(if value < 0 {
            Number::Negative(value)
        } else {
            Number::Float(-(magnitude as f64))
        });
    }
    // Fractions, exponents and long integers: let serde_json do its own arithmetic (its
    // float parsing, and when it gives up, depend on its features). Through its `Number`
    // rather than a visitor of our own, which also keeps numbers readable when another
    // crate switches on serde_json's `arbitrary_precision`.
    let number: serde_json::Number = serde_json::from_slice(literal).ok()?;
    Some(if let Some(n) = number.as_u64() {
        Number::Unsigned(n)
    } else if let Some(n) = number.as_i64() {
        Number::Negative(n)
    } else {
        Number::Float(number.as_f64()?)
    })
}

/// The whitespace JSON allows between tokens.
fn is_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\n' | b'\t' | b'\r')
}

/// A cursor over one JSON document; a clone is a saved position to come back to.
#[derive(Debug, Clone)]
pub(crate) struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    /// A scanner at the start of `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// A [`Malformed`] error about the byte at `at` (or the end of the body).
    #[cold]
    fn error_at(&self, at: usize, what: &'static str) -> Malformed {
        // serde_json's positions for an error at a byte it peeked at: the line and column
        // just after that byte (the end of the body, if there is none).
        let end = (at + 1).min(self.bytes.len());
        let line_start = self.bytes[..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |newline| newline + 1);
        let line = 1 + self.bytes[..line_start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        Malformed {
            what,
            line,
            column: end - line_start,
        }
    }

    /// A [`Malformed`] error about the current byte.
    #[cold]
    pub(crate) fn error(&self, what: &'static str) -> Malformed {
        self.error_at(self.pos, what)
    }

    /// Skips whitespace and returns the next byte, without consuming it (`None` at the
    /// end of the body).
    #[inline]
    pub(crate) fn peek(&mut self) -> Option<u8> {
        while let Some(&byte) = self.bytes.get(self.pos) {
            if !is_whitespace(byte) {
                return Some(byte);
            }
            self.pos += 1;
        }
        None
    }

    /// Consumes the byte [`peek`](Self::peek) returned.
    /// How many bytes have been read.
    #[inline]
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    #[inline]
    pub(crate) fn bump(&mut self) {
        self.pos += 1;
    }

    /// Skips whitespace and the `:` between a key and its value.
    #[inline]
    pub(crate) fn colon(&mut self) -> Result<()> {
        match self.peek() {
            Some(b':') => {
                self.bump();
                Ok(())
            }
            Some(_) => Err(self.error("expected `:`")),
            None => Err(self.error("EOF while parsing an object")),
        }
    }

    /// Reads `null`, `true` or `false`, whose first letter [`peek`](Self::peek) returned.
    pub(crate) fn literal(&mut self) -> Result<()> {
        let word: &[u8] = match self.bytes.get(self.pos) {
            Some(b'n') => b"null",
            Some(b't') => b"true",
            _ => b"false",
        };
        // serde_json compares letter by letter: the error is at the first wrong one.
        for (i, &expected) in word.iter().enumerate() {
            match self.bytes.get(self.pos + i) {
                Some(&b) if b == expected => {}
                Some(_) => return Err(self.error_at(self.pos + i, "expected ident")),
                None => return Err(self.error_at(self.pos + i, "EOF while parsing a value")),
            }
        }
        self.pos += word.len();
        Ok(())
    }

    /// Reads a number literal (the grammar only; see [`read_number`] for its value),
    /// starting at the `-` or digit [`peek`](Self::peek) returned.
    pub(crate) fn number(&mut self) -> Result<&'a [u8]> {
        let bytes = self.bytes;
        let start = self.pos;
        let digits_from = |mut pos: usize| {
            while let Some(b'0'..=b'9') = bytes.get(pos) {
                pos += 1;
            }
            pos
        };
        let mut pos = start;
        if bytes.get(pos) == Some(&b'-') {
            pos += 1;
        }
        match bytes.get(pos) {
            // One leading zero, and only alone.
            Some(b'0') => {
                pos += 1;
                if let Some(b'0'..=b'9') = bytes.get(pos) {
                    return Err(self.error_at(pos, "invalid number"));
                }
            }
            Some(b'1'..=b'9') => pos = digits_from(pos + 1),
            Some(_) => return Err(self.error_at(pos, "invalid number")),
            None => return Err(self.error_at(pos, "EOF while parsing a value")),
        }
        if bytes.get(pos) == Some(&b'.') {
            let end = digits_from(pos + 1);
            if end == pos + 1 {
                return Err(self.error_at(end, "invalid number"));
            }
            pos = end;
        }
        if let Some(b'e' | b'E') = bytes.get(pos) {
            pos += 1;
            if let Some(b'+' | b'-') = bytes.get(pos) {
                pos += 1;
            }
            let end = digits_from(pos);
            if end == pos {
                return Err(self.error_at(pos, "invalid number"));
            }
            pos = end;
        }
        self.pos = pos;
        Ok(&bytes[start..pos])
    }

    /// Reads and validates a string, starting at the opening quote
    /// [`peek`](Self::peek) returned: valid escapes, surrogates in pairs, no control
    /// characters, valid UTF-8.
    #[inline]
    pub(crate) fn string(&mut self) -> Result<Str<'a>> {
        self.bump();
        let start = self.pos;
        let saved = self.scan_string::<true>()?;
        let raw = &self.bytes[start..self.pos - 1];
        Ok(Str {
            raw,
            decoded_len: raw.len() - saved,
        })
    }

    /// Skips a string the way `serde_json` skips an ignored one: escapes must be
    /// well-formed and control characters are refused, but neither UTF-8 nor surrogate
    /// pairs are checked.
    #[inline]
    fn skip_string(&mut self) -> Result<()> {
        self.bump();
        self.scan_string::<false>().map(|_| ())
    }

    /// Scans a string from just after its opening quote to just after its closing one,
    /// validating UTF-8 and surrogate pairs if `UTF8`. Returns how many bytes its escapes
    /// take beyond what they decode to.
    #[inline(always)]
    fn scan_string<const UTF8: bool>(&mut self) -> Result<usize> {
        let bytes = self.bytes;
        let mut pos = self.pos;
        let mut saved = 0;
        loop {
            pos = next_special::<UTF8>(bytes, pos);
            let Some(&byte) = bytes.get(pos) else {
                return Err(self.error_at(pos, "EOF while parsing a string"));
            };
            if byte == b'"' {
                self.pos = pos + 1;
                return Ok(saved);
            }
            if byte < 0x20 {
                return Err(self.error_at(
                    pos,
                    "control character (\\u0000-\\u001F) found while parsing a string",
                ));
            }
            // A backslash, or (with UTF8) the first byte of a multi-byte character. Both
            // are common in text and come in no predictable order, so both are worked out
            // before choosing, with one well-predicted branch for the rare cases.
            let next = bytes.get(pos + 1).copied().unwrap_or(0);
            let is_escape = byte == b'\\';
            let simple = ESCAPES[usize::from(next)] == SIMPLE;
            let advance = if is_escape {
                if simple {
                    2
                } else {
                    0
                }
            } else if UTF8 {
                utf8_char_len(bytes, pos)
            } else {
                // Without UTF8 the scan stops at no other byte.
                0
            };
            if advance == 0 {
                // `\u` escapes, and errors.
                if !is_escape {
                    return Err(self.error_at(pos, "invalid unicode code point"));
                }
                let (len, decoded) = self.unicode_escape::<UTF8>(pos)?;
                pos += len;
                saved += len - decoded;
                continue;
            }
            pos += advance;
            saved += usize::from(is_escape);
        }
    }

    /// Reads the escape at `bytes[at]` (a backslash) that is not a simple one: a `\u`
    /// escape (with its trailing surrogate, if `UTF8` requires one), or an error. Returns
    /// how many bytes it takes and how many UTF-8 bytes it decodes to.
    #[cold]
    #[inline(never)]
    fn unicode_escape<const UTF8: bool>(&self, at: usize) -> Result<(usize, usize)> {
        let bytes = self.bytes;
        match bytes.get(at + 1) {
            Some(b'u') => {}
            Some(_) => return Err(self.error_at(at + 1, "invalid escape")),
            None => return Err(self.error_at(at + 1, "EOF while parsing a string")),
        }
        let unit = self.hex_escape(at + 2)?;
        if !UTF8 {
            // Skipped strings: any code unit, paired or not (its length is not used).
            return Ok((6, 0));
        }
        match unit {
            0xDC00..=0xDFFF => Err(self.error_at(at + 5, "lone leading surrogate in hex escape")),
            0xD800..=0xDBFF => {
                // A leading surrogate must be followed by a `\u` trailing one.
                match (bytes.get(at + 6), bytes.get(at + 7)) {
                    (Some(b'\\'), Some(b'u')) => {}
                    (None, _) | (Some(b'\\'), None) => {
                        return Err(self.error_at(at + 7, "EOF while parsing a string"))
                    }
                    _ => return Err(self.error_at(at + 6, "unexpected end of hex escape")),
                }
                match self.hex_escape(at + 8)? {
                    0xDC00..=0xDFFF => Ok((12, 4)),
                    _ => Err(self.error_at(at + 11, "lone leading surrogate in hex escape")),
                }
            }
            0..=0x7F => Ok((6, 1)),
            0x80..=0x7FF => Ok((6, 2)),
            _ => Ok((6, 3)),
        }
    }

    /// The four hex digits of a `\u` escape, at `bytes[at..at + 4]`.
    fn hex_escape(&self, at: usize) -> Result<u16> {
        if self.bytes.len() < at + 4 {
            return Err(self.error_at(self.bytes.len(), "EOF while parsing a string"));
        }
        hex4(self.bytes, at).ok_or_else(|| self.error_at(at + 3, "invalid escape"))
    }

    /// Skips one value of any kind the way `serde_json` ignores a field: the grammar is
    /// checked, the contents are not (see the module docs), and nesting has no limit.
    pub(crate) fn skip_value(&mut self) -> Result<()> {
        let mut open = Frames::default();
        // Each turn reads one value; then the loop below closes what it ends.
        loop {
            match self.peek() {
                Some(b'"') => self.skip_string()?,
                Some(b'-' | b'0'..=b'9') => {
                    self.number()?;
                }
                Some(b'n' | b't' | b'f') => self.literal()?,
                Some(b'[') => {
                    self.bump();
                    match self.peek() {
                        Some(b']') => self.bump(),
                        // The first element (or an error there).
                        _ => {
                            open.push(false);
                            continue;
                        }
                    }
                }
                Some(b'{') => {
                    self.bump();
                    match self.peek() {
                        Some(b'}') => self.bump(),
                        _ => {
                            open.push(true);
                            self.skip_key()?;
                            continue;
                        }
                    }
                }
                Some(_) => return Err(self.error("expected value")),
                None => return Err(self.error("EOF while parsing a value")),
            }
            // A value has ended: a comma and the next one, or the end of its container
            // (and perhaps of those around it).
            loop {
                let Some(object) = open.last() else {
                    return Ok(());
                };
                match self.peek() {
                    Some(b',') => {
                        self.bump();
                        if object {
                            self.skip_key()?;
                        }
                        break;
                    }
                    Some(b']') if !object => self.bump(),
                    Some(b'}') if object => self.bump(),
                    Some(_) if object => return Err(self.error("expected `,` or `}`")),
                    Some(_) => return Err(self.error("expected `,` or `]`")),
                    None if object => return Err(self.error("EOF while parsing an object")),
                    None => return Err(self.error("EOF while parsing a list")),
                }
                open.pop();
            }
        }
    }

    /// Skips an object key inside a skipped value, and the colon after it.
    fn skip_key(&mut self) -> Result<()> {
        match self.peek() {
            Some(b'"') => self.skip_string()?,
            Some(_) => return Err(self.error("key must be a string")),
            None => return Err(self.error("EOF while parsing an object")),
        }
        self.colon()
    }

    /// Checks that nothing but whitespace is left.
    pub(crate) fn end(&mut self) -> Result<()> {
        match self.peek() {
            Some(_) => Err(self.error("trailing characters")),
            None => Ok(()),
        }
    }
}

/// The arrays and objects open around the current point of a skipped value, innermost
/// last: one bit each (set for an object). The first 128 levels live in a register;
/// deeper ones (skipped values have no depth limit, as in serde_json) spill to the heap.
#[derive(Default)]
struct Frames {
    /// Levels `128 * spilled.len()` and up, one bit each from bit 0.
    bits: u128,
    /// How many containers are open.
    depth: usize,
    /// The bits of the outer levels, 128 levels an entry, outermost first.
    spilled: Vec<u128>,
}

impl Frames {
    /// Opens an array (`false`) or an object (`true`) inside the innermost container.
    fn push(&mut self, object: bool) {
        let bit = self.depth % 128;
        if bit == 0 && self.depth > 0 {
            self.spilled.push(self.bits);
            self.bits = 0;
        }
        self.bits |= u128::from(object) << bit;
        self.depth += 1;
    }

    /// Whether the innermost open container is an object (`None` when there is none).
    fn last(&self) -> Option<bool> {
        let depth = self.depth.checked_sub(1)?;
        Some((self.bits >> (depth % 128)) & 1 == 1)
    }

    /// Closes the innermost container.
    fn pop(&mut self) {
        self.depth -= 1;
        let bit = self.depth % 128;
        self.bits &= !(1 << bit);
        if bit == 0 && self.depth > 0 {
            self.bits = self.spilled.pop().unwrap_or(0);
        }
    }
}

/// `ESCAPES` entry for a letter that makes a one-letter escape after a backslash.
const SIMPLE: u8 = 1;

/// What each byte means after a backslash: [`SIMPLE`], or 0 (a `\u` escape or an error).
const ESCAPES: [u8; 256] = {
    let mut table = [0; 256];
    let letters = *b"\"\\/bfnrt";
    let mut i = 0;
    while i < letters.len() {
        table[letters[i] as usize] = SIMPLE;
        i += 1;
    }
    table
};

/// The value of each hex digit, -1 for other bytes.
const HEX: [i8; 256] = {
    let mut table = [-1; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as i8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as i8;
        table[b'A' as usize + i] = 10 + i as i8;
        i += 1;
    }
    table
};

/// The four hex digits at `bytes[at..at + 4]` as a number, if they are four hex digits.
fn hex4(bytes: &[u8], at: usize) -> Option<u16> {
    let digits = bytes.get(at..at + 4)?;
    let mut value: i32 = 0;
    let mut bad = 0;
    for &digit in digits {
        let v = HEX[usize::from(digit)];
        bad |= v;
        value = (value << 4) | i32::from(v & 0xF);
    }
    (bad >= 0).then_some(value as u16)
}

/// For each possible first byte of a UTF-8 character: its length and the range its second
/// byte must fall in (Unicode's table of well-formed sequences, which `std::str::from_utf8`
/// follows: no overlong forms, no surrogates, nothing above U+10FFFF). Length 0 for bytes
/// that cannot start a multi-byte character.
const UTF8_LEADS: [(u8, u8, u8); 256] = {
    let mut table = [(0, 0, 0); 256];
    let mut b = 0xC2;
    while b <= 0xDF {
        table[b] = (2, 0x80, 0xBF);
        b += 1;
    }
    let mut b = 0xE0;
    while b <= 0xEF {
        table[b] = (3, 0x80, 0xBF);
        b += 1;
    }
    table[0xE0] = (3, 0xA0, 0xBF);
    table[0xED] = (3, 0x80, 0x9F);
    table[0xF0] = (4, 0x90, 0xBF);
    let mut b = 0xF1;
    while b <= 0xF3 {
        table[b] = (4, 0x80, 0xBF);
        b += 1;
    }
    table[0xF4] = (4, 0x80, 0x8F);
    table
};

/// The length of the well-formed multi-byte UTF-8 character starting at `bytes[at]`, or 0.
/// Worked out without branches on the character's length (which varies unpredictably).
#[inline(always)]
fn utf8_char_len(bytes: &[u8], at: usize) -> usize {
    let (len, low, high) = UTF8_LEADS[usize::from(bytes[at])];
    // A missing byte reads as 0, which is no continuation byte.
    let byte = |i: usize| bytes.get(at + i).copied().unwrap_or(0);
    let continuation = |b: u8| (b & 0xC0) == 0x80;
    let (second, third, fourth) = (byte(1), byte(2), byte(3));
    let ok = (second >= low)
        & (second <= high)
        & ((len < 3) | continuation(third))
        & ((len < 4) | continuation(fourth));
    if ok {
        usize::from(len)
    } else {
        0
    }
}

/// Marks (with the high bit of its byte) the first byte of `word` (little-endian) that a
/// string scan must stop at: a quote, a backslash, a control character, and if `UTF8`,
/// any byte of 0x80 or more. Bytes after the first marked one may be marked too (a borrow
/// carries into them); the first one marked is always right.
#[inline(always)]
fn specials<const UTF8: bool>(word: u64) -> u64 {
    // A byte is zero in `x` where `word` has the byte looked for; `(x - 1) & !x` sets the
    // high bit of such bytes (Mycroft's test).
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let quote = quote.wrapping_sub(ONES) & !quote;
    let backslash = backslash.wrapping_sub(ONES) & !backslash;
    // `byte - 0x20` has its high bit set for bytes below 0x20 and from 0xA0 up; or-ing
    // the byte itself adds 0x80 and up, and-ing its complement removes them.
    let below_space = word.wrapping_sub(ONES * 0x20);
    let stop = if UTF8 {
        below_space | word
    } else {
        below_space & !word
    };
    (quote | backslash | stop) & HIGH_BITS
}

/// The first byte from `pos` on that [`specials`] stops at, or `bytes.len()`.
#[inline(always)]
fn next_special<const UTF8: bool>(bytes: &[u8], mut pos: usize) -> usize {
    while let Some(chunk) = bytes.get(pos..pos + 16) {
        let low = specials::<UTF8>(word(chunk, 0));
        let high = specials::<UTF8>(word(chunk, 8));
        let found = (u128::from(high) << 64) | u128::from(low);
        if found != 0 {
            return pos + (found.trailing_zeros() / 8) as usize;
        }
        pos += 16;
    }
    // Fewer than 16 bytes left.
    while let Some(&byte) = bytes.get(pos) {
        if byte == b'"' || byte == b'\\' || byte < 0x20 || (UTF8 && byte >= 0x80) {
            break;
        }
        pos += 1;
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The UTF-8 check at the scan's stops agrees with the standard library's on every
    /// one-, two- and three-byte sequence, and on four-byte ones with their last two bytes
    /// drawn from the interesting values.
    #[test]
    fn utf8_char_len_agrees_with_std() {
        let std_len = |seq: &[u8]| match std::str::from_utf8(seq) {
            Ok(s) => s.chars().next().map_or(0, char::len_utf8),
            Err(e) => match e.valid_up_to() {
                0 => 0,
                n => std::str::from_utf8(&seq[..n])
                    .unwrap()
                    .chars()
                    .next()
                    .unwrap()
                    .len_utf8(),
            },
        };
        let check = |seq: &[u8]| {
            let ours = utf8_char_len(seq, 0);
            // Ours looks at one character; std's first character must be that one.
            let expected = match std_len(seq) {
                n if n >= 2 => n,
                _ => 0,
            };
            assert_eq!(ours, expected, "{seq:02x?}");
        };
        for a in 0x80..=0xFFu8 {
            check(&[a]);
            for b in 0..=0xFFu8 {
                check(&[a, b]);
                if a >= 0xE0 {
                    for c in 0..=0xFFu8 {
                        check(&[a, b, c]);
                    }
                }
                if a >= 0xF0 {
                    for c in [0x00, 0x7F, 0x80, 0x8F, 0x90, 0xBF, 0xC0, 0xFF] {
                        for d in [0x00, 0x7F, 0x80, 0xA5, 0xBF, 0xC0, 0xFF] {
                            check(&[a, b, c, d]);
                        }
                    }
                }
            }
        }
    }

    /// The word-wide stop test finds the same first byte as a byte-by-byte one, at every
    /// offset of a 16-byte block and for every byte value.
    #[test]
    fn next_special_finds_the_first_stop() {
        for stop in 0..=0xFFu8 {
            for at in 0..40 {
                let mut bytes = vec![b'a'; 40];
                bytes[at] = stop;
                // Another stop further on must not hide the first.
                bytes[39] = b'"';
                let slow = |utf8: bool| {
                    bytes
                        .iter()
                        .position(|&b| b == b'"' || b == b'\\' || b < 0x20 || (utf8 && b >= 0x80))
                        .unwrap()
                };
                assert_eq!(
                    next_special::<true>(&bytes, 0),
                    slow(true),
                    "{stop:#x} at {at}"
                );
                assert_eq!(
                    next_special::<false>(&bytes, 0),
                    slow(false),
                    "{stop:#x} at {at}"
                );
            }
        }
    }

    /// Decoding turns every kind of escape into its UTF-8 bytes, and stops where asked,
    /// even inside a character.
    #[test]
    fn decode_prefix_decodes_escapes() {
        let mut scanner = Scanner::new(br#""d\u0061t\u0061:x\ud83d\ude80\n""#);
        let s = scanner.string().unwrap();
        assert_eq!(s.decoded_len, "data:x🚀\n".len());
        let mut out = [0; 16];
        let n = s.decode_prefix(&mut out);
        assert_eq!(&out[..n], "data:x🚀\n".as_bytes());
        assert_eq!(s.decode(), "data:x🚀\n");
        let mut out = [0; 8];
        assert_eq!(s.decode_prefix(&mut out), 8);
        assert_eq!(&out, &"data:x🚀".as_bytes()[..8]);
    }

    /// Skipped values nest without limit: levels past 128 go to the heap and come back.
    #[test]
    fn frames_spill_past_128_levels() {
        let mut frames = Frames::default();
        let pattern = |i: usize| i % 3 == 0 || i % 7 == 0;
        for i in 0..1000 {
            frames.push(pattern(i));
            assert_eq!(frames.last(), Some(pattern(i)));
        }
        for i in (0..1000).rev() {
            assert_eq!(frames.last(), Some(pattern(i)), "level {i}");
            frames.pop();
        }
        assert_eq!(frames.last(), None);
    }
}
