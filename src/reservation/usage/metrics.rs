//! What the usage reader tells the metrics recorder about a reservation: the series of
//! the `metrics` module that only a layer reading usage records, and nothing without the
//! `metrics` feature.

use crate::metrics::Tag;
use crate::reservation::Reserved;

impl Reserved<'_> {
    /// Tells the metrics recorder, through `tell`, what the reader found about it.
    pub(crate) fn tell(&self, tell: impl FnOnce(&Tag)) {
        tell(self.tag);
    }
}

#[cfg(feature = "metrics")]
mod recorded {
    use std::collections::HashSet;
    use std::sync::{Mutex, PoisonError};

    use metrics::{counter, gauge, Label};

    use crate::metrics::{
        Tag, MODEL_LABELS, OTHER_TENANTS, OUTPUT_ALLOWANCE, STREAMS_OUTRAN, STREAM_USAGE_MISSING,
    };

    /// The models labelled so far, in this process.
    static MODELS: Mutex<Option<HashSet<Box<str>>>> = Mutex::new(None);

    impl Tag {
        /// The response outran its reservation, which grew as it went.
        pub(crate) fn outran(&self) {
            match self.estimate_labels() {
                None => counter!(STREAMS_OUTRAN).increment(1),
                Some(labels) => counter!(STREAMS_OUTRAN, labels).increment(1),
            }
        }

        /// An event stream the layer asked for its usage ended without reporting any.
        pub(crate) fn usage_missing(&self) {
            match self.estimate_labels() {
                None => counter!(STREAM_USAGE_MISSING).increment(1),
                Some(labels) => counter!(STREAM_USAGE_MISSING, labels).increment(1),
            }
        }

        /// The output allowance learned for this tenant and `model` is now `tokens`.
        pub(crate) fn learned(&self, model: &str, tokens: u64) {
            let labelled = self
                .labels
                .iter()
                .any(|label| label.key() == "tenant" && label.value() != OTHER_TENANTS);
            if !labelled {
                return;
            }
            {
                let mut models = MODELS.lock().unwrap_or_else(PoisonError::into_inner);
                let models = models.get_or_insert_with(HashSet::new);
                if !models.contains(model) {
                    if models.len() >= MODEL_LABELS {
                        return;
                    }
                    models.insert(model.into());
                }
            }
            let mut labels = self.labels.clone();
            labels.push(Label::new("model", model.to_owned()));
            gauge!(OUTPUT_ALLOWANCE, labels).set(tokens as f64);
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod silent {
    use crate::metrics::Tag;

    impl Tag {
        /// Records nothing.
        #[inline(always)]
        pub(crate) fn outran(&self) {}

        /// Records nothing.
        #[inline(always)]
        pub(crate) fn usage_missing(&self) {}

        /// Records nothing.
        #[inline(always)]
        pub(crate) fn learned(&self, _model: &str, _tokens: u64) {}
    }
}
