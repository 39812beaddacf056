//! What property tests print: the bytes of a failing case, and how their cases came out.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;

/// Bytes shown as an escaped byte string in failure messages (the first 3,000 of them).
#[derive(Clone)]
pub struct Raw(pub Vec<u8>);

impl fmt::Debug for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 3000;
        let shown = &self.0[..self.0.len().min(SHOWN)];
        let more = if self.0.len() > SHOWN { "…" } else { "" };
        write!(
            f,
            "b\"{}\"{more} ({} bytes)",
            shown.escape_ascii(),
            self.0.len()
        )
    }
}

/// Counts outcomes by name, for the summary line a property prints at its end.
#[derive(Default)]
pub struct Tally(RefCell<BTreeMap<String, usize>>);

impl Tally {
    pub fn count(&self, what: impl Into<String>) {
        *self.0.borrow_mut().entry(what.into()).or_default() += 1;
    }

    pub fn show(&self) -> String {
        let counts = self.0.borrow();
        let total: usize = counts.values().sum();
        let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        format!("{total} cases: {}", parts.join(", "))
    }
}
