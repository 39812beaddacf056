//! Without the `openai` feature no response is read for usage. The same names as the
//! `usage` module's, so that no shared file needs a `cfg`.

use bytes::Buf;

use crate::reservation::Guard;

/// Never made: no layer reads usage without the feature.
#[derive(Debug)]
pub(crate) enum Tap {}

impl Tap {
    #[inline(always)]
    pub(crate) fn new_if(_enabled: bool, _prompt: u64) -> Option<Box<Self>> {
        None
    }

    #[allow(clippy::boxed_local)] // the signature of the `usage` module's
    pub(crate) fn start(
        self: Box<Self>,
        _headers: &http::HeaderMap,
        _guard: Guard,
    ) -> Result<Box<Self>, Guard> {
        match *self {}
    }

    pub(crate) fn read(&mut self, _data: &impl Buf) {
        match *self {}
    }

    pub(crate) fn finish(&mut self) {
        match *self {}
    }

    pub(crate) fn holds(&self) -> bool {
        match *self {}
    }
}
