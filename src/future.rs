//! The response future: the inner call, or a refusal, or reading the body first.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::budget::Draws;
use crate::config::{Admission, Config, LimitHeaders, Reserving};
use crate::extract::BodyEstimate;
use crate::handle::Guard;
use crate::reject::{limit_field, policy_field};
use crate::{
    BoxError, Error, RequestBody, ResponseBody, RATELIMIT, RATELIMIT_POLICY,
    X_RATELIMIT_LIMIT_TOKENS, X_RATELIMIT_REMAINING_TOKENS,
};

pin_project! {
    /// The future of [`TenantTokenService`](crate::TenantTokenService)'s response.
    ///
    /// Dropping it (the request was cancelled) releases the reservation.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<RequestBody<B>>>,
    {
        #[pin]
        state: State<S::Future, S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, B> {
        /// Admitted (or unmetered): the inner call, holding the reservation until the
        /// response, which takes it over.
        Inner { #[pin] future: F, guard: Option<Guard>, headers: LimitHeaders },
        /// Refused before reaching the inner service. (Boxed, like `Pending`, to keep the
        /// future small: it is moved on every admitted request.)
        Rejected { response: Option<Box<Response<Bytes>>> },
        /// The estimate needs the body: read it, then decide.
        Reading { #[pin] body: B, pending: Option<Box<Pending<S>>> },
        /// Waiting for the ledger (Redis) to decide.
        Reserving { reserving: Reserving, call: Option<Box<Call<S, B>>> },
    }
}

/// A request ready to be called once its reservation is decided.
pub(crate) struct Call<S, B> {
    pub(crate) parts: Parts,
    pub(crate) body: RequestBody<B>,
    pub(crate) service: S,
    pub(crate) config: Arc<Config>,
}

impl<S, B> Call<S, B>
where
    S: Service<Request<RequestBody<B>>>,
{
    /// What to do next with the ledger's answer.
    fn decide(self, admission: Admission) -> State<S::Future, S, B> {
        match admission {
            Admission::Now(Ok(guard)) => self.start(guard),
            Admission::Now(Err(error)) => State::Rejected {
                response: Some(Box::new(self.config.reject(error))),
            },
            Admission::Later(reserving) => State::Reserving {
                reserving,
                call: Some(Box::new(self)),
            },
        }
    }

    /// Calls the inner service, holding `guard` until the response takes it over.
    fn start(self, guard: Guard) -> State<S::Future, S, B> {
        let Call {
            mut parts,
            body,
            mut service,
            config,
        } = self;
        if let Some(handle) = guard.handle() {
            parts.extensions.insert(handle);
        }
        State::Inner {
            future: service.call(Request::from_parts(parts, body)),
            guard: Some(guard),
            headers: config.limit_headers,
        }
    }
}

/// What a request waiting for its body still needs to be decided and called.
pub(crate) struct Pending<S> {
    pub(crate) parts: Parts,
    pub(crate) tenant: String,
    pub(crate) estimate: BodyEstimate,
    pub(crate) service: S,
    pub(crate) config: Arc<Config>,
    buffer: BytesMut,
}

impl<S> Pending<S> {
    pub(crate) fn new(
        parts: Parts,
        tenant: String,
        estimate: BodyEstimate,
        service: S,
        config: Arc<Config>,
    ) -> Self {
        Self {
            parts,
            tenant,
            estimate,
            service,
            config,
            buffer: BytesMut::new(),
        }
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<RequestBody<B>>>,
{
    pub(crate) fn inner(future: S::Future, guard: Option<Guard>, headers: LimitHeaders) -> Self {
        Self {
            state: State::Inner {
                future,
                guard,
                headers,
            },
        }
    }

    pub(crate) fn rejected(response: Response<Bytes>) -> Self {
        Self {
            state: State::Rejected {
                response: Some(Box::new(response)),
            },
        }
    }

    /// A request whose reservation the ledger decides later.
    pub(crate) fn reserving(reserving: Reserving, call: Call<S, B>) -> Self {
        Self {
            state: State::Reserving {
                reserving,
                call: Some(Box::new(call)),
            },
        }
    }

    pub(crate) fn reading(body: B, pending: Pending<S>) -> Self {
        Self {
            state: State::Reading {
                body,
                pending: Some(Box::new(pending)),
            },
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResBody>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    ResBody: Body,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::Inner {
                    future,
                    guard,
                    headers,
                } => {
                    let result = ready!(future.poll(cx));
                    let mut guard = guard.take();
                    let mut response = result?; // an inner error releases here
                    if headers.any() {
                        if let Some(limits) = guard.as_ref().and_then(Guard::limits) {
                            add_limit_headers(response.headers_mut(), *headers, limits);
                        }
                    }
                    if response.body().is_end_stream() {
                        guard = None; // no body to wait for (HEAD, 204, empty)
                    }
                    return Poll::Ready(Ok(response.map(|body| ResponseBody::inner(body, guard))));
                }
                StateProj::Rejected { response } => {
                    let response = response.take().expect("polled after completion");
                    return Poll::Ready(Ok((*response).map(ResponseBody::rejected)));
                }
                StateProj::Reading { mut body, pending } => {
                    let read = pending.as_mut().expect("polled after completion");
                    let limit = read.estimate.limit;
                    let outcome = loop {
                        match ready!(body.as_mut().poll_frame(cx)) {
                            Some(Ok(frame)) => {
                                let Ok(data) = frame.into_data() else {
                                    continue; // trailers are not passed on
                                };
                                if read.buffer.len().saturating_add(data.len()) > limit {
                                    let limit = limit as u64;
                                    break Err(Error::BodyTooLarge { limit });
                                }
                                read.buffer.extend_from_slice(&data);
                            }
                            Some(Err(error)) => {
                                let reason = error.into().to_string();
                                break Err(Error::BodyRead { reason });
                            }
                            None => break Ok(()),
                        }
                    };
                    let Pending {
                        parts,
                        tenant,
                        estimate,
                        service,
                        config,
                        buffer,
                    } = *pending.take().expect("checked above");
                    let bytes = buffer.freeze();
                    let admission = match outcome.and_then(|()| estimate.estimate(&parts, &bytes)) {
                        Ok(tokens) => {
                            let draws = Draws::find(&config.budgets, &parts, Some(&bytes));
                            config.admit(&tenant, tokens, draws)
                        }
                        Err(error) => Admission::Now(Err(error)),
                    };
                    let call = Call {
                        parts,
                        body: RequestBody::buffered(bytes),
                        service,
                        config,
                    };
                    call.decide(admission)
                }
                StateProj::Reserving { reserving, call } => {
                    let decided = ready!(reserving.as_mut().poll(cx));
                    let call = *call.take().expect("polled after completion");
                    call.decide(Admission::Now(decided))
                }
            };
            state.set(next);
        }
    }
}

/// The cap and what is left of it, on an admitted response, where the inner service has
/// not set them itself.
fn add_limit_headers(map: &mut http::HeaderMap, headers: LimitHeaders, (cap, left): (u64, u64)) {
    if headers.openai {
        map.entry(X_RATELIMIT_LIMIT_TOKENS).or_insert(cap.into());
        map.entry(X_RATELIMIT_REMAINING_TOKENS)
            .or_insert(left.into());
    }
    if headers.ietf {
        map.entry(RATELIMIT_POLICY)
            .or_insert_with(|| policy_field(cap));
        map.entry(RATELIMIT)
            .or_insert_with(|| limit_field(left, None));
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<RequestBody<B>>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Inner { .. } => "Inner",
            State::Rejected { .. } => "Rejected",
            State::Reading { .. } => "Reading",
            State::Reserving { .. } => "Reserving",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
