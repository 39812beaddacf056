//! Finding the one value a header must have, cheaply.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::words::word;

/// Up to this many header values, [`find_pair`] walks the map once instead of looking each
/// name up.
///
/// A lookup hashes the name byte by byte (FNV over a custom name such as `x-tenant-id`)
/// and then compares it, twice for the tenant and the estimate. Walking the map costs the
/// iterator and comparing each entry's name with both, so it is cheaper for the few
/// headers of a request from `curl` or another service, and lookups are cheaper for the
/// twenty or so an OpenAI SDK sends (`bash .ci/callgrind.sh 20000` and `… 20000 sdk`
/// measure both; benches/README.md has the figures).
const WALK_AT_MOST: usize = 8;

/// What a request carries under one header name.
#[derive(Clone, Copy)]
pub(crate) enum Found<'a> {
    Missing,
    One(&'a HeaderValue),
    /// The header more than once: which one counts would be anyone's guess.
    Many,
}

impl<'a> Found<'a> {
    /// The values of `name` in `headers`, by lookup.
    pub(crate) fn lookup(headers: &'a HeaderMap, name: &HeaderName) -> Self {
        // A map without a name given twice, as most are, is looked up once.
        if headers.len() == headers.keys_len() {
            return headers.get(name).map_or(Found::Missing, Found::One);
        }
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (None, _) => Found::Missing,
            (Some(value), None) => Found::One(value),
            (Some(_), Some(_)) => Found::Many,
        }
    }

    fn add(&mut self, value: &'a HeaderValue) {
        *self = match self {
            Found::Missing => Found::One(value),
            Found::One(_) | Found::Many => Found::Many,
        };
    }
}

/// The values of two header names, `first` and `second`, in one walk over a small map.
pub(crate) fn find_pair<'a>(
    headers: &'a HeaderMap,
    first: &HeaderName,
    second: &HeaderName,
) -> (Found<'a>, Found<'a>) {
    if headers.len() > WALK_AT_MOST {
        return (
            Found::lookup(headers, first),
            Found::lookup(headers, second),
        );
    }
    let (first, second) = (first.as_str().as_bytes(), second.as_str().as_bytes());
    let (mut a, mut b) = (Found::Missing, Found::Missing);
    for (name, value) in headers {
        let name = name.as_str().as_bytes();
        if same(name, first) {
            a.add(value);
        } else if same(name, second) {
            b.add(value);
        }
    }
    (a, b)
}

/// `a == b`, for header names: the names a layer looks for (`x-tenant-id`, say) are 8 to
/// 16 bytes long, and two machine words compare those without a call to `memcmp`.
#[inline(always)]
fn same(a: &[u8], b: &[u8]) -> bool {
    let len = a.len();
    if len != b.len() {
        return false;
    }
    if !(8..=16).contains(&len) {
        return a == b;
    }
    let last = len - 8;
    word(a, 0) == word(b, 0) && word(a, last) == word(b, last)
}
