//! Windows over time kept in Redis for every replica: each tenant's bucket beside its
//! leases, under the same hash tag (one cluster slot), charged in the same call as its
//! lease, all or nothing, on Redis's clock (see `window.lua`).

use std::sync::Arc;

use super::batch::WindowAsk;
use super::shared::Inner;
use super::{RedisReservation, RedisTokenTracker};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::window::{Charge, Remote, Standing, Tally};
use crate::{Error, TokenWindow};

/// A charge's bucket in Redis: what adjusting it needs.
struct Bucket {
    inner: Arc<Inner>,
    key: String,
    limit: u64,
    period_ms: u64,
    window: String,
    tokens: bool,
    /// What the bucket held once this request was charged.
    left: u64,
}

impl Remote for Bucket {
    fn adjust(&self, units: f64) {
        self.inner.batches().adjust(WindowAsk {
            key: self.key.clone(),
            units,
            limit: self.limit,
            period_ms: self.period_ms,
            force: true,
            window: None,
            left: Arc::default(),
        });
    }

    fn standing(&self) -> Option<Standing> {
        let period = Duration::from_millis(self.period_ms);
        Some(Standing::of(self.limit, self.left, period, self.tokens))
    }

    fn window(&self) -> &str {
        &self.window
    }

    fn counts_tokens(&self) -> bool {
        self.tokens
    }
}

/// A window's period in milliseconds, at least one.
fn period_ms(window: &TokenWindow) -> u64 {
    u64::try_from(window.period().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl RedisTokenTracker {
    /// Reserves `tokens` for `tenant_id` (under its cap when `checked`) and charges the
    /// `windows`, priced so, each in the bucket named last, in the same call: all or
    /// nothing, whatever they hold when not `checked` (shadow mode). The charges made in
    /// Redis come back with it (made with `elsewhere`); `None` when the failure policy
    /// answered without Redis, and the windows are still to be charged.
    ///
    /// Never from this replica's headroom: a window's charge needs Redis.
    pub(crate) async fn reserve_charged(
        &self,
        tenant_id: &str,
        tokens: u64,
        checked: bool,
        windows: Vec<(TokenWindow, Tally, String)>,
        elsewhere: fn(Box<dyn Remote>, Tally) -> Charge,
    ) -> Result<(RedisReservation, Option<Vec<Charge>>), Error> {
        let inner = &self.inner;
        // Each window's bucket, asked once; what it holds after the call comes back in
        // `left`.
        let mut asks: Vec<WindowAsk> = windows
            .iter()
            .map(|(window, tally, bucket)| WindowAsk {
                key: inner.keys().window(tenant_id, bucket),
                units: tally.units(),
                limit: window.limit(tenant_id),
                period_ms: period_ms(window),
                force: !checked,
                window: Some(window.clone()),
                left: Arc::default(),
            })
            .collect();
        let sent: Vec<WindowAsk> = asks.iter().map(WindowAsk::again).collect();
        let reservation = Inner::reserve_charged(inner, tenant_id, tokens, checked, &mut asks);
        let reservation = reservation.await?;
        if !asks.is_empty() {
            return Ok((reservation, None));
        }
        let charges = windows
            .into_iter()
            .zip(sent)
            .map(|((window, tally, _), ask)| {
                let bucket = Bucket {
                    left: ask.left.load(Relaxed),
                    inner: Arc::clone(inner),
                    key: ask.key,
                    limit: ask.limit,
                    period_ms: ask.period_ms,
                    window: window.name().to_owned(),
                    tokens: window.counts_tokens(),
                };
                elsewhere(Box::new(bucket), tally)
            })
            .collect();
        Ok((reservation, Some(charges)))
    }

    /// What `tenant_id` has left in `window`'s bucket in Redis now, across every replica
    /// (units: tokens, or millionths for a spend window). In a window per model, the
    /// bucket of its requests that name no model.
    ///
    /// # Errors
    ///
    /// [`Error::BackendUnavailable`] when Redis could not be asked.
    pub async fn window_remaining(
        &self,
        window: &TokenWindow,
        tenant_id: &str,
    ) -> Result<u64, Error> {
        self.bucket_remaining(window, tenant_id, None).await
    }

    /// [`window_remaining`](Self::window_remaining) of `tenant_id`'s bucket for `model`,
    /// in a window [per model](TokenWindow::per_model).
    ///
    /// # Errors
    ///
    /// [`Error::BackendUnavailable`] when Redis could not be asked.
    pub async fn window_remaining_for_model(
        &self,
        window: &TokenWindow,
        tenant_id: &str,
        model: &str,
    ) -> Result<u64, Error> {
        self.bucket_remaining(window, tenant_id, Some(model)).await
    }

    async fn bucket_remaining(
        &self,
        window: &TokenWindow,
        tenant_id: &str,
        model: Option<&str>,
    ) -> Result<u64, Error> {
        let inner = &self.inner;
        let mut invocation = super::scripts::scripts().window_state.prepare_invoke();
        invocation.key(inner.keys().window(tenant_id, &window.bucket_name(model)));
        invocation
            .arg(window.limit(tenant_id))
            .arg(period_ms(window));
        let mut conn = inner.conn().clone();
        let left: Result<u64, _> = inner.timed(invocation.invoke_async(&mut conn)).await;
        left.map_err(|failure| Error::BackendUnavailable {
            reason: failure.to_string(),
        })
    }
}
