//! Reading the usage upstreams report in their responses (feature `openai`): the reader
//! that settles a reservation on it, and what it teaches the estimator.

mod ask;
mod metrics;
mod report;
mod stream;
mod tap;

pub(crate) use self::ask::ask;
pub(crate) use self::tap::{Learn, Tap};
