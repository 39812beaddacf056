//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! The layer records, into whatever recorder the application installed (Prometheus,
//! StatsD, OpenTelemetry, …; nothing is recorded without one):
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `tenant_tokens_requests_total` | counter | `outcome` (`admitted`, `refused`, `shadowed`), `reason` (the refusal's [`Error::code`](crate::Error::code), for `refused` and `shadowed`) | every metered request's fate |
//! | `tenant_tokens_in_flight` | gauge | — | tokens this process holds for requests in flight |
//! | `tenant_tokens_reserved` | histogram | — | tokens reserved per admitted request (the estimate) |
//! | `tenant_tokens_usage_ratio` | histogram | `route` (with [`metrics_route`](crate::TenantTokenLayer::metrics_route)) | on release, tokens held at the end ÷ the estimate, for requests whose reservation was resized (by a handler, or by the layer reading usage, [`read_usage`](crate::TenantTokenLayer::read_usage)) |
//! | `tenant_tokens_streams_outran_total` | counter | `route` (as above) | event streams whose output outran their reservation, which the layer grew as they went ([`read_usage`](crate::TenantTokenLayer::read_usage)) |
//! | `tenant_tokens_stream_usage_missing_total` | counter | `route` (as above) | event streams the layer asked for their usage ([`ask_stream_usage`](crate::TenantTokenLayer::ask_stream_usage)) that ended without reporting it: the upstream ignores `stream_options.include_usage`, and such streams settle on the text counted |
//! | `tenant_tokens_output_allowance` | gauge | `tenant`, `model` | the output allowance learned for requests without an output limit ([`adaptive_output`](crate::TenantTokenLayer::adaptive_output)), as last learned; only with tenant labels, for tenants with their own label and the first [`MODEL_LABELS`] models seen |
//! | `tenant_tokens_waiting` | gauge | `class` (`critical`, `standard`, `sheddable`) | requests waiting for capacity now ([`wait_for_capacity`](crate::TenantTokenLayer::wait_for_capacity)) |
//! | `tenant_tokens_wait_seconds` | histogram | `class` | how long each waiting request waited, until admitted or refused |
//! | `tenant_tokens_budget_tokens_total` | counter | — | tokens admitted from shared budgets in a layer that waits for capacity: a tenant's rate over the sum of all tenants' is its share of the budgets |
//! | `tenant_tokens_window_tokens_total` | counter | `window` (its [name](crate::TokenWindow::name)), `kind` (`input`, `cached_input`, `output`, or `unsplit` for an estimate that was never told apart) | tokens each [token window](crate::TokenWindow) was charged in the end, counted when a request's reservation is released (unweighed) |
//! | `tenant_tokens_spend_total` | counter | `window` | what each [spend window](crate::TokenWindow::spend) was charged in the end, in millionths of its currency unit, counted on release |
//! | `tenant_tokens_window_remaining` | gauge | `window`, `tenant` | what the tenant had left in the window after its last admission; only with tenant labels |
//!
//! Requests shed while others wait are counted in `tenant_tokens_requests_total` with
//! `reason="shed"`.
//!
//! With [`TenantLabels`] other than `Off`, each also carries a `tenant` label (refusals
//! that name no tenant, such as a missing one, carry none). A label per tenant is a time
//! series per tenant in the monitoring system: with many tenants, or tenant ids chosen
//! by clients, bound them with [`TenantLabels::Bounded`].

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use metrics::{counter, gauge, histogram, Gauge, Label};

use crate::window::Charged;
use crate::Priority;

/// The counter of requests by outcome.
pub const REQUESTS_TOTAL: &str = "tenant_tokens_requests_total";
/// The gauge of tokens in flight.
pub const IN_FLIGHT: &str = "tenant_tokens_in_flight";
/// The histogram of tokens reserved per request.
pub const RESERVED: &str = "tenant_tokens_reserved";
/// The histogram of actual ÷ estimated tokens, for reconciled requests.
pub const USAGE_RATIO: &str = "tenant_tokens_usage_ratio";

/// The counter of event streams that outran their reservation.
pub const STREAMS_OUTRAN: &str = "tenant_tokens_streams_outran_total";
/// The counter of event streams asked for their usage that ended without reporting it.
pub const STREAM_USAGE_MISSING: &str = "tenant_tokens_stream_usage_missing_total";
/// The gauge of learned output allowances.
pub const OUTPUT_ALLOWANCE: &str = "tenant_tokens_output_allowance";
/// How many models (named by request bodies, so chosen by clients) get a learned
/// allowance gauge; later ones get none.
pub const MODEL_LABELS: usize = 32;

/// The label given to tenants beyond the bound of [`TenantLabels::Bounded`].
pub const OTHER_TENANTS: &str = "other";

/// Requests waiting for capacity now, by class.
pub const WAITING: &str = "tenant_tokens_waiting";
/// How long waiting requests waited, by class.
pub const WAIT_SECONDS: &str = "tenant_tokens_wait_seconds";
/// Tokens admitted from shared budgets in a layer that waits for capacity.
pub const BUDGET_TOKENS: &str = "tenant_tokens_budget_tokens_total";
/// Tokens token windows were charged, by window and kind.
pub const WINDOW_TOKENS: &str = "tenant_tokens_window_tokens_total";
/// Millionths of a currency unit spend windows were charged, by window.
pub const SPEND: &str = "tenant_tokens_spend_total";
/// What a tenant had left in a window after its last admission.
pub const WINDOW_REMAINING: &str = "tenant_tokens_window_remaining";

/// Whether the layer's metrics carry a `tenant` label
/// ([`TenantTokenLayer::metrics_tenant_labels`](crate::TenantTokenLayer::metrics_tenant_labels)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TenantLabels {
    /// No tenant label: a handful of series in all (the default).
    #[default]
    Off,
    /// Every tenant its own label. Only where the tenants are few and known (ids from
    /// your own authentication, not from a client-set header).
    All,
    /// The first `n` tenants seen get their own label, every later one
    /// [`OTHER_TENANTS`]: at most `n + 1` series per metric, whatever clients send.
    Bounded(usize),
}

/// The layer's metrics settings and the tenants labelled so far.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    labels: TenantLabels,
    labelled: Mutex<HashSet<Box<str>>>,
    /// The `route` label of the estimate's accuracy series, if the layer has one.
    route: Option<&'static str>,
}

impl Metrics {
    /// These settings with tenant labels `labels`.
    pub(crate) fn with_labels(&self, labels: TenantLabels) -> Self {
        Self {
            labels,
            labelled: Mutex::default(),
            route: self.route,
        }
    }

    /// These settings with the route label `route`.
    pub(crate) fn with_route(&self, route: &'static str) -> Self {
        Self {
            labels: self.labels,
            labelled: Mutex::default(),
            route: Some(route),
        }
    }

    /// The `tenant` label for `tenant`, if tenants are labelled.
    fn tenant(&self, tenant: &str) -> Option<Label> {
        let value = match self.labels {
            TenantLabels::Off => return None,
            TenantLabels::All => tenant.to_owned(),
            TenantLabels::Bounded(bound) => {
                let mut labelled = self.labelled.lock().unwrap_or_else(PoisonError::into_inner);
                if labelled.contains(tenant)
                    || labelled.len() < bound && labelled.insert(tenant.into())
                {
                    tenant.to_owned()
                } else {
                    OTHER_TENANTS.to_owned()
                }
            }
        };
        Some(Label::new("tenant", value))
    }

    /// The labels for `tenant`'s series: `rest`, and the tenant's own where tenants are
    /// labelled. Without tenant labels nothing is allocated (static keys).
    fn labels(&self, tenant: Option<&str>, rest: &[(&'static str, &'static str)]) -> Vec<Label> {
        let tenant = tenant.and_then(|tenant| self.tenant(tenant));
        if rest.is_empty() && tenant.is_none() {
            return Vec::new();
        }
        let mut labels: Vec<Label> = rest
            .iter()
            .map(|&(k, v)| Label::from_static_parts(k, v))
            .collect();
        labels.extend(tenant);
        labels
    }

    /// Counts an admission and starts tracking its tokens.
    pub(crate) fn admitted(&self, tenant: &str, tokens: u64) -> Tag {
        if self.labels == TenantLabels::Off {
            counter!(REQUESTS_TOTAL, "outcome" => "admitted").increment(1);
        } else {
            counter!(
                REQUESTS_TOTAL,
                self.labels(Some(tenant), &[("outcome", "admitted")])
            )
            .increment(1);
        }
        self.hold(tenant, tokens)
    }

    /// Counts a request shadow mode admitted although `code` would have refused it, and
    /// starts tracking its tokens.
    pub(crate) fn shadowed(&self, tenant: &str, tokens: u64, code: &'static str) -> Tag {
        let labels = self.labels(Some(tenant), &[("outcome", "shadowed"), ("reason", code)]);
        counter!(REQUESTS_TOTAL, labels).increment(1);
        self.hold(tenant, tokens)
    }

    /// Counts a refusal.
    /// A request of `class` starts (`1`) or stops (`-1`) waiting.
    pub(crate) fn waiting(&self, class: Priority, delta: f64) {
        gauge!(WAITING, "class" => class.as_str()).increment(delta);
    }

    /// A request of `class` waited `seconds`, then was admitted or refused.
    pub(crate) fn waited(&self, class: Priority, seconds: f64) {
        histogram!(WAIT_SECONDS, "class" => class.as_str()).record(seconds);
    }

    /// `tokens` admitted for `tenant` from shared budgets.
    pub(crate) fn budget_served(&self, tenant: &str, tokens: u64) {
        counter!(BUDGET_TOKENS, self.labels(Some(tenant), &[])).increment(tokens);
    }

    /// What `tenant` has left in the window `charge` was made in, where tenants are
    /// labelled.
    pub(crate) fn window_remaining(&self, tenant: &str, charge: &impl Charged) {
        let Some(tenant) = self.tenant(tenant) else {
            return;
        };
        let Some(standing) = charge.standing() else {
            return; // not known
        };
        let window = Label::new("window", charge.window().to_owned());
        gauge!(WINDOW_REMAINING, vec![window, tenant]).set(standing.remaining as f64);
    }

    pub(crate) fn refused(&self, tenant: Option<&str>, code: &'static str) {
        let labels = self.labels(tenant, &[("outcome", "refused"), ("reason", code)]);
        counter!(REQUESTS_TOTAL, labels).increment(1);
    }

    fn hold(&self, tenant: &str, tokens: u64) -> Tag {
        let labels = self.labels(Some(tenant), &[]);
        let in_flight = if labels.is_empty() {
            histogram!(RESERVED).record(tokens as f64);
            gauge!(IN_FLIGHT)
        } else {
            histogram!(RESERVED, labels.clone()).record(tokens as f64);
            gauge!(IN_FLIGHT, labels.clone())
        };
        in_flight.increment(tokens as f64);
        Tag {
            in_flight,
            labels,
            route: self.route,
            estimate: tokens,
            reconciled: false,
        }
    }
}

/// What one reservation has told the recorder, so its changes and its end can be told too.
#[derive(Debug)]
pub(crate) struct Tag {
    in_flight: Gauge,
    /// The tenant's label, if any.
    pub(crate) labels: Vec<Label>,
    route: Option<&'static str>,
    estimate: u64,
    reconciled: bool,
}

impl Tag {
    /// The reservation went from `from` to `to` tokens (a handler reconciled it).
    pub(crate) fn resized(&mut self, from: u64, to: u64) {
        self.reconciled = true;
        if to >= from {
            self.in_flight.increment((to - from) as f64);
        } else {
            self.in_flight.decrement((from - to) as f64);
        }
    }

    /// The labels of the series about the estimate's accuracy: the tenant's and the
    /// route's; `None` when there are none (static keys, nothing allocated).
    pub(crate) fn estimate_labels(&self) -> Option<Vec<Label>> {
        if self.labels.is_empty() && self.route.is_none() {
            return None;
        }
        let mut labels = self.labels.clone();
        labels.extend(
            self.route
                .map(|route| Label::from_static_parts("route", route)),
        );
        Some(labels)
    }

    /// A window's charge, as it stands when the reservation ends.
    pub(crate) fn charged(&self, charge: &impl Charged) {
        let mut labels = self.labels.clone();
        labels.push(Label::new("window", charge.window().to_owned()));
        if !charge.counts_tokens() {
            counter!(SPEND, labels).increment(charge.units().round() as u64);
            return;
        }
        for (kind, tokens) in charge.used().kinds() {
            if tokens > 0 {
                let mut labels = labels.clone();
                labels.push(Label::from_static_parts("kind", kind));
                counter!(WINDOW_TOKENS, labels).increment(tokens);
            }
        }
    }

    /// The reservation ended holding `tokens`.
    pub(crate) fn released(&self, tokens: u64) {
        self.in_flight.decrement(tokens as f64);
        if self.reconciled && self.estimate > 0 {
            let ratio = tokens as f64 / self.estimate as f64;
            match self.estimate_labels() {
                None => histogram!(USAGE_RATIO).record(ratio),
                Some(labels) => histogram!(USAGE_RATIO, labels).record(ratio),
            }
        }
    }
}
