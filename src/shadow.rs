//! Shadow (dry-run) mode: trial a cap before enforcing it.

use std::fmt;
use std::sync::Arc;

use crate::Error;

type TenantFn = dyn Fn(&str) -> bool + Send + Sync;

/// Whose cap refusals are only counted and logged, the request admitted anyway.
///
/// In shadow, a request over its tenant's cap, a shared budget or a window over time (what
/// would be a 429) or larger than one (a 413) is logged at `info` with `shadow = true`, counted
/// ([`TenantTokenLayer::shadow_refusals`](crate::TenantTokenLayer::shadow_refusals)), and
/// admitted: its tokens are reserved and counted like any others, so the in-flight figures
/// (and the refusals the trial reports) stay those of the real traffic, and an overshoot
/// shows in [`TenantTokenState::overcommits`](crate::TenantTokenState::overcommits).
/// Requests without a usable tenant or estimate are still answered by the `on_missing_*`
/// policies and 400s: shadow mode trials the cap, not the request format (use
/// [`MissingTenant::Unmetered`](crate::MissingTenant::Unmetered) to let such requests
/// through during a trial).
///
/// ```
/// use std::sync::Arc;
/// use tower_tenant_tokens::{ShadowMode, TenantTokenLayer, TenantTokenTracker};
///
/// let tracker = Arc::new(TenantTokenTracker::new(50_000));
/// // Enforce for everyone but the tenants being moved onto the new cap.
/// let layer = TenantTokenLayer::new(tracker)
///     .shadow(ShadowMode::tenants(|tenant| tenant.starts_with("trial-")));
/// # let _ = layer;
/// ```
#[derive(Clone, Default)]
pub enum ShadowMode {
    /// Every refusal is enforced (the default).
    #[default]
    Off,
    /// No cap refusal is enforced: every one is counted, logged and admitted.
    All,
    /// Cap refusals of the tenants the function picks are counted, logged and admitted;
    /// everyone else's are enforced. Build with [`ShadowMode::tenants`].
    Tenants(Arc<TenantFn>),
}

impl ShadowMode {
    /// Shadow for the tenants `f` answers `true` for. It runs only when a request would
    /// be refused.
    pub fn tenants<F>(f: F) -> Self
    where
        F: Fn(&str) -> bool + Send + Sync + 'static,
    {
        ShadowMode::Tenants(Arc::new(f))
    }

    /// Whether `error`, refusing a request of `tenant`, is only to be counted and logged.
    pub(crate) fn covers(&self, tenant: &str, error: &Error) -> bool {
        let cap_refusal = matches!(
            error,
            Error::TenantOverloaded { .. }
                | Error::RequestTooLarge { .. }
                | Error::BudgetOverloaded { .. }
                | Error::BudgetTooLarge { .. }
                | Error::WindowExceeded(_)
                | Error::WindowTooLarge(_)
        );
        cap_refusal
            && match self {
                ShadowMode::Off => false,
                ShadowMode::All => true,
                ShadowMode::Tenants(f) => f(tenant),
            }
    }
}

impl fmt::Debug for ShadowMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShadowMode::Off => f.write_str("Off"),
            ShadowMode::All => f.write_str("All"),
            ShadowMode::Tenants(_) => f.write_str("Tenants(..)"),
        }
    }
}
