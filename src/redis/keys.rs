//! Where a tracker's data lives in Redis. Every key starts with the tracker's prefix and
//! holds one tenant's (or budget's) data under the hash tag `{t:<tenant>}`, so that a
//! cluster keeps it in one slot.

/// The names of a tracker's keys.
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: String) -> Self {
        Self { prefix }
    }

    /// What every key starts with.
    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hash of `tenant`'s leases (see [`scripts`](super::scripts)).
    pub(super) fn tokens(&self, tenant: &str) -> String {
        format!("{}{{t:{tenant}}}:tokens", self.prefix)
    }

    /// The bucket of `tenant` in the window `window` keeps beside its leases (see
    /// `window.lua`), under the same hash tag.
    pub(super) fn window(&self, tenant: &str, window: &str) -> String {
        format!("{}{{t:{tenant}}}:w:{window}", self.prefix)
    }

    /// A `SCAN` pattern matching every tenant's hash of leases.
    pub(super) fn all_tokens(&self) -> String {
        format!("{}{{t:*}}:tokens", escape_glob(&self.prefix))
    }

    /// The tenant whose hash of leases `key` is, if it is one.
    pub(super) fn tenant_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        let tagged = key.strip_prefix(self.prefix.as_str())?;
        tagged.strip_prefix("{t:")?.strip_suffix("}:tokens")
    }
}

/// `text` with the characters a glob pattern (`SCAN`'s, a pattern subscription's) treats
/// specially escaped.
pub(super) fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}
