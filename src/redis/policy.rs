//! What a tracker answers when Redis cannot be asked.

use std::sync::Arc;

use super::lease::clamp;
use crate::tracker::Caps;
use crate::{Error, TenantTokenTracker, TokenReservation};

/// What a [`RedisTokenTracker`](super::RedisTokenTracker) does with a request when Redis
/// cannot be asked (down, slower than the call timeout, or skipped while the circuit
/// breaker is open).
///
/// Every choice is logged: a `warn` when the breaker opens and when Redis answers again,
/// a `debug` line per request answered by the policy, and the counts in
/// [`RedisTokenTracker::stats`](super::RedisTokenTracker::stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Refuse: `503 Service Unavailable` with `Retry-After`
    /// ([`Error::BackendUnavailable`]). Nothing is admitted that the shared cap did not
    /// see. The default.
    FailClosed,
    /// Admit without counting: the caps are off until Redis is back.
    FailOpen,
    /// Count against this replica's share of each tenant's cap, `cap / replicas` (at
    /// least 1 token), in memory: with `replicas` replicas running, the tenant can still
    /// not exceed its cap in total.
    LocalShare {
        /// How many replicas share the cap.
        replicas: u32,
    },
}

/// The failure policy, and with [`FailurePolicy::LocalShare`] the in-memory tracker of
/// this replica's share of the caps.
pub(super) struct Fallback {
    policy: FailurePolicy,
    local: Option<Arc<TenantTokenTracker>>,
}

impl Fallback {
    pub(super) fn new(policy: FailurePolicy, caps: &Caps) -> Self {
        let local = match policy {
            FailurePolicy::LocalShare { replicas } => {
                let replicas = u64::from(replicas.max(1));
                let caps = caps.clone();
                let share = move |tenant: &str| Some((clamp(caps.of(tenant)) / replicas).max(1));
                Some(Arc::new(
                    TenantTokenTracker::builder(0).cap_fn(share).build(),
                ))
            }
            _ => None,
        };
        Self { policy, local }
    }

    pub(super) fn policy(&self) -> FailurePolicy {
        self.policy
    }

    /// The in-memory tracker of this replica's share, with [`FailurePolicy::LocalShare`].
    pub(super) fn local(&self) -> Option<&Arc<TenantTokenTracker>> {
        self.local.as_ref()
    }

    /// What the policy admits of a request Redis could not decide: a reservation against
    /// this replica's share, `None` when it admits without counting, or the refusal.
    pub(super) fn admit(
        &self,
        tenant_id: &str,
        tokens: u64,
        checked: bool,
        reason: &str,
    ) -> Result<Option<TokenReservation>, Error> {
        match (self.policy, &self.local) {
            (FailurePolicy::FailOpen, _) => Ok(None),
            (FailurePolicy::LocalShare { .. }, Some(local)) if !checked => {
                Ok(Some(local.reserve_unchecked(tenant_id, tokens)))
            }
            (FailurePolicy::LocalShare { .. }, Some(local)) => {
                match local.reserve_id(tenant_id, tokens) {
                    Ok(reservation) => Ok(Some(reservation)),
                    // Larger than the share, not than the cap: it fits once Redis is back.
                    Err(Error::RequestTooLarge { cap, .. }) => Err(Error::TenantOverloaded {
                        tenant_id: tenant_id.to_owned(),
                        requested: tokens,
                        in_flight: local.in_flight(tenant_id),
                        cap,
                    }),
                    Err(error) => Err(error),
                }
            }
            _ => Err(Error::BackendUnavailable {
                reason: format!("redis: {reason}"),
            }),
        }
    }
}
