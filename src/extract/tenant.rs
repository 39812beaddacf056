//! Finding the tenant of a request.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::header::HeaderName;
use http::request::Parts;
use http::Extensions;

use super::headers::Found;
use super::words::{word, HIGH_BITS, ONES};
use super::Head;

use crate::{Error, TenantScope};

type TenantFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// Where the layer finds the tenant of a request.
///
/// Headers are easy to try but anyone can set them: in production take the tenant from
/// what your authentication established, with [`extension`](Self::extension) (an auth layer
/// inserts a [`TenantScope`]) or [`from_fn`](Self::from_fn).
#[derive(Clone)]
pub struct TenantSource {
    from: TenantFrom,
}

#[derive(Clone)]
enum TenantFrom {
    Header(HeaderName),
    Extension,
    Fn(Arc<TenantFn>),
}

impl TenantSource {
    /// The default limit on a tenant id's length, in bytes
    /// ([`TenantTokenLayer::max_tenant_len`](crate::TenantTokenLayer::max_tenant_len)).
    pub const DEFAULT_MAX_LEN: usize = 256;

    /// The value of header `name`.
    ///
    /// The value must be one header, non-empty, at most the layer's
    /// [`max_tenant_len`](crate::TenantTokenLayer::max_tenant_len) bytes, and visible ASCII
    /// (`!` to `~`, no spaces or control bytes); anything else is refused as an invalid
    /// tenant (400) rather than counted under a surprising id.
    pub fn header(name: HeaderName) -> Self {
        Self {
            from: TenantFrom::Header(name),
        }
    }

    /// The [`TenantScope`] an earlier layer (your authentication) inserted into the request
    /// extensions. Trusted as it is, except that an empty id counts as missing.
    pub fn extension() -> Self {
        Self {
            from: TenantFrom::Extension,
        }
    }

    /// The tenant your function returns; `None` (or an empty id) counts as missing.
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self {
            from: TenantFrom::Fn(Arc::new(f)),
        }
    }

    /// The tenant of a request: `Ok(None)` when it has none. `None` when your function
    /// finds it and `head` has no `Parts` to hand it.
    #[inline(always)]
    pub(crate) fn read<'a>(
        &self,
        head: Head<'a>,
        max_len: usize,
    ) -> Option<Result<Option<Cow<'a, str>>, Error>> {
        Some(match &self.from {
            TenantFrom::Header(name) => {
                header_tenant(Found::lookup(head.headers, name), name, max_len)
            }
            TenantFrom::Extension => Ok(extension_tenant(head.extensions)),
            TenantFrom::Fn(f) => Ok(f(head.parts?).filter(|id| !id.is_empty()).map(Cow::Owned)),
        })
    }

    /// The header the tenant is read from, if that is where it comes from: the layer
    /// may find it together with the estimate's in one walk over the headers.
    #[inline]
    pub(crate) fn header_name(&self) -> Option<&HeaderName> {
        match &self.from {
            TenantFrom::Header(name) => Some(name),
            _ => None,
        }
    }
}

/// The tenant an earlier layer inserted; an empty id counts as missing.
fn extension_tenant(extensions: &Extensions) -> Option<Cow<'_, str>> {
    extensions
        .get::<TenantScope>()
        .map(|scope| scope.tenant_id.as_str())
        .filter(|id| !id.is_empty())
        .map(Cow::Borrowed)
}

/// The tenant in header `name`, checked as [`TenantSource::header`] says.
pub(crate) fn header_tenant<'a>(
    found: Found<'a>,
    name: &HeaderName,
    max_len: usize,
) -> Result<Option<Cow<'a, str>>, Error> {
    let invalid = |reason: String| Err(Error::InvalidTenant { reason });
    let value = match found {
        Found::Missing => return Ok(None),
        Found::One(value) => value,
        Found::Many => return invalid(format!("more than one `{name}` header")),
    };
    let len = value.len();
    if len == 0 {
        return invalid(format!("`{name}` is empty"));
    }
    if len > max_len {
        return invalid(format!("`{name}` is longer than {max_len} bytes"));
    }
    // Visible ASCII only: no spaces, no control bytes. `to_str` passes whatever `graphic`
    // passes (and also spaces and tabs); it gives the id as the `&str` it is kept as.
    match value.to_str() {
        Ok(id) if graphic(value.as_bytes()) => Ok(Some(Cow::Borrowed(id))),
        _ => invalid(format!(
            "`{name}` may hold only visible ASCII characters (no spaces or control bytes)"
        )),
    }
}

/// Whether every byte of `bytes` (at least one) is visible ASCII, `!` to `~`: checked eight
/// bytes at a time, as words, the last word overlapping the one before it.
#[inline(always)]
fn graphic(bytes: &[u8]) -> bool {
    // Whether some byte of `word` is below `!` or above `~`: subtracting `!` from a byte
    // below it sets the byte's high bit, as adding 1 to `~` or more does, and a byte whose
    // high bit is set already is outside. (A borrow or carry may mark a byte beside the
    // one outside too, which does not change the answer.)
    let outside = |word: u64| {
        let below = word.wrapping_sub(ONES * u64::from(b'!')) & !word;
        let above = word.wrapping_add(ONES * u64::from(0x7f - b'~')) | word;
        (below | above) & HIGH_BITS != 0
    };
    let len = bytes.len();
    if len < 8 {
        let mut padded = [b'!'; 8];
        padded[..len].copy_from_slice(bytes);
        return !outside(u64::from_le_bytes(padded));
    }
    let mut bad = outside(word(bytes, len - 8));
    let mut at = 0;
    while at + 8 < len {
        bad |= outside(word(bytes, at));
        at += 8;
    }
    !bad
}

impl fmt::Debug for TenantSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.from {
            TenantFrom::Header(name) => f.debug_tuple("Header").field(name).finish(),
            TenantFrom::Extension => f.write_str("Extension"),
            TenantFrom::Fn(_) => f.write_str("Fn"),
        }
    }
}

/// What to do with a request whose tenant cannot be found.
///
/// A tenant id that is present but invalid is always refused with 400: it is a client bug,
/// and counting it under some other id would hide it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissingTenant {
    /// Refuse with 400 Bad Request (the default).
    #[default]
    Reject,
    /// Refuse with 401 Unauthorized: for tenants that come from authentication, where a
    /// missing tenant means an unauthenticated caller.
    Unauthorized,
    /// Count the request under this shared tenant id.
    DefaultTenant(String),
    /// Let the request through without reserving anything.
    Unmetered,
}
