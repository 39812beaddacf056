//! Refusing a request: the response, the log line, the metric.

use bytes::Bytes;
use http::{Response, StatusCode};

use crate::config::Config;
use crate::extract::MissingTenant;
use crate::{Error, Rejection};

/// The response for a refused request.
pub(crate) fn reject(config: &Config, error: Error) -> Response<Bytes> {
    let status = match (&error, &config.missing_tenant) {
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
        Error::BackendUnavailable { reason } => tracing::info!(
            code = error.code(),
            %status,
            reason,
            "refused: the shared token ledger is unavailable"
        ),
        other => tracing::info!(code = other.code(), %status, "refused: {other}"),
    }
    config.metrics.refused(error.tenant_id(), error.code());
    let hold_times = config
        .options
        .as_ref()
        .and_then(|options| options.hold_times.as_ref());
    let retry_after = match (&error, hold_times) {
        (
            Error::TenantOverloaded {
                requested,
                in_flight,
                cap,
                ..
            },
            Some((times, max)),
        )
        | (
            Error::BudgetOverloaded {
                requested,
                in_flight,
                cap,
                ..
            },
            Some((times, max)),
        ) => times
            .retry_after(*requested, *in_flight, *cap, *max)
            .unwrap_or(config.retry_after),
        _ => config.retry_after,
    };
    let ietf = config.limit_headers.ietf;
    let rejection = Rejection::new(error, status, retry_after, ietf);
    match &config.on_rejection {
        Some(on_rejection) => on_rejection(&rejection),
        None => rejection.to_response(),
    }
}
