//! Admitting a tenant's requests from this replica's [headroom](super::headroom), and the
//! task that keeps each headroom the right size in Redis.

use std::sync::Arc;
use std::time::Instant;

use super::headroom::{Headroom, HeadroomShare, Then};
use super::lease::{clamp, Lease};
use super::shared::Inner;
use super::stats::Count;
use crate::Error;

impl Inner {
    /// Admits `tokens` for `tenant` from this replica's headroom, or `None` when the
    /// request must ask Redis (no headroom, too little of it, or none yet: one is then
    /// made in the background).
    pub(super) fn admit_locally(
        self: &Arc<Self>,
        tenant: &str,
        tokens: u64,
    ) -> Option<HeadroomShare> {
        if !self.headrooms().is_on() || self.fair().in_use() {
            return None;
        }
        let headroom = self.headroom_of(tenant, tokens)?;
        let (fits, adjust) = headroom.draw(tokens, Instant::now());
        if adjust {
            self.adjust_later(&headroom);
        }
        if !fits {
            return None;
        }
        self.counters().add(Count::AdmittedLocally);
        Some(HeadroomShare::new(headroom, tokens))
    }

    /// `tenant`'s headroom, made (empty) if it has none; `None` when a request of `tokens`
    /// is larger than a step, so never admitted from it (nor keeping it for nothing), and
    /// when the tenant's cap changed since its headroom was made (that one drains).
    fn headroom_of(self: &Arc<Self>, tenant: &str, tokens: u64) -> Option<Arc<Headroom>> {
        let cap = self.cap(tenant);
        if let Some(headroom) = self.headrooms().get(tenant) {
            if headroom.lease().cap() != cap {
                if headroom.drain() {
                    self.adjust_later(&headroom);
                }
                return None;
            }
            return headroom.takes(tokens).then_some(headroom);
        }
        let step = self.headrooms().step(cap);
        if step == 0 || tokens > step {
            return None;
        }
        let lease = self.new_lease(tenant, cap, 0).headroom();
        Some(
            self.headrooms()
                .insert(Arc::new(Headroom::new(lease, step))),
        )
    }

    fn adjust_later(self: &Arc<Self>, headroom: &Arc<Headroom>) {
        let (this, headroom) = (Arc::clone(self), Arc::clone(headroom));
        self.runtime()
            .spawn(async move { this.adjust(&headroom).await });
    }

    /// Brings `headroom` to its target, one call at a time, until it is there.
    async fn adjust(self: &Arc<Self>, headroom: &Arc<Headroom>) {
        let lease = headroom.lease();
        loop {
            let _order = lease.order().await;
            let Some(call) = headroom.next_call(Instant::now()) else {
                return;
            };
            let sent = Instant::now();
            let answer = if call.created {
                let cap = call.checked.then_some(lease.cap());
                self.resize_call(lease, call.to, cap)
                    .await
                    .map_err(|f| f.to_string())
            } else {
                let made = self
                    .timed(self.batches().reserve(lease, call.to, lease.cap()))
                    .await;
                made.map_err(|failure| failure.to_string())
            };
            let valid_until = self.valid_until(sent);
            match headroom.answered(&call, answer, valid_until, || self.hold(lease)) {
                Then::Again => {}
                Then::Stop => return,
                Then::LetGo => return self.let_go(headroom),
            }
        }
    }

    /// Gives back what `drawn` holds to its headroom.
    pub(super) fn give_back(self: &Arc<Self>, drawn: &HeadroomShare) {
        if drawn.give_back() {
            self.adjust_later(drawn.headroom());
        }
    }

    /// Sets what `drawn` holds to `tokens`, unchecked (as any resize): growth past the
    /// headroom is written to Redis in the background.
    pub(super) fn resize_drawn(self: &Arc<Self>, drawn: &HeadroomShare, tokens: u64) {
        if drawn.resize(tokens) {
            self.adjust_later(drawn.headroom());
        }
    }

    /// Grows what `drawn` holds to `tokens` if it fits under the cap: from what the
    /// headroom has unused, or else by growing its lease in Redis, checked.
    pub(super) async fn try_resize_drawn(
        self: &Arc<Self>,
        drawn: &HeadroomShare,
        tokens: u64,
    ) -> Result<(), Error> {
        let tokens = clamp(tokens);
        if drawn.try_resize_now(tokens) {
            return Ok(());
        }
        let lease = drawn.headroom().lease();
        let _order = lease.order().await;
        let (to, grow, created) = drawn.growth(tokens);
        let overloaded = |in_flight| Error::TenantOverloaded {
            tenant_id: lease.tenant().to_string(),
            requested: grow,
            in_flight,
            cap: lease.cap(),
        };
        if !created {
            return Err(overloaded(lease.in_flight()));
        }
        let sent = Instant::now();
        match self.resize_call(lease, to, Some(lease.cap())).await {
            Ok((1, in_flight)) => {
                drawn.grown(to, tokens, in_flight, self.valid_until(sent));
                Ok(())
            }
            Ok((_, in_flight)) => {
                lease.set_in_flight(in_flight);
                Err(overloaded(in_flight))
            }
            Err(failure) => Err(failure.unavailable()),
        }
    }

    /// Lets go of the headrooms nothing asked for since the last renewal and nothing
    /// drawn from holds, releasing their leases. Run at each renewal.
    pub(super) fn let_go_idle_headroom(self: &Arc<Self>) {
        for headroom in self.headrooms().retire_idle() {
            self.let_go(&headroom);
        }
    }

    /// Releases a retired headroom's lease, and forgets the headroom.
    fn let_go(self: &Arc<Self>, headroom: &Arc<Headroom>) {
        self.headrooms().remove(headroom);
        self.forget(headroom.lease());
        self.release_later(Arc::clone(headroom.lease()));
    }

    /// The headrooms whose leases a renewal sent at `sent` pushed back may admit for
    /// another half TTL.
    pub(super) fn headroom_renewed(&self, renewed: &[&Arc<Lease>], sent: Instant) {
        self.headrooms().renewed(renewed, self.valid_until(sent));
    }

    /// Until when a headroom may admit after a call that set or renewed its lease was
    /// sent at `sent`: half a TTL, as the lease lives a whole TTL from then on Redis's
    /// clock.
    fn valid_until(&self, sent: Instant) -> Instant {
        sent + self.ttl() / 2
    }
}
