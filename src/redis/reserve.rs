//! Reserving in Redis, and what the failure policy answers when Redis cannot be asked.

use std::sync::Arc;

use super::batch::WindowAsk;
use super::lease::{clamp, Lease, MAX_REDIS_TOKENS};
use super::reservation::RedisReservation;
use super::shared::Inner;
use super::stats::Count;
use crate::Error;

impl Inner {
    /// Reserves `tokens` for `tenant_id` with a lease of its own, under the tenant's cap
    /// when `checked`, whatever it when not (shadow mode).
    pub(super) async fn reserve(
        this: &Arc<Self>,
        tenant_id: &str,
        tokens: u64,
        checked: bool,
    ) -> Result<RedisReservation, Error> {
        Self::reserve_charged(this, tenant_id, tokens, checked, &mut Vec::new()).await
    }

    /// [`reserve`](Self::reserve), charging `windows` in the same call, all or nothing.
    /// The windows' asks are emptied when Redis took them, and left when it was not asked
    /// (the failure policy answered).
    pub(super) async fn reserve_charged(
        this: &Arc<Self>,
        tenant_id: &str,
        tokens: u64,
        checked: bool,
        windows: &mut Vec<WindowAsk>,
    ) -> Result<RedisReservation, Error> {
        let cap = this.cap(tenant_id);
        let tokens = if checked { tokens } else { clamp(tokens) };
        // Unchecked, the script is given the largest cap there is; the lease keeps the
        // tenant's own for the headers.
        let limit = if checked { cap } else { MAX_REDIS_TOKENS };
        if tokens > limit {
            return Err(Error::RequestTooLarge {
                tenant_id: tenant_id.to_owned(),
                tokens,
                cap,
            });
        }
        if !this.breaker().allow() {
            return this.unavailable(tenant_id, tokens, checked, "circuit open");
        }
        let pending = Unanswered::new(this, Arc::new(this.new_lease(tenant_id, cap, tokens)));
        let lease = pending.lease();
        let mut attempt = 0;
        let answer = loop {
            let asks = windows.iter().map(WindowAsk::again).collect();
            let reserving = this.batches().reserve_charged(lease, tokens, limit, asks);
            match this.timed(reserving).await {
                // A broken connection is retried once, with the same lease id: if the
                // first attempt did reach Redis, the second admits nothing twice.
                Err(failure) if attempt == 0 && failure.is_connection() => {
                    attempt += 1;
                    tracing::debug!(%failure, "redis reserve failed, retrying once");
                }
                other => break other,
            }
        };
        let (status, in_flight): (i64, u64) = match answer {
            Ok(answer) => answer,
            Err(failure) => {
                let reason = failure.to_string();
                this.breaker().failure(&reason);
                drop(pending); // it may have landed after all: released by id
                return this.unavailable(tenant_id, tokens, checked, &reason);
            }
        };
        this.breaker().success();
        let lease = pending.answered();
        if status <= -2 {
            // A window refused: the lease was released again in the same call.
            let at = usize::try_from(-2 - status).unwrap_or(usize::MAX);
            let refused = windows.get(at).map(|ask| ask.refused(tenant_id, in_flight));
            return Err(refused.unwrap_or_else(|| Error::BackendUnavailable {
                reason: format!("redis answered {status} for {} windows", windows.len()),
            }));
        }
        if status == 1 {
            windows.clear(); // charged in Redis
        }
        match status {
            1 => {
                this.counters().add(Count::Admitted);
                lease.set_in_flight(in_flight);
                this.hold(&lease);
                Ok(RedisReservation::lease(lease, Arc::clone(this)))
            }
            0 => {
                this.counters().add(Count::Refused);
                Err(Error::TenantOverloaded {
                    tenant_id: tenant_id.to_owned(),
                    requested: tokens,
                    in_flight,
                    cap,
                })
            }
            _ => Err(Error::RequestTooLarge {
                tenant_id: tenant_id.to_owned(),
                tokens,
                cap,
            }),
        }
    }

    /// Answers a request Redis could not decide, as the failure policy says.
    pub(super) fn unavailable(
        &self,
        tenant_id: &str,
        tokens: u64,
        checked: bool,
        reason: &str,
    ) -> Result<RedisReservation, Error> {
        self.counters().add(Count::Unavailable);
        tracing::debug!(tenant = tenant_id, tokens, reason, policy = ?self.fallback().policy(),
            "redis unavailable: the failure policy answers");
        match self.fallback().admit(tenant_id, tokens, checked, reason)? {
            Some(reservation) => Ok(RedisReservation::local(reservation)),
            None => Ok(RedisReservation::uncounted(tenant_id, tokens)),
        }
    }
}

/// A reservation sent to Redis and not answered yet. Dropped unanswered (the call failed or
/// timed out, or the request waiting for it was cancelled), it is released by id in the
/// background, in case Redis applied it: a cancelled request leaves nothing behind for the
/// TTL to clean up.
pub(super) struct Unanswered<'a> {
    tracker: &'a Arc<Inner>,
    lease: Option<Arc<Lease>>,
}

impl<'a> Unanswered<'a> {
    pub(super) fn new(tracker: &'a Arc<Inner>, lease: Arc<Lease>) -> Self {
        Self {
            tracker,
            lease: Some(lease),
        }
    }

    pub(super) fn lease(&self) -> &Arc<Lease> {
        self.lease.as_ref().expect("not answered yet")
    }

    pub(super) fn answered(mut self) -> Arc<Lease> {
        self.lease.take().expect("answered once")
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.tracker.release_later(lease);
        }
    }
}
