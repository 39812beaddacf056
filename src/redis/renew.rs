//! Renewal: every live lease's deadline pushed back, one pipelined round trip per period,
//! and sooner when Redis may have lost leases (see [`events`](super::events)): a failed
//! renewal is retried after a short backoff, and a new connection is renewed on at once,
//! registering again in that call the leases the server lacks.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::RedisError;
use tokio::time::Instant;

use super::events::{Events, BROKEN, CHECK, HELD, RECONNECTED};
use super::lease::Lease;
use super::scripts::scripts;
use super::shared::Inner;

/// The first pause before a failed renewal is tried again; it doubles up to
/// [`RETRY_AT_MOST`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_AT_MOST: Duration = Duration::from_secs(1);
/// How often, while leases are held, the connection is checked with a `PING` between
/// renewals: a server restarted empty, or a master gone, is noticed this soon even when no
/// request comes.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How a renewal went.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Renewal {
    /// No lease to renew.
    Nothing,
    Done,
    Failed,
}

impl Inner {
    /// How long a renewal, or a check, may take.
    fn renewal_budget(&self) -> Duration {
        (self.renew_every() / 2).max(self.timeout())
    }

    /// Renews every live lease: one script call per tenant, all in one pipeline.
    async fn renew_all(self: &Arc<Self>, retrying: bool) -> Renewal {
        let by_tenant = self.leases().by_key();
        if by_tenant.is_empty() {
            return Renewal::Nothing;
        }
        let batches: Vec<_> = by_tenant.into_iter().collect();
        let mut pipe = redis::pipe();
        for (key, leases) in &batches {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(scripts().renew.get_hash())
                .arg(1)
                .arg(&**key)
                .arg(self.ttl_ms());
            for lease in leases {
                cmd.arg(lease.id()).arg(lease.tokens());
            }
            pipe.add_command(cmd);
        }
        let budget = self.renewal_budget();
        let mut conn = self.conn().clone();
        let sent = std::time::Instant::now();
        // Per tenant: the tokens in flight, then the ids of the leases registered again.
        let mut answer: Result<Vec<(u64, Vec<String>)>, RedisError> =
            match tokio::time::timeout(budget, pipe.query_async(&mut conn)).await {
                Ok(answer) => answer,
                Err(_) => {
                    if !retrying {
                        tracing::warn!("renewing leases in redis timed out; trying again soon");
                    }
                    return Renewal::Failed;
                }
            };
        if matches!(&answer, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            let reloaded = scripts().renew.prepare_invoke().load_async(&mut conn).await;
            answer = match reloaded {
                Ok(_) => pipe.query_async(&mut conn).await,
                Err(error) => Err(error),
            };
        }
        match answer {
            Ok(answers) => {
                for ((_, leases), (in_flight, again)) in batches.iter().zip(&answers) {
                    let again: HashSet<&str> = again.iter().map(String::as_str).collect();
                    for lease in leases.iter().filter(|lease| again.contains(lease.id())) {
                        self.registered_again(lease, *in_flight);
                    }
                    for lease in leases {
                        lease.set_in_flight(*in_flight);
                    }
                }
                let renewed: Vec<&Arc<Lease>> = batches.iter().flat_map(|(_, l)| l).collect();
                self.headroom_renewed(&renewed, sent);
                // Redis answers as a request's call must: that is what the breaker's
                // probe would find, so requests need not wait for it. A slower answer
                // proves nothing of the kind under load.
                if sent.elapsed() <= self.timeout() {
                    self.breaker().success();
                }
                if retrying {
                    tracing::info!(tenants = batches.len(), "renewed leases again");
                } else {
                    tracing::trace!(tenants = batches.len(), "renewed leases");
                }
                Renewal::Done
            }
            Err(error) => {
                if retrying {
                    tracing::debug!(%error, "could not renew leases in redis yet");
                } else {
                    tracing::warn!(%error, "could not renew leases in redis; trying again soon");
                }
                Renewal::Failed
            }
        }
    }

    /// Whether the connection passes its [check](super::conn::Conn::check), given as long
    /// as a renewal.
    async fn answers(&self) -> bool {
        match tokio::time::timeout(self.renewal_budget(), self.conn().check()).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                tracing::warn!(%error, "redis did not answer a health check; renewing as \
                    soon as it does");
                false
            }
            Err(_) => {
                tracing::warn!(
                    "a health check of redis timed out; renewing as soon as it \
                    answers"
                );
                false
            }
        }
    }
}

/// Renews a tracker's leases until the tracker, and every reservation it made, is gone:
/// every `every`, and, while leases are held, also
///
/// - at once when a connection to a server that may lack them is made (a new master),
///   and when a call found the connection broken (the renewal then waits for the
///   reconnection, which a restarted server answers at once);
/// - again after a failed renewal, backing off from [`RETRY_FIRST`] to
///   [`RETRY_AT_MOST`], rather than a whole period later;
/// - after a `PING` every [`CHECK_EVERY`] between renewals fails, or at once when the
///   Sentinels announced a new master.
///
/// A renewal that goes through registers again, in the same call, every lease the server
/// lacked. With no lease held, it only wakes each period, to let idle headroom go.
pub(super) async fn renew_forever(shared: Weak<Inner>, every: Duration, events: Arc<Events>) {
    let mut next_renewal = Instant::now() + every;
    // When the next attempt after a failure is due, and the pause that led there.
    let mut retry: Option<(Instant, Duration)> = None;
    let mut next_check: Option<Instant> = None;
    loop {
        let due = [Some(next_renewal), retry.map(|(at, _)| at), next_check]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_renewal);
        // Either way, what is due is worked out below.
        let _ = tokio::time::timeout_at(due, events.raised()).await;
        let Some(inner) = shared.upgrade() else {
            return;
        };
        let flags = events.take();
        let now = Instant::now();
        let periodic = now >= next_renewal;
        if periodic {
            next_renewal = now + every;
            inner.let_go_idle_headroom();
        }
        if !inner.holds_leases() {
            retry = None;
            next_check = None;
            if periodic {
                inner.renew_tickets().await;
            }
            continue;
        }
        if retry.is_none() && flags & BROKEN != 0 {
            retry = Some((now, Duration::ZERO));
        }
        // A new master announced while retrying: the attempt asks the Sentinels anyway.
        let retry_due = retry.is_some_and(|(at, _)| now >= at || flags & CHECK != 0);
        if periodic || retry_due || flags & RECONNECTED != 0 {
            let failed_before = retry.is_some_and(|(_, pause)| !pause.is_zero());
            let outcome = inner.renew_all(failed_before).await;
            inner.renew_tickets().await;
            retry = match outcome {
                Renewal::Failed => {
                    let pause = retry.map_or(RETRY_FIRST, |(_, pause)| {
                        (pause * 2).clamp(RETRY_FIRST, RETRY_AT_MOST)
                    });
                    Some((Instant::now() + pause, pause))
                }
                Renewal::Done | Renewal::Nothing => {
                    if !periodic {
                        next_renewal = Instant::now() + every;
                    }
                    None
                }
            };
            next_check = (every > CHECK_EVERY).then(|| Instant::now() + CHECK_EVERY);
            continue;
        }
        let check_due = next_check.is_some_and(|at| now >= at);
        if retry.is_none() && (check_due || flags & CHECK != 0) {
            // Through the Sentinels, a master in doubt is looked up again here, and a new
            // one raises `RECONNECTED`: the renewal follows at once.
            if !inner.answers().await {
                retry = Some((Instant::now(), Duration::ZERO));
            }
        }
        if retry.is_none() && (next_check.is_none() || check_due || flags & HELD != 0) {
            next_check = (every > CHECK_EVERY).then(|| Instant::now() + CHECK_EVERY);
        }
    }
}
