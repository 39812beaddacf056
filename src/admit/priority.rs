//! Priority classes: which waiting requests are served first when capacity frees.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use http::header::HeaderName;
use http::{Extensions, HeaderMap};

use crate::extract::Found;
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

type PriorityFn = dyn Fn(&HeaderMap, &Extensions) -> Option<Priority> + Send + Sync;

/// Where the layer finds a request's [`Priority`]; a request without one is `Standard`.
#[derive(Clone)]
pub struct PrioritySource {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Header(HeaderName),
    Extension,
    Fn(Arc<PriorityFn>),
}

impl PrioritySource {
    /// The value of header `name`: `critical`, `standard` or `sheddable` (any case). Any
    /// other value, or the header twice, is refused with 400 (`invalid_priority`).
    pub fn header(name: HeaderName) -> Self {
        Self {
            kind: Kind::Header(name),
        }
    }

    /// The [`Priority`] an earlier layer (your authentication, say) inserted into the
    /// request extensions.
    pub fn extension() -> Self {
        Self {
            kind: Kind::Extension,
        }
    }

    /// The class your function finds from the request's headers and extensions.
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&HeaderMap, &Extensions) -> Option<Priority> + Send + Sync + 'static,
    {
        Self {
            kind: Kind::Fn(Arc::new(f)),
        }
    }

    /// The request's class.
    pub(crate) fn read(
        &self,
        headers: &HeaderMap,
        extensions: &Extensions,
    ) -> Result<Priority, Error> {
        let found = match &self.kind {
            Kind::Header(name) => match Found::lookup(headers, name) {
                Found::Missing => None,
                Found::One(value) => {
                    let text = value.to_str().map_err(|_| Error::InvalidPriority {
                        reason: format!("`{name}` is not visible ASCII"),
                    })?;
                    Some(text.parse()?)
                }
                Found::Many => {
                    return Err(Error::InvalidPriority {
                        reason: format!("more than one `{name}` header"),
                    })
                }
            },
            Kind::Extension => extensions.get::<Priority>().copied(),
            Kind::Fn(f) => f(headers, extensions),
        };
        Ok(found.unwrap_or_default())
    }
}

impl fmt::Debug for PrioritySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Header(name) => f.debug_tuple("Header").field(name).finish(),
            Kind::Extension => f.write_str("Extension"),
            Kind::Fn(_) => f.write_str("Fn"),
        }
    }
}
