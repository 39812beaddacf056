//! Guides: how the layer behaves, one topic a page.
//!
//! The [crate root](crate) has the quick start and the list of types; these pages cover
//! the rest. Every Rust sample in them is compiled as a doc test.
//!
//! - [`integrating`]: putting the layer in front of a service: where the tenant and the
//!   estimate come from, reconciling with real usage, the tracker on its own, per-route
//!   settings, layer order, tenant identity, and the runnable examples.
//! - [`refusals`]: every refusal with its status and JSON code, bad input case by case,
//!   your own refusal responses, `Retry-After`, and waiting for capacity instead of an
//!   immediate 429.
//! - [`estimates`]: what a request reserves, and how the reservation follows the usage the
//!   upstream reports: live stream accounting, asking streams for usage, learned output
//!   allowances.
//! - [`budgets`]: shared budgets, caps that all tenants draw from together (the upstream's
//!   capacity, one per model).
//! - [`windows`]: limits over time (tokens per minute, per day, per 30 days), charged
//!   in the same admission as the in-flight cap and settled on the usage reported.
//! - [`observing`]: seeing and trialling the caps: the ledger's snapshot, metrics,
//!   rate-limit headers, shadow mode, logs.
//! - [`replicas`]: several replicas, one cap in Redis: leases, failure policies, what to
//!   configure alike.
//! - [`guarantees`]: what holds whatever happens to a request.
//! - [`decisions`]: decisions worth knowing, with the reasons for them.
//!
//! How the crate is tested, and what CI runs, is in the repository's `CONTRIBUTING.md`.
//!
//! Measured figures (overhead, throughput, memory, a soak run) are kept out of the docs,
//! where they would go stale; they are in the repository's `benches/README.md`, with the
//! commands that reproduce them.

pub mod budgets;
pub mod decisions;
pub mod estimates;
pub mod guarantees;
pub mod integrating;
pub mod observing;
pub mod refusals;
pub mod replicas;
pub mod windows;
