//! Without the `openai` feature no body is estimated as OpenAI-style JSON and no
//! response is read for usage. The same names as the `openai` module's, as types that
//! cannot be made, so that no shared file needs a `cfg`.

use std::sync::Arc;

use bytes::Buf;

use crate::extract::Estimated;
use crate::reservation::Guard;
use crate::Error;

/// Never made: there is no OpenAI-style estimator without the feature.
#[derive(Debug, Clone)]
pub(crate) enum OpenAiEstimator {}

impl OpenAiEstimator {
    pub(crate) fn limit(&self) -> usize {
        match *self {}
    }

    pub(crate) fn estimated(
        &self,
        _body: &[u8],
        _want_model: bool,
        _learned: &Learned<'_>,
    ) -> Result<Estimated, Error> {
        match *self {}
    }
}

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

/// Never made: nothing is learned without the feature.
#[derive(Debug)]
pub(crate) enum Adaptive {}

/// Never made: nothing is calibrated without the feature.
#[derive(Debug)]
pub(crate) enum Calibration {}

/// Never made: no prompt is looked into without the feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Features {}

/// Nothing is learned without the feature.
#[derive(Default, Clone, Copy)]
pub(crate) struct Learned<'a>(std::marker::PhantomData<&'a ()>);

impl<'a> Learned<'a> {
    pub(crate) fn new(
        _output: Option<&'a Adaptive>,
        _prompts: Option<&'a Calibration>,
        _tenant: &'a str,
    ) -> Self {
        Learned(std::marker::PhantomData)
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
