//! Without the `openai` feature no response is read for usage. The same names as the
//! `usage` module's, as types that cannot be made, so that no shared file needs a `cfg`.

use std::sync::Arc;

use bytes::Buf;

use crate::extract::openai::{Adaptive, Calibration};
use crate::extract::Estimated;
use crate::reservation::Guard;

/// Never made: no layer reads usage without the feature.
#[derive(Debug)]
pub(crate) enum Tap {}

/// Never made: nothing is learned without the feature.
pub(crate) enum Learn {}

impl Learn {
    /// Nothing to learn without the feature.
    pub(crate) fn new(
        _adaptive: Option<&Arc<Adaptive>>,
        _calibration: Option<&Arc<Calibration>>,
        _tenant: &str,
        _estimated: Estimated,
        _asked: bool,
    ) -> Option<Self> {
        None
    }
}

/// Nothing is asked without the feature.
pub(crate) fn ask(_body: &[u8]) -> Option<bytes::Bytes> {
    None
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
