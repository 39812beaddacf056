//! Listing the tenants with work in flight across every replica, for an admin page.

use std::collections::HashSet;

use super::tracker::RedisTokenTracker;
use crate::Error;

/// How many keys one `SCAN` step asks Redis to look at.
const SCAN_STEP: u64 = 1_000;

impl RedisTokenTracker {
    /// The tenants with tokens in flight across every replica, as Redis counts them now
    /// (expired leases swept first), sorted by tenant id: at most `limit` of them.
    ///
    /// It walks this tracker's keys with `SCAN` (a step of a thousand keys at a time, so
    /// Redis is never blocked for long; on a cluster, every master in turn) and asks for
    /// each tenant's count: one round trip per tenant found (tenants idle for less than two
    /// lease TTLs included, as their keys are still there), so keep `limit` to what a page
    /// shows. Replicas' [headroom](crate::redis::RedisTokenTrackerBuilder::local_headroom)
    /// counts as in flight, used or not.
    ///
    /// # Errors
    ///
    /// [`Error::BackendUnavailable`] when Redis could not be asked.
    pub async fn tenants_in_flight(&self, limit: usize) -> Result<Vec<(String, u64)>, Error> {
        let inner = &self.inner;
        let pattern = inner.keys().all_tokens();
        let unavailable = |failure: super::call::Failure| failure.unavailable();
        // One server, or every master of a cluster: each holds its slots' keys.
        let masters = inner
            .timed(inner.conn().masters())
            .await
            .map_err(unavailable)?;
        let mut seen = HashSet::new();
        let mut listed = Vec::new();
        'masters: for node in &masters {
            let mut cursor = 0_u64;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_STEP);
                let (next, keys): (u64, Vec<String>) = inner
                    .timed(inner.conn().query_on(node, scan))
                    .await
                    .map_err(unavailable)?;
                let found = keys
                    .iter()
                    .filter_map(|key| inner.keys().tenant_of(key).map(str::to_owned));
                for tenant in found {
                    if !seen.insert(tenant.clone()) {
                        continue; // SCAN may return a key twice
                    }
                    // A tenant's key outlives its last lease for a while: only those with
                    // tokens in flight are listed.
                    let in_flight = self.in_flight(&tenant).await?;
                    if in_flight > 0 {
                        listed.push((tenant, in_flight));
                        if listed.len() >= limit {
                            break 'masters;
                        }
                    }
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        listed.sort();
        Ok(listed)
    }
}
