//! The layer's settings, and the decisions they make about one request.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};

use crate::extract::{Estimator, MissingEstimate, MissingTenant, Plan, TenantSource};
use crate::handle::Guard;
use crate::reject::Rejection;
use crate::{Error, TenantTokenTracker};

pub(crate) type RejectFn = dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync;

/// Everything a layer was configured with; shared by every service it makes.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) tracker: Arc<TenantTokenTracker>,
    pub(crate) tenant: TenantSource,
    pub(crate) estimator: Estimator,
    pub(crate) missing_tenant: MissingTenant,
    pub(crate) missing_estimate: MissingEstimate,
    pub(crate) max_tenant_len: usize,
    pub(crate) retry_after: Duration,
    pub(crate) on_rejection: Option<Arc<RejectFn>>,
    pub(crate) reservation_handle: bool,
    pub(crate) rate_limit_headers: bool,
}

/// Who a request is charged to.
pub(crate) enum Charge<'a> {
    Tenant(Cow<'a, str>),
    Unmetered,
}

/// How many tokens a request is charged.
pub(crate) enum Estimate {
    Tokens(u64),
    Unmetered,
    /// Read the body first.
    Body(crate::extract::BodyEstimate),
}

impl Config {
    /// The tenant to charge, or why there is none.
    pub(crate) fn charge<'a>(&'a self, parts: &'a Parts) -> Result<Charge<'a>, Error> {
        match self.tenant.extract(parts, self.max_tenant_len) {
            Ok(Some(tenant)) => Ok(Charge::Tenant(tenant)),
            Ok(None) => match &self.missing_tenant {
                MissingTenant::DefaultTenant(id) => Ok(Charge::Tenant(Cow::Borrowed(id))),
                MissingTenant::Unmetered => Ok(Charge::Unmetered),
                MissingTenant::Reject | MissingTenant::Unauthorized => Err(Error::MissingTenant),
            },
            Err(error) => Err(error),
        }
    }

    /// The estimate to reserve, or why there is none.
    pub(crate) fn estimate(&self, parts: &Parts) -> Result<Estimate, Error> {
        match self.estimator.plan(parts) {
            Plan::Ready(Ok(Some(tokens))) => Ok(Estimate::Tokens(tokens)),
            Plan::Ready(Ok(None)) => self.missing_estimate(),
            Plan::Ready(Err(error)) => Err(error),
            Plan::Body(body) => Ok(Estimate::Body(body)),
        }
    }

    fn missing_estimate(&self) -> Result<Estimate, Error> {
        match self.missing_estimate {
            MissingEstimate::Default(tokens) => Ok(Estimate::Tokens(tokens)),
            MissingEstimate::Unmetered => Ok(Estimate::Unmetered),
            MissingEstimate::Reject => Err(Error::MissingEstimate),
        }
    }

    /// Reserves `tokens` for `tenant`. The caller hands the request the guard's handle, if
    /// it has one.
    pub(crate) fn admit(&self, tenant: &str, tokens: u64) -> Result<Guard, Error> {
        match self.tracker.reserve_id(tenant, tokens) {
            Ok(reservation) => {
                tracing::debug!(tenant, tokens, "admitted token reservation");
                Ok(Guard::new(reservation, self.reservation_handle))
            }
            Err(error) => Err(error),
        }
    }

    /// The response for a refused request.
    pub(crate) fn reject(&self, error: Error) -> Response<Bytes> {
        let status = match (&error, &self.missing_tenant) {
            (Error::MissingTenant, MissingTenant::Unauthorized) => StatusCode::UNAUTHORIZED,
            _ => error.status(),
        };
        match &error {
            Error::TenantOverloaded {
                tenant_id,
                requested,
                in_flight,
                cap,
            } => tracing::info!(
                tenant = %tenant_id,
                tokens = requested,
                in_flight,
                cap,
                "refused: tenant over its in-flight token cap"
            ),
            Error::RequestTooLarge {
                tenant_id,
                tokens,
                cap,
            } => tracing::info!(
                tenant = %tenant_id,
                tokens,
                cap,
                "refused: request larger than the tenant's cap"
            ),
            other => tracing::info!(code = other.code(), %status, "refused: {other}"),
        }
        let rejection = Rejection::new(error, status, self.retry_after);
        match &self.on_rejection {
            Some(on_rejection) => on_rejection(&rejection),
            None => rejection.to_response(),
        }
    }
}
