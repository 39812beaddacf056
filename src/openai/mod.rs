//! OpenAI-style JSON (feature `openai`): estimating requests from their bodies, and
//! reading the usage upstreams report in their responses.

mod ask;
mod calibrate;
mod estimate;
pub(crate) mod json_scan;
mod learn;
mod metrics;
mod report;
mod stream;
mod tap;

pub(crate) use self::ask::ask;
pub use self::calibrate::{CalibratedModel, PromptCalibration};
pub(crate) use self::calibrate::{Features, PromptFeatures};
pub use self::estimate::{OpenAiEstimate, OpenAiEstimator};
pub use self::learn::{AdaptiveOutput, LearnedOutput};
pub(crate) use self::tap::{Learn, Tap};

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
