//! Renewal: every live lease's deadline pushed back, one pipelined round trip per period.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::RedisError;

use super::lease::Lease;
use super::tracker::Inner;

impl Inner {
    /// Renews every live lease: one script call per tenant, all in one pipeline.
    async fn renew_all(self: &Arc<Self>) {
        let mut by_tenant: HashMap<Arc<str>, Vec<Arc<Lease>>> = HashMap::new();
        for lease in self.lock_leases().values() {
            by_tenant
                .entry(Arc::clone(&lease.key))
                .or_default()
                .push(Arc::clone(lease));
        }
        if by_tenant.is_empty() {
            return;
        }
        let batches: Vec<_> = by_tenant.into_iter().collect();
        let mut pipe = redis::pipe();
        for (key, leases) in &batches {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.scripts.renew.get_hash())
                .arg(1)
                .arg(&**key)
                .arg(self.ttl_ms());
            for lease in leases {
                cmd.arg(&lease.id).arg(lease.tokens.load(Relaxed));
            }
            pipe.add_command(cmd);
        }
        let budget = (self.renew_every / 2).max(self.timeout);
        let mut conn = self.conn.clone();
        let sent = std::time::Instant::now();
        // Per tenant: the tokens in flight, then the ids of the leases registered again.
        let mut answer: Result<Vec<(u64, Vec<String>)>, RedisError> =
            match tokio::time::timeout(budget, pipe.query_async(&mut conn)).await {
                Ok(answer) => answer,
                Err(_) => return tracing::warn!("renewing leases in redis timed out"),
            };
        if matches!(&answer, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            let reloaded = self
                .scripts
                .renew
                .prepare_invoke()
                .load_async(&mut conn)
                .await;
            answer = match reloaded {
                Ok(_) => pipe.query_async(&mut conn).await,
                Err(error) => Err(error),
            };
        }
        match answer {
            Ok(answers) => {
                for ((_, leases), (in_flight, again)) in batches.iter().zip(&answers) {
                    let again: HashSet<&String> = again.iter().collect();
                    for lease in leases.iter().filter(|lease| again.contains(&lease.id)) {
                        self.registered_again(lease, *in_flight);
                    }
                    for lease in leases {
                        lease.in_flight.store(*in_flight, Relaxed);
                    }
                }
                let renewed: Vec<&Arc<Lease>> = batches.iter().flat_map(|(_, l)| l).collect();
                self.headroom_renewed(&renewed, sent);
                tracing::trace!(tenants = batches.len(), "renewed leases");
            }
            Err(error) => tracing::warn!(%error, "could not renew leases in redis"),
        }
    }
}

/// Renews a tracker's leases until the tracker, and every reservation it made, is gone.
pub(super) async fn renew_forever(shared: Weak<Inner>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.let_go_idle_headroom();
        shared.renew_all().await;
        shared.renew_tickets().await;
    }
}
