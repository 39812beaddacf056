//! The service: decides each request in `call`.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::budget::Draws;
use crate::config::{Admission, Charge, Config, Estimate, LimitHeaders, Quick};
use crate::future::{Pending, ResponseFuture};
use crate::{BoxError, RequestBody, ResponseBody};

/// Caps the tokens each tenant has in flight in front of `S`; made by
/// [`TenantTokenLayer`](crate::TenantTokenLayer).
///
/// `poll_ready` only asks the inner service: the tenant is known only once a request
/// arrives, so every decision is made in `call`. Refusals are ordinary responses
/// (`Ok(Response)`), so the inner error type passes through unchanged and axum needs no
/// `HandleErrorLayer`.
///
/// The inner service must be `Clone` because an estimator that reads the body calls a
/// ready clone of it once the body has arrived, as tower's buffering services do.
pub struct TenantTokenService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> TenantTokenService<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for TenantTokenService<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (tenant, tokens) = match self.config.quick(request.headers(), request.extensions()) {
            Quick::Reserve(tenant, tokens) => (tenant, tokens),
            Quick::Unmetered => return self.forward(request, None),
            Quick::Refused(error) => return ResponseFuture::rejected(self.config.reject(error)),
            Quick::NeedsParts => return self.call_parts(request),
        };
        let admission = self.config.admit(&tenant, tokens, Draws::default());
        self.admitted(request, admission)
    }
}

impl<S> TenantTokenService<S> {
    /// `call` for sources that read the request's `Parts` or its body.
    fn call_parts<ReqBody, ResBody>(
        &mut self,
        request: Request<ReqBody>,
    ) -> ResponseFuture<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    {
        let config = &self.config;
        let (parts, body) = request.into_parts();
        let tenant = match config.charge(&parts) {
            Ok(Charge::Tenant(tenant)) => tenant,
            Ok(Charge::Unmetered) => return self.forward(Request::from_parts(parts, body), None),
            Err(error) => return ResponseFuture::rejected(config.reject(error)),
        };
        let tokens = match config.estimate(&parts) {
            Ok(Estimate::Tokens(tokens)) => tokens,
            Ok(Estimate::Unmetered) => return self.forward(Request::from_parts(parts, body), None),
            Ok(Estimate::Body(estimate)) => {
                let (tenant, config) = (tenant.into_owned(), Arc::clone(config));
                let service = self.take_ready();
                let pending = Pending::new(parts, tenant, estimate, service, config);
                return ResponseFuture::reading(body, pending);
            }
            Err(error) => return ResponseFuture::rejected(config.reject(error)),
        };
        let draws = Draws::find(&config.budgets, &parts, None);
        let admission = config.admit(&tenant, tokens, draws);
        drop(tenant);
        self.admitted(Request::from_parts(parts, body), admission)
    }

    /// Calls the inner service with an admitted request, or answers a refused one, or waits
    /// for the ledger to decide.
    #[inline(always)]
    fn admitted<ReqBody>(
        &mut self,
        mut request: Request<ReqBody>,
        admission: Admission,
    ) -> ResponseFuture<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>> + Clone,
    {
        match admission {
            Admission::Now(Ok(guard)) => {
                if let Some(handle) = guard.handle() {
                    request.extensions_mut().insert(handle);
                }
                self.forward(request, Some(guard))
            }
            Admission::Now(Err(error)) => ResponseFuture::rejected(self.config.reject(error)),
            Admission::Later(reserving) => {
                let (parts, body) = request.into_parts();
                let call = crate::future::Call {
                    parts,
                    body: RequestBody::streaming(body),
                    service: self.take_ready(),
                    config: Arc::clone(&self.config),
                };
                ResponseFuture::reserving(reserving, call)
            }
        }
    }

    /// The service that was polled ready, for a call made later; a clone waits in its
    /// place for the next `poll_ready`, as tower's buffering services do.
    fn take_ready(&mut self) -> S
    where
        S: Clone,
    {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }

    #[inline(always)]
    fn forward<ReqBody>(
        &mut self,
        request: Request<ReqBody>,
        guard: Option<crate::handle::Guard>,
    ) -> ResponseFuture<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        let headers = match guard {
            Some(_) => self.config.limit_headers,
            None => LimitHeaders::default(),
        };
        let future = self.inner.call(request.map(RequestBody::streaming));
        ResponseFuture::inner(future, guard, headers)
    }
}

impl<S: Clone> Clone for TenantTokenService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for TenantTokenService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantTokenService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}
