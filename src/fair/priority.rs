//! Priority classes: which waiting requests are served first when capacity frees.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// How important a request is, as the Kubernetes Gateway API Inference Extension's
/// criticality: when requests wait for a shared budget, a higher class is admitted strictly
/// first, and within a class tenants share fairly (see
/// [`TenantTokenLayer::wait_for_capacity`](crate::TenantTokenLayer::wait_for_capacity)).
///
/// A `Sheddable` request that arrives while others wait for a budget it draws from is
/// refused at once ([`Error::Shed`], 429) instead of queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Served only when nothing more important waits; refused rather than queued while
    /// others wait.
    Sheddable,
    /// The default.
    #[default]
    Standard,
    /// Served before every waiting `Standard` and `Sheddable` request.
    Critical,
}

impl Priority {
    /// The class's name as headers spell it: `critical`, `standard` or `sheddable`.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Standard => "standard",
            Priority::Sheddable => "sheddable",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = Error;

    /// `critical`, `standard` or `sheddable`, in any case.
    fn from_str(text: &str) -> Result<Self, Error> {
        [Priority::Critical, Priority::Standard, Priority::Sheddable]
            .into_iter()
            .find(|class| class.as_str().eq_ignore_ascii_case(text))
            .ok_or_else(|| Error::InvalidPriority {
                reason: format!(
                    "`{}` is not one of critical, standard, sheddable",
                    text.escape_debug()
                ),
            })
    }
}
