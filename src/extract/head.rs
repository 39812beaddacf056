//! The part of a request the sources read.

use http::request::Parts;
use http::{Extensions, HeaderMap, Request};

/// A request's head as the sources read it: its headers and extensions, and its `Parts`
/// once the request has been taken apart.
///
/// A request is read in place first, so that one whose sources need only its headers and
/// extensions is never taken apart and put together again. A source that hands your
/// function the `Parts` finds none in place, and the request is then taken apart and read
/// again, whole. Each source reads through this one type, so a source is written once for
/// both.
#[derive(Clone, Copy)]
pub(crate) struct Head<'a> {
    pub(crate) headers: &'a HeaderMap,
    pub(crate) extensions: &'a Extensions,
    /// `None` while the request is whole.
    pub(crate) parts: Option<&'a Parts>,
}

impl<'a> Head<'a> {
    /// The head of a request that is still whole.
    #[inline(always)]
    pub(crate) fn in_place<B>(request: &'a Request<B>) -> Self {
        Self {
            headers: request.headers(),
            extensions: request.extensions(),
            parts: None,
        }
    }

    /// The head of a request taken apart.
    pub(crate) fn whole(parts: &'a Parts) -> Self {
        Self {
            headers: &parts.headers,
            extensions: &parts.extensions,
            parts: Some(parts),
        }
    }
}
