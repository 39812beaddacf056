//! The bodies the layer hands on: the response body, which holds the reservation until
//! the last byte has gone, and the request body the inner service receives.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::reservation::Guard;

pin_project! {
    /// The body of a response from [`TenantTokenService`](crate::TenantTokenService).
    ///
    /// For an admitted request it wraps the inner body and owns the reservation, which it
    /// releases at the end of the stream, on a body error, or when dropped (a client that
    /// disconnects mid-stream), whichever comes first. For a refused request it carries the
    /// JSON error, so the inner body type needs no `Default`.
    ///
    /// With [`read_usage`](crate::TenantTokenLayer::read_usage) on, it also reads the usage
    /// the upstream reports as the frames pass (each passed on unchanged), growing the
    /// reservation to what the response has produced and settling it on the reported
    /// total at the end.
    pub struct ResponseBody<B> {
        #[pin]
        contents: Contents<B>,
    }
}

pin_project! {
    #[project = ContentsProj]
    enum Contents<B> {
        Inner { #[pin] body: B, guard: Option<Guard> },
        /// The guard's reader reads the usage as the frames pass; `strips`: it edits the
        /// stream too.
        Read { #[pin] body: B, guard: Option<Guard>, strips: bool },
        Rejected { data: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B, guard: Option<Guard>) -> Self {
        Self {
            contents: Contents::Inner { body, guard },
        }
    }

    /// A body the reader attached to `guard` reads (see [`Guard::start_reading`]).
    pub(crate) fn read(body: B, guard: Guard, strips: bool) -> Self {
        Self {
            contents: Contents::Read {
                body,
                guard: Some(guard),
                strips,
            },
        }
    }

    pub(crate) fn rejected(data: Bytes) -> Self {
        let data = (!data.is_empty()).then_some(data);
        Self {
            contents: Contents::Rejected { data },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Data: From<Bytes>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        match self.project().contents.project() {
            ContentsProj::Read {
                mut body,
                guard,
                strips,
            } => match guard {
                None => Poll::Ready(None), // ended, or failed, and released
                Some(reading) => match *strips {
                    true => loop {
                        let Some(reading) = guard.as_mut() else {
                            return Poll::Ready(None); // ended: the rest went with the last frame
                        };
                        let (data, ended) = match ready!(body.as_mut().poll_frame(cx)) {
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(mut data) => {
                                    let data = data.copy_to_bytes(data.remaining());
                                    (reading.pass(data), body.is_end_stream())
                                }
                                Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                            },
                            Some(Err(error)) => {
                                guard.take(); // settled on what is known, and released
                                return Poll::Ready(Some(Err(error)));
                            }
                            None => (Bytes::new(), true),
                        };
                        let data = match ended {
                            true => {
                                let rest = reading.rest();
                                reading.end();
                                guard.take();
                                if rest.is_empty() {
                                    data
                                } else {
                                    [data, rest].concat().into()
                                }
                            }
                            false => data,
                        };
                        if !data.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(data.into()))));
                        }
                        if ended {
                            return Poll::Ready(None);
                        }
                    },
                    false => {
                        let frame = ready!(body.as_mut().poll_frame(cx));
                        match &frame {
                            Some(Ok(frame)) => {
                                if let Some(data) = frame.data_ref() {
                                    reading.read(data);
                                }
                                if body.is_end_stream() {
                                    reading.end();
                                    guard.take();
                                }
                            }
                            Some(Err(_)) => drop(guard.take()),
                            None => {
                                reading.end();
                                guard.take();
                            }
                        }
                        Poll::Ready(frame)
                    }
                },
            },
            ContentsProj::Inner { mut body, guard } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                // A consumer that knows the length (Content-Length) stops polling after the
                // last frame, so "end of stream" is checked after each frame too.
                if !matches!(frame, Some(Ok(_))) || body.is_end_stream() {
                    guard.take();
                }
                Poll::Ready(frame)
            }
            ContentsProj::Rejected { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d.into()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.contents {
            Contents::Read { guard: None, .. } => true,
            // An edited stream ends when it says so, once what it held back has gone.
            Contents::Read { strips: true, .. } => false,
            Contents::Inner { body, .. } | Contents::Read { body, .. } => body.is_end_stream(),
            Contents::Rejected { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.contents {
            Contents::Read { strips: true, .. } => SizeHint::default(),
            Contents::Inner { body, .. } | Contents::Read { body, .. } => body.size_hint(),
            Contents::Rejected { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.contents {
            Contents::Inner { guard, .. } => f
                .debug_struct("ResponseBody::Inner")
                .field("holds_reservation", &guard.is_some())
                .finish(),
            Contents::Read { guard, .. } => f
                .debug_struct("ResponseBody::Inner")
                .field("holds_reservation", &guard.is_some())
                .field("reads_usage", &true)
                .finish(),
            Contents::Rejected { .. } => f.write_str("ResponseBody::Rejected"),
        }
    }
}

pin_project! {
    /// The request body handed to the inner service: the client's body as it streams in,
    /// or, when the estimator had to read it, the same bytes from memory.
    ///
    /// axum's `Router` and `Route` accept it as they accept any body; a plain hyper
    /// service takes `Request<RequestBody<hyper::body::Incoming>>`.
    pub struct RequestBody<B> {
        #[pin]
        contents: RequestContents<B>,
    }
}

pin_project! {
    #[project = RequestContentsProj]
    enum RequestContents<B> {
        Streaming { #[pin] body: B },
        /// What is left to hand on: empty once handed on. (`Bytes` itself rather than an
        /// `Option`, so that this enum is no larger than `Bytes` or `B`: every request is
        /// moved in it.)
        Buffered { data: Bytes },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn streaming(body: B) -> Self {
        Self {
            contents: RequestContents::Streaming { body },
        }
    }

    pub(crate) fn buffered(data: Bytes) -> Self {
        Self {
            contents: RequestContents::Buffered { data },
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().contents.project() {
            RequestContentsProj::Streaming { body } => body.poll_frame(cx),
            RequestContentsProj::Buffered { data } => {
                Poll::Ready((!data.is_empty()).then(|| Ok(Frame::data(std::mem::take(data)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.contents {
            RequestContents::Streaming { body } => body.is_end_stream(),
            RequestContents::Buffered { data } => data.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.contents {
            RequestContents::Streaming { body } => body.size_hint(),
            RequestContents::Buffered { data } => SizeHint::with_exact(data.len() as u64),
        }
    }
}

impl<B> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.contents {
            RequestContents::Streaming { .. } => f.write_str("RequestBody::Streaming"),
            RequestContents::Buffered { data } => f
                .debug_struct("RequestBody::Buffered")
                .field("len", &data.len())
                .finish(),
        }
    }
}
