//! Without the `openai` feature no response is read for usage. The same names as the
//! `usage` module's, as types that cannot be made, so that no shared file needs a `cfg`.

use std::sync::Arc;

use bytes::{Buf, Bytes};

use crate::extract::openai::{Adaptive, Calibration};
use crate::extract::Estimated;
use crate::reservation::Reserved;

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
    /// No reader without the feature.
    #[inline(always)]
    pub(crate) fn new(_prompt: u64, _learn: Option<Learn>, _asked: bool) -> Option<Self> {
        None
    }

    pub(crate) fn start(&mut self, _headers: &http::HeaderMap) -> bool {
        match *self {}
    }

    pub(crate) fn strips(&self) -> bool {
        match *self {}
    }

    pub(crate) fn read(&mut self, _data: &impl Buf, _held: &mut Reserved<'_>) {
        match *self {}
    }

    pub(crate) fn pass(&mut self, _data: Bytes, _held: &mut Reserved<'_>) -> Bytes {
        match *self {}
    }

    pub(crate) fn rest(&mut self) -> Bytes {
        match *self {}
    }

    pub(crate) fn end(&mut self, _held: &mut Reserved<'_>) {
        match *self {}
    }

    pub(crate) fn finish(&mut self, _held: &mut Reserved<'_>) {
        match *self {}
    }
}
