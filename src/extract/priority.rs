//! Where a request's priority class comes from.

use std::fmt;
use std::sync::Arc;

use http::header::HeaderName;
use http::{Extensions, HeaderMap};

use super::headers::Found;
use crate::{Error, Priority};

type PriorityFn = dyn Fn(&HeaderMap, &Extensions) -> Option<Priority> + Send + Sync;

/// Where the layer finds a request's [`Priority`]; a request without one is `Standard`.
#[derive(Clone)]
pub struct PrioritySource {
    from: PriorityFrom,
}

#[derive(Clone)]
enum PriorityFrom {
    Header(HeaderName),
    Extension,
    Fn(Arc<PriorityFn>),
}

impl PrioritySource {
    /// The value of header `name`: `critical`, `standard` or `sheddable` (any case). Any
    /// other value, or the header twice, is refused with 400 (`invalid_priority`).
    pub fn header(name: HeaderName) -> Self {
        Self {
            from: PriorityFrom::Header(name),
        }
    }

    /// The [`Priority`] an earlier layer (your authentication, say) inserted into the
    /// request extensions.
    pub fn extension() -> Self {
        Self {
            from: PriorityFrom::Extension,
        }
    }

    /// The class your function finds from the request's headers and extensions.
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&HeaderMap, &Extensions) -> Option<Priority> + Send + Sync + 'static,
    {
        Self {
            from: PriorityFrom::Fn(Arc::new(f)),
        }
    }

    /// The request's class.
    pub(crate) fn read(
        &self,
        headers: &HeaderMap,
        extensions: &Extensions,
    ) -> Result<Priority, Error> {
        let found = match &self.from {
            PriorityFrom::Header(name) => match Found::lookup(headers, name) {
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
            PriorityFrom::Extension => extensions.get::<Priority>().copied(),
            PriorityFrom::Fn(f) => f(headers, extensions),
        };
        Ok(found.unwrap_or_default())
    }
}

impl fmt::Debug for PrioritySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.from {
            PriorityFrom::Header(name) => f.debug_tuple("Header").field(name).finish(),
            PriorityFrom::Extension => f.write_str("Extension"),
            PriorityFrom::Fn(_) => f.write_str("Fn"),
        }
    }
}
