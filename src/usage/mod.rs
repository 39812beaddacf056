//! Reading the usage upstreams report in their responses (feature `openai`).

mod ask;
mod learn;
mod report;
mod stream;
mod tap;

pub(crate) use self::ask::ask;
pub use self::learn::{AdaptiveOutput, LearnedOutput};
pub(crate) use self::tap::{Learn, Tap};

/// The learned allowances, by the name shared code uses with or without the feature.
pub(crate) type Adaptive = AdaptiveOutput;
