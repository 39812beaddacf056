//! Reading the usage upstreams report in their responses (feature `openai`).

mod report;
mod stream;
mod tap;

pub(crate) use self::tap::Tap;
