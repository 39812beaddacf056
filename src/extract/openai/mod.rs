//! Estimating OpenAI-style JSON bodies (feature `openai`): the estimator, the JSON scanner
//! it and the usage reader share, and what the layer learns from reported usage to
//! estimate better (output allowances, prompt calibrations).

mod calibrate;
mod estimate;
pub(crate) mod json_scan;
mod learn;

pub use self::calibrate::{CalibratedModel, PromptCalibration};
pub(crate) use self::calibrate::{Features, PromptFeatures};
pub use self::estimate::{OpenAiEstimate, OpenAiEstimator};
pub use self::learn::{AdaptiveOutput, LearnedOutput};

/// The learned allowances, by the name shared code uses with or without the feature.
pub(crate) type Adaptive = AdaptiveOutput;

/// The prompt calibrations, by the name shared code uses with or without the feature.
pub(crate) type Calibration = PromptCalibration;

/// What an estimate uses of what the layer has learned.
#[derive(Default, Clone, Copy)]
pub(crate) struct Learned<'a> {
    /// Output allowances, and the request's tenant.
    pub(crate) output: Option<(&'a AdaptiveOutput, &'a str)>,
    /// Prompt calibrations per model.
    pub(crate) prompts: Option<&'a PromptCalibration>,
}

impl<'a> Learned<'a> {
    pub(crate) fn new(
        output: Option<&'a AdaptiveOutput>,
        prompts: Option<&'a PromptCalibration>,
        tenant: &'a str,
    ) -> Self {
        Learned {
            output: output.map(|table| (table, tenant)),
            prompts,
        }
    }
}
