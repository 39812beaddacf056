//! The service: each request is planned, admitted and forwarded in `call`.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::admit::head::{read_head, Decision, Plan};
use crate::admit::{admit, reject, Admission};
use crate::body::{RequestBody, ResponseBody};
use crate::budget::BudgetKeys;
use crate::config::{Config, LimitHeaders};
use crate::extract::Head;
use crate::future::{prepare, Call, ReadingBody, ResponseFuture};
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
        match read_head(config, Head::in_place(&request)) {
            // Read in place, the request draws from no budget: a layer with budgets reads
            // the whole head.
            Some(Plan::Reserve(tenant, tokens, class)) => {
                let admission = admit(config, &tenant, tokens, None, BudgetKeys::default(), class);
                self.admitted(request, admission)
            }
            Some(Plan::Decided(decision)) => self.follow(request, decision),
            None => self.call_parts(request),
        }
    }
}

impl<S> TenantTokenService<S> {
    /// `call` for a request a source needs the `Parts` of, or whose budgets' keys may
    /// need them: taken apart, read, and put together again.
    #[inline(never)]
    fn call_parts<ReqBody>(&mut self, request: Request<ReqBody>) -> ResponseFuture<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>> + Clone,
    {
        let config = &self.config;
        let (parts, body) = request.into_parts();
        match read_head(config, Head::whole(&parts)) {
            Some(Plan::Reserve(tenant, tokens, class)) => {
                let keys = config.budget_keys(&parts, None, None);
                let admission = admit(config, &tenant, tokens, None, keys, class);
                drop(tenant);
                self.admitted(Request::from_parts(parts, body), admission)
            }
            Some(Plan::Decided(decision)) => {
                self.follow(Request::from_parts(parts, body), decision)
            }
            None => unreachable!("a head taken apart has the `Parts` every source may need"),
        }
    }

    /// Goes on with a request that is not reserved for at once: refuses it, forwards it
    /// unmetered, or reads its body first.
    #[inline(never)]
    fn follow<ReqBody>(
        &mut self,
        request: Request<ReqBody>,
        decision: Decision,
    ) -> ResponseFuture<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>> + Clone,
    {
        match decision {
            Decision::Refuse(error) => ResponseFuture::rejected(reject(&self.config, error)),
            Decision::Unmetered => self.forward(request, None),
            Decision::ReadBody(tenant, estimate, class) => {
                let (parts, body) = request.into_parts();
                let call = Call::new(parts, self.take_ready(), Arc::clone(&self.config));
                let reading = ReadingBody::new(tenant, estimate, class, call);
                ResponseFuture::reading(body, reading)
            }
        }
    }

    /// Calls the inner service with an admitted request, or answers a refused one, or waits
    /// for the ledger to decide.
    #[inline(never)]
    fn admitted<ReqBody>(
        &mut self,
        request: Request<ReqBody>,
        admission: Admission,
    ) -> ResponseFuture<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>> + Clone,
    {
        match admission {
            Step::Now(Ok(guard)) => self.forward(request, Some(guard)),
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

    /// Calls the inner service with an admitted request, or an unmetered one (no `guard`).
    #[inline(always)]
    fn forward<ReqBody>(
        &mut self,
        mut request: Request<ReqBody>,
        mut guard: Option<Guard>,
    ) -> ResponseFuture<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        let headers = match &mut guard {
            Some(guard) => {
                prepare(request.extensions_mut(), guard, &self.config);
                self.config.limit_headers
            }
            None => LimitHeaders::default(),
        };
        let future = self.inner.call(request.map(RequestBody::streaming));
        ResponseFuture::inner(future, guard, headers)
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
