//! Without the `openai` feature no response is read for usage. The same names as the
//! `usage` module's, so that no shared file needs a `cfg`.

use bytes::Buf;

use crate::reservation::Guard;

/// Never made: no layer reads usage without the feature.
#[derive(Debug)]
pub(crate) enum Tap {}

/// Never made: nothing is learned without the feature.
pub(crate) enum Learn {}

/// Never made: nothing is learned without the feature.
#[derive(Debug)]
pub(crate) enum Adaptive {}

/// Nothing is asked without the feature.
pub(crate) fn ask(_body: &[u8]) -> Option<bytes::Bytes> {
    None
}

impl Adaptive {
    pub(crate) fn allowance(&self, _tenant: &str, _model: &str) -> Option<u64> {
        match *self {}
    }

    pub(crate) fn caps_explicit_limits(&self) -> bool {
        match *self {}
    }
}

impl Tap {
    /// Gives the guard back: nothing is read without the feature.
    #[inline(always)]
    pub(crate) fn new(
        guard: Guard,
        _prompt: u64,
        _learn: Option<Learn>,
        _asked: bool,
    ) -> Result<Box<Self>, Guard> {
        Err(guard)
    }

    pub(crate) fn limits(&self) -> Option<(u64, u64)> {
        match *self {}
    }

    #[allow(clippy::boxed_local)] // the signature of the `usage` module's
    pub(crate) fn start(
        self: Box<Self>,
        _headers: &http::HeaderMap,
    ) -> Result<Box<Self>, Option<Guard>> {
        match *self {}
    }

    pub(crate) fn read(&mut self, _data: &impl Buf) {
        match *self {}
    }

    pub(crate) fn end(&mut self) {
        match *self {}
    }

    pub(crate) fn finish(&mut self) {
        match *self {}
    }

    pub(crate) fn holds(&self) -> bool {
        match *self {}
    }

    pub(crate) fn strips(&self) -> bool {
        match *self {}
    }

    pub(crate) fn pass(&mut self, _data: bytes::Bytes) -> bytes::Bytes {
        match *self {}
    }

    pub(crate) fn rest(&mut self) -> bytes::Bytes {
        match *self {}
    }
}
