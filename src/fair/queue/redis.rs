//! What the queue tells the order a budget in Redis keeps across replicas (feature
//! `redis`): whether a tenant is idle here, when to look again, and the places a tenant's
//! requests hand on to each other (rule 3).

use super::*;

impl Queue {
    /// Every tenant's first waiting request looks again: capacity may have come back
    /// elsewhere (another replica released).
    pub(crate) fn wake_all(&self) {
        if self.queued.load(Relaxed) != 0 {
            wake_heads(&self.lock());
        }
    }

    /// Whether `tenant` has requests waiting here, or admitted from shared budgets and
    /// still running: whether it is not idle, as far as this process knows.
    pub(crate) fn is_active(&self, tenant: &str) -> bool {
        self.lock()
            .tenants
            .get(tenant)
            .is_some_and(Tenant::is_active)
    }

    /// The class of the request waiting behind `tenant`'s first one, which goes next for
    /// its tenant.
    pub(crate) fn next_class(&self, tenant: &str) -> Option<Priority> {
        if self.queued.load(Relaxed) == 0 {
            return None;
        }
        let state = self.lock();
        state.tenants.get(tenant)?.waiting.get(1).map(|w| w.class)
    }

    /// Hands `place`, which a request of `tenant` in `class` held, to the tenant's next
    /// waiting request if it is of that class (rule 3), and wakes it to take it; otherwise
    /// `place` is dropped, given up. `admitted`: the request passing it is still its
    /// tenant's first (it is being admitted), so the next is the one behind it.
    pub(crate) fn pass_on(&self, tenant: &str, class: Priority, place: Place, admitted: bool) {
        let mut state = self.lock();
        let Some(own) = state.tenants.get_mut(tenant) else {
            drop(state);
            return drop(place);
        };
        match own.waiting.get(usize::from(admitted)) {
            Some(next) if next.class == class => {
                let to = next.seq;
                own.passed.push(Passed { class, to, place });
                wake_heads(&state);
            }
            _ => {
                drop(state);
                drop(place);
            }
        }
    }

    /// Takes a place passed on to `tenant`'s requests of `class` that `wanted` accepts.
    pub(crate) fn take_passed(
        &self,
        tenant: &str,
        class: Priority,
        wanted: impl Fn(&Place) -> bool,
    ) -> Option<Place> {
        if self.queued.load(Relaxed) == 0 {
            return None; // places are passed on only to waiting requests
        }
        let mut state = self.lock();
        let own = state.tenants.get_mut(tenant)?;
        let at = own
            .passed
            .iter()
            .position(|p| p.class == class && wanted(&p.place))?;
        Some(own.passed.swap_remove(at).place)
    }
}
