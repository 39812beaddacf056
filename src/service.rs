//! The service: each request is planned, admitted and forwarded in `call`.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::admit::plan::{plan, plan_in_place, Plan};
use crate::admit::{admit, reject, Admission};
use crate::body::{RequestBody, ResponseBody};
use crate::config::{Config, LimitHeaders};
use crate::future::{read_usage, Call, ReadingBody, ResponseFuture};
use crate::reservation::Guard;
use crate::step::Step;
use crate::BoxError;

/// Caps the tokens each tenant has in flight in front of `S`; made by
/// [`TenantTokenLayer`](crate::TenantTokenLayer).
///
/// `poll_ready` only asks the inner service: the tenant is known only once a request
/// arrives, so every decision is made in `call`. Refusals are ordinary responses
/// (`Ok(Response)`), so the inner error type passes through unchanged and axum needs no
/// `HandleErrorLayer`.
///
/// The inner service must be `Clone`. A request whose estimate needs its body takes the
/// ready service with it while the body is read, as tower's buffering services do (a
/// refusal drops it, giving its readiness back). A request that waits to be admitted (for
/// Redis, or for capacity) gives the readiness back at once and polls a clone ready once
/// admitted: while it waits it holds nothing of the inner service's (a concurrency
/// limit's permit, say), so a request waiting on its tenant's cap never blocks another
/// tenant's.
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
        let config = &self.config;
        let (tenant, tokens, class) =
            match plan_in_place(config, request.headers(), request.extensions()) {
                Some(Plan::Reserve(tenant, tokens, class)) => (tenant, tokens, class),
                Some(Plan::Unmetered) => return self.forward(request, None),
                Some(Plan::Refuse(error)) => {
                    return ResponseFuture::rejected(reject(&self.config, error))
                }
                Some(Plan::ReadBody(..)) | None => return self.call_parts(request),
            };
        let admission = admit(config, &tenant, tokens, None, Default::default(), class);
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
        let (tenant, tokens, class) = match plan(config, &parts) {
            Plan::Reserve(tenant, tokens, class) => (tenant, tokens, class),
            Plan::Unmetered => return self.forward(Request::from_parts(parts, body), None),
            Plan::Refuse(error) => return ResponseFuture::rejected(reject(config, error)),
            Plan::ReadBody(tenant, estimate, class) => {
                let tenant = tenant.into_owned();
                let call = Call::new(parts, self.take_ready(), Arc::clone(&self.config));
                let reading = ReadingBody::new(tenant, estimate, class, call);
                return ResponseFuture::reading(body, reading);
            }
        };
        let keys = config.budget_keys(&parts, None, None);
        let admission = admit(config, &tenant, tokens, None, keys, class);
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
            Step::Now(Ok(guard)) => {
                if let Some(handle) = guard.handle() {
                    request.extensions_mut().insert(handle);
                }
                self.forward(request, Some(guard))
            }
            Step::Now(Err(error)) => ResponseFuture::rejected(reject(&self.config, error)),
            Step::Later(pending) => {
                let (parts, body) = request.into_parts();
                // The ready service is given back (dropped): a request that waits must not
                // hold the inner service's readiness meanwhile.
                drop(self.take_ready());
                let call = Call::new(parts, self.inner.clone(), Arc::clone(&self.config));
                ResponseFuture::admitting(pending, call, RequestBody::streaming(body))
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
        guard: Option<Guard>,
    ) -> ResponseFuture<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        if self.config.read_usage {
            return self.forward_tapped(request, guard);
        }
        let headers = match guard {
            Some(_) => self.config.limit_headers,
            None => LimitHeaders::default(),
        };
        let future = self.inner.call(request.map(RequestBody::streaming));
        ResponseFuture::inner(future, guard, headers)
    }

    /// [`forward`](Self::forward) for a layer that reads usage, kept off the common path.
    #[cold]
    #[inline(never)]
    fn forward_tapped<ReqBody>(
        &mut self,
        request: Request<ReqBody>,
        guard: Option<Guard>,
    ) -> ResponseFuture<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        let (headers, guard) = match guard {
            Some(mut guard) => {
                read_usage(&mut guard);
                (self.config.limit_headers, Some(guard))
            }
            None => (LimitHeaders::default(), None),
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
