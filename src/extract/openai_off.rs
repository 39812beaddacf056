//! Without the `openai` feature no body is estimated as OpenAI-style JSON and nothing is
//! learned. The same names as the `openai` module's, as types that cannot be made, so
//! that no shared file needs a `cfg`.

use crate::extract::Estimated;
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
