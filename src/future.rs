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

use crate::admit::body::admit_read;
use crate::admit::{reject, Admission};
use crate::body::{RequestBody, ResponseBody};
use crate::config::{Config, LimitHeaders};
use crate::extract::BodyEstimate;
use crate::fair::Priority;
use crate::headers::{
    limit_field, policy_field, reset_field, RATELIMIT, RATELIMIT_POLICY, X_RATELIMIT_LIMIT_TOKENS,
    X_RATELIMIT_REMAINING_TOKENS, X_RATELIMIT_RESET_TOKENS,
};
use crate::reservation::usage::Tap;
use crate::reservation::Guard;
use crate::step::{Pending, Step};
use crate::{BoxError, Error};

pin_project! {
    /// The future of [`TenantTokenService`](crate::TenantTokenService)'s response.
    ///
    /// Dropping it (the request was cancelled) releases the reservation, or leaves the
    /// queue it waits in.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<RequestBody<B>>>,
    {
        #[pin]
        stage: Stage<S::Future, S, B>,
    }
}

pin_project! {
    #[project = StageProj]
    enum Stage<F, S, B> {
        /// Admitted (or unmetered): the inner call, holding the reservation until the
        /// response, which takes it over.
        Inner { #[pin] future: F, guard: Option<Guard>, headers: LimitHeaders },
        /// Refused before reaching the inner service. (Boxed, like the others, to keep the
        /// future small: it is moved on every admitted request.)
        Rejected { response: Option<Box<Response<Bytes>>> },
        /// The estimate needs the body: read it (up to a limit), then admit. (Read by hand:
        /// `http_body_util`'s `Collect<Limited<B>>` would put `B: Body` bounds on this
        /// public future's type and everything that names it.)
        Reading { #[pin] body: B, reading: Option<Box<ReadingBody<S>>> },
        /// Waiting for the ledger (Redis) or for capacity to admit the request.
        Admitting { pending: Pending<Guard>, call: Option<Box<(Call<S>, RequestBody<B>)>> },
        /// Admitted after a wait: the inner service (a clone, which gave nothing up while
        /// the request waited) is polled ready, then called.
        Calling { call: Option<Box<(Call<S>, RequestBody<B>, Guard)>> },
    }
}

/// Attaches to `guard` a reader of the response's usage for a request whose estimate
/// came from its head (no prompt part is known, nothing is learned), unless a reader made
/// with the estimate from the body is attached; kept out of the common path.
#[cold]
#[inline(never)]
fn read_usage(guard: &mut Guard) {
    if guard.reads() {
        return;
    }
    if let Some(reader) = Tap::new(0, None, false) {
        guard.attach(reader);
    }
}

/// A request to call once it is admitted: its head, a clone of the inner service (polled
/// ready only once the request is admitted), the settings.
pub(crate) struct Call<S> {
    parts: Parts,
    service: S,
    config: Arc<Config>,
    /// The reader of the response's usage, made with the estimate from the body.
    reader: Option<Tap>,
}

impl<S> Call<S> {
    pub(crate) fn new(parts: Parts, service: S, config: Arc<Config>) -> Self {
        Self {
            parts,
            service,
            config,
            reader: None,
        }
    }

    /// What to do next with the ledger's answer.
    fn decide<B>(self, body: RequestBody<B>, admission: Admission) -> Stage<S::Future, S, B>
    where
        S: Service<Request<RequestBody<B>>> + Clone,
    {
        match admission {
            Step::Now(Ok(guard)) => Stage::Calling {
                call: Some(Box::new((self, body, guard))),
            },
            Step::Now(Err(error)) => Stage::Rejected {
                response: Some(Box::new(reject(&self.config, error))),
            },
            Step::Later(pending) => {
                // Waiting holds none of the inner service's readiness: a clone is polled
                // ready once the request is admitted.
                let call = Call {
                    service: self.service.clone(),
                    ..self
                };
                Stage::Admitting {
                    pending,
                    call: Some(Box::new((call, body))),
                }
            }
        }
    }

    /// Calls the inner service, holding `guard` until the response takes it over.
    fn start<B>(self, body: RequestBody<B>, guard: Guard) -> Stage<S::Future, S, B>
    where
        S: Service<Request<RequestBody<B>>>,
    {
        let Call {
            mut parts,
            mut service,
            config,
            reader,
        } = self;
        let mut guard = guard;
        if let Some(reader) = reader {
            guard.attach(reader);
        }
        prepare(&mut parts.extensions, &mut guard, &config);
        Stage::Inner {
            future: service.call(Request::from_parts(parts, body)),
            guard: Some(guard),
            headers: config.limit_headers,
        }
    }
}

/// Readies an admitted request for the inner service: hands the handler the
/// reservation's handle in `extensions` when the layer gives one and, on a layer that
/// reads usage, attaches a reader to `guard` unless one made with the estimate from the
/// body is attached. Every admitted request that reaches the inner service passes here.
#[inline(always)]
pub(crate) fn prepare(extensions: &mut http::Extensions, guard: &mut Guard, config: &Config) {
    if let Some(handle) = guard.handle() {
        extensions.insert(handle);
    }
    if config.read_usage {
        read_usage(guard);
    }
}

/// What a request whose estimate needs its body still needs once the body is read.
pub(crate) struct ReadingBody<S> {
    tenant: String,
    estimate: BodyEstimate,
    class: Priority,
    call: Call<S>,
    buffer: BytesMut,
}

impl<S> ReadingBody<S> {
    pub(crate) fn new(
        tenant: String,
        estimate: BodyEstimate,
        class: Priority,
        call: Call<S>,
    ) -> Self {
        Self {
            tenant,
            estimate,
            class,
            call,
            buffer: BytesMut::new(),
        }
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<RequestBody<B>>>,
{
    #[inline(always)]
    pub(crate) fn inner(future: S::Future, guard: Option<Guard>, headers: LimitHeaders) -> Self {
        Self {
            stage: Stage::Inner {
                future,
                guard,
                headers,
            },
        }
    }

    pub(crate) fn rejected(response: Response<Bytes>) -> Self {
        Self {
            stage: Stage::Rejected {
                response: Some(Box::new(response)),
            },
        }
    }

    /// A request admitted later: by Redis, or once capacity comes back.
    pub(crate) fn admitting(pending: Pending<Guard>, call: Call<S>, body: RequestBody<B>) -> Self {
        Self {
            stage: Stage::Admitting {
                pending,
                call: Some(Box::new((call, body))),
            },
        }
    }

    /// A request whose body is read before it is estimated.
    pub(crate) fn reading(body: B, reading: ReadingBody<S>) -> Self {
        Self {
            stage: Stage::Reading {
                body,
                reading: Some(Box::new(reading)),
            },
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResBody>> + Clone,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    ResBody: Body,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().stage;
        loop {
            let next = match state.as_mut().project() {
                StageProj::Inner {
                    future,
                    guard,
                    headers,
                } => {
                    let result = ready!(future.poll(cx));
                    let guard = guard.take();
                    let mut response = result?; // an inner error releases here
                    if headers.any() {
                        if let Some(guard) = &guard {
                            add_limit_headers(response.headers_mut(), *headers, guard);
                        }
                    }
                    let guard = match guard {
                        // No body to wait for (HEAD, 204, empty).
                        _ if response.body().is_end_stream() => None,
                        Some(guard) if guard.reads() => {
                            return Poll::Ready(Ok(read(response, guard)))
                        }
                        guard => guard,
                    };
                    return Poll::Ready(Ok(response.map(|body| ResponseBody::inner(body, guard))));
                }
                StageProj::Rejected { response } => {
                    let response = response.take().expect("polled after completion");
                    return Poll::Ready(Ok((*response).map(ResponseBody::rejected)));
                }
                StageProj::Reading { mut body, reading } => {
                    let read = reading.as_mut().expect("polled after completion");
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
                    let ReadingBody {
                        tenant,
                        estimate,
                        class,
                        mut call,
                        buffer,
                    } = *reading.take().expect("checked above");
                    let read = outcome.map(|()| buffer.freeze());
                    let admitted = admit_read(
                        &call.config,
                        &tenant,
                        class,
                        &estimate,
                        &mut call.parts,
                        read,
                    );
                    call.reader = admitted.reader;
                    call.decide(RequestBody::buffered(admitted.body), admitted.admission)
                }
                StageProj::Admitting { pending, call } => {
                    let admitted = ready!(pending.as_mut().poll(cx));
                    let (call, body) = *call.take().expect("polled after completion");
                    call.decide(body, Step::Now(admitted))
                }
                StageProj::Calling { call } => {
                    let service = &mut call.as_mut().expect("polled after completion").0.service;
                    if let Err(error) = ready!(service.poll_ready(cx)) {
                        call.take(); // releases the reservation
                        return Poll::Ready(Err(error));
                    }
                    let (call, body, guard) = *call.take().expect("checked above");
                    call.start(body, guard)
                }
            };
            state.set(next);
        }
    }
}

/// The response of a call whose usage is read: its body read by the reader attached to
/// `guard`, unless it is one the reader cannot read.
#[inline(never)]
fn read<B>(mut response: Response<B>, mut guard: Guard) -> Response<ResponseBody<B>> {
    let Some(strips) = guard.start_reading(response.headers()) else {
        return response.map(|body| ResponseBody::inner(body, Some(guard)));
    };
    if strips {
        response.headers_mut().remove(http::header::CONTENT_LENGTH);
    }
    response.map(|body| ResponseBody::read(body, guard, strips))
}

/// The cap and what is left of it, on an admitted response, where the inner service has
/// not set them itself. OpenAI's headers describe the window with the least left when
/// the request was charged to windows, as OpenAI's own limits are windows.
fn add_limit_headers(map: &mut http::HeaderMap, headers: LimitHeaders, guard: &Guard) {
    let window = match headers.openai {
        true => guard.tightest_window(),
        false => None,
    };
    if let Some(window) = window {
        map.entry(X_RATELIMIT_LIMIT_TOKENS)
            .or_insert(window.limit.into());
        map.entry(X_RATELIMIT_REMAINING_TOKENS)
            .or_insert(window.remaining.into());
        map.entry(X_RATELIMIT_RESET_TOKENS)
            .or_insert_with(|| reset_field(window.reset));
    }
    let Some((cap, left)) = guard.limits() else {
        return;
    };
    if headers.openai && window.is_none() {
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
        let state = match &self.stage {
            Stage::Inner { .. } => "Inner",
            Stage::Rejected { .. } => "Rejected",
            Stage::Reading { .. } => "Reading",
            Stage::Admitting { .. } => "Admitting",
            Stage::Calling { .. } => "Calling",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
