//! What the layer tells the metrics recorder, without the `metrics` feature: nothing.
//! The same names as the `metrics` module's, so that no shared file needs a `cfg`.

/// Records nothing.
#[derive(Debug, Default)]
pub(crate) struct Metrics;

/// Records nothing of one reservation.
#[derive(Debug)]
pub(crate) struct Tag;

impl Metrics {
    #[inline(always)]
    pub(crate) fn admitted(&self, _tenant: &str, _tokens: u64) -> Tag {
        Tag
    }

    #[inline(always)]
    pub(crate) fn shadowed(&self, _tenant: &str, _tokens: u64, _code: &'static str) -> Tag {
        Tag
    }

    #[inline(always)]
    pub(crate) fn refused(&self, _tenant: Option<&str>, _code: &'static str) {}

    #[inline(always)]
    pub(crate) fn waiting(&self, _class: crate::Priority, _delta: f64) {}

    #[inline(always)]
    pub(crate) fn waited(&self, _class: crate::Priority, _seconds: f64) {}

    #[inline(always)]
    pub(crate) fn budget_served(&self, _tenant: &str, _tokens: u64) {}

    #[inline(always)]
    pub(crate) fn window_remaining(&self, _tenant: &str, _charge: &impl crate::window::Charged) {}
}

impl Tag {
    #[inline(always)]
    pub(crate) fn resized(&mut self, _from: u64, _to: u64) {}

    #[inline(always)]
    pub(crate) fn charged(&self, _charge: &impl crate::window::Charged) {}

    #[inline(always)]
    pub(crate) fn released(&self, _tokens: u64) {}
}
