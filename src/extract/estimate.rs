//! Estimating what a request may cost, in tokens.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, CONTENT_LENGTH};
use http::request::Parts;

use super::headers::Found;
use super::openai::{Features, Learned, OpenAiEstimator};
use super::Head;
use crate::Error;

type EstimateFn = dyn Fn(&Parts) -> Result<Option<u64>, EstimateError> + Send + Sync;
type BodyFn = dyn Fn(&Parts, &Bytes) -> Result<u64, EstimateError> + Send + Sync;

/// How the layer estimates the tokens a request will use, before it runs.
///
/// The estimate is what gets reserved. Handlers that learn the real usage can reconcile it
/// through the [`ReservationHandle`](crate::ReservationHandle) in the request extensions.
#[derive(Clone)]
pub struct Estimator {
    from: EstimateFrom,
}

#[derive(Clone)]
enum EstimateFrom {
    Header(HeaderName),
    ContentLength { bytes_per_token: u64 },
    Fixed(u64),
    Fn(Arc<EstimateFn>),
    Body(BodyEstimate),
}

impl Estimator {
    /// The value of header `name`: one header, decimal digits only, fitting in 64 bits.
    /// Anything else (`abc`, `-1`, `1e9`, `18446744073709551616`, the header twice) is
    /// refused with 400.
    pub fn header(name: HeaderName) -> Self {
        Self {
            from: EstimateFrom::Header(name),
        }
    }

    /// The request's `Content-Length` divided by `bytes_per_token`, rounded up (4 bytes a
    /// token is the usual rule of thumb for English text). A request without a
    /// `Content-Length` (a chunked upload) has no estimate.
    pub fn content_length(bytes_per_token: u64) -> Self {
        Self {
            from: EstimateFrom::ContentLength {
                bytes_per_token: bytes_per_token.max(1),
            },
        }
    }

    /// The same estimate for every request.
    pub fn fixed(tokens: u64) -> Self {
        Self {
            from: EstimateFrom::Fixed(tokens),
        }
    }

    /// The estimate your function computes from the request head; `Ok(None)` counts as
    /// missing, `Err` refuses the request with 400.
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&Parts) -> Result<Option<u64>, EstimateError> + Send + Sync + 'static,
    {
        Self {
            from: EstimateFrom::Fn(Arc::new(f)),
        }
    }

    /// The estimate your function computes from the request head and its whole body.
    ///
    /// The layer reads the body first, up to `limit` bytes (413 beyond, without reading
    /// further when `Content-Length` already says so), then hands the inner service the
    /// same bytes. Request trailers are not passed on.
    pub fn from_body_fn<F>(limit: usize, f: F) -> Self
    where
        F: Fn(&Parts, &Bytes) -> Result<u64, EstimateError> + Send + Sync + 'static,
    {
        Self {
            from: EstimateFrom::Body(BodyEstimate {
                limit,
                reader: Reader::Fn(Arc::new(f)),
            }),
        }
    }

    /// How to estimate this request: now from its head, or after reading its body. `None`
    /// when your function estimates it and `head` has no `Parts` to hand it.
    #[inline(always)]
    pub(crate) fn read(&self, head: Head<'_>) -> Option<Estimate> {
        let estimate = match &self.from {
            EstimateFrom::Header(name) => header_estimate(Found::lookup(head.headers, name), name),
            EstimateFrom::ContentLength { bytes_per_token } => {
                content_estimate(head.headers, *bytes_per_token)
            }
            EstimateFrom::Fixed(tokens) => Ok(Some(*tokens)),
            EstimateFrom::Fn(f) => f(head.parts?).map_err(Error::from),
            EstimateFrom::Body(body) => {
                return Some(match content_length(head.headers) {
                    Ok(Some(len)) if len > body.limit as u64 => {
                        Estimate::Ready(Err(Error::BodyTooLarge {
                            limit: body.limit as u64,
                        }))
                    }
                    _ => Estimate::Body(body.clone()),
                })
            }
        };
        Some(Estimate::Ready(estimate))
    }

    /// The header the estimate is read from, if that is where it comes from: the layer
    /// may find it together with the tenant's in one walk over the headers.
    #[inline]
    pub(crate) fn header_name(&self) -> Option<&HeaderName> {
        match &self.from {
            EstimateFrom::Header(name) => Some(name),
            _ => None,
        }
    }
}

impl fmt::Debug for Estimator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.from {
            EstimateFrom::Header(name) => f.debug_tuple("Header").field(name).finish(),
            EstimateFrom::ContentLength { bytes_per_token } => f
                .debug_struct("ContentLength")
                .field("bytes_per_token", bytes_per_token)
                .finish(),
            EstimateFrom::Fixed(tokens) => f.debug_tuple("Fixed").field(tokens).finish(),
            EstimateFrom::Fn(_) => f.write_str("Fn"),
            EstimateFrom::Body(body) => match &body.reader {
                Reader::Fn(_) => f.debug_struct("Body").field("limit", &body.limit).finish(),
                Reader::OpenAi(estimator) => f.debug_tuple("OpenAi").field(estimator).finish(),
            },
        }
    }
}

/// A body estimate that can find the request's model in the same pass.
impl From<OpenAiEstimator> for Estimator {
    fn from(estimator: OpenAiEstimator) -> Self {
        Self {
            from: EstimateFrom::Body(BodyEstimate {
                limit: estimator.limit(),
                reader: Reader::OpenAi(estimator),
            }),
        }
    }
}

/// How a request is to be estimated.
pub(crate) enum Estimate {
    /// Known from the head: the estimate, `None` when missing, or why it is unusable.
    Ready(Result<Option<u64>, Error>),
    /// Needs the body, read up to a limit.
    Body(BodyEstimate),
}

/// An estimate computed from the whole request body.
#[derive(Clone)]
pub(crate) struct BodyEstimate {
    pub(crate) limit: usize,
    reader: Reader,
}

/// What reads the body.
#[derive(Clone)]
enum Reader {
    /// A function of the user's ([`Estimator::from_body_fn`]).
    Fn(Arc<BodyFn>),
    /// The [`OpenAiEstimator`], which can also find the model.
    OpenAi(OpenAiEstimator),
}

/// What [`BodyEstimate::estimate`] found in a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Estimated {
    /// The estimate.
    pub(crate) tokens: u64,
    /// The part of `tokens` that is the prompt, when the estimator tells it apart (an
    /// [`OpenAiEstimator`]); 0 otherwise.
    pub(crate) prompt: u64,
    /// The top-level `"model"` string, as the [`OpenAiEstimator`] finds it; only
    /// when asked for and the body was read by an [`OpenAiEstimator`]. `None` otherwise:
    /// a user's function finds no model, and `json_model` can be asked instead.
    pub(crate) model: Option<String>,
    /// The request set no output limit (an [`OpenAiEstimator`]'s estimate).
    pub(crate) unlimited: bool,
    /// What the prompt is made of, when the layer calibrates prompts (an
    /// [`OpenAiEstimator`]'s estimate).
    pub(crate) features: Option<Features>,
}

impl BodyEstimate {
    /// The estimate, and with `want_model` the model an [`OpenAiEstimator`] found in the
    /// same pass over the body (see [`Estimated::model`]); an [`OpenAiEstimator`]'s uses
    /// what the layer has `learned` (allowances, calibrated prompts). Without `want_model`
    /// or anything learned, nothing more is done than for the estimate alone.
    pub(crate) fn estimate_learning(
        &self,
        parts: &Parts,
        body: &Bytes,
        want_model: bool,
        learned: &Learned<'_>,
    ) -> Result<Estimated, Error> {
        match &self.reader {
            Reader::Fn(f) => Ok(Estimated {
                tokens: f(parts, body)?,
                prompt: 0,
                model: None,
                unlimited: false,
                features: None,
            }),
            Reader::OpenAi(estimator) => estimator.estimated(body, want_model, learned),
        }
    }
}

/// A token count parsed strictly: ASCII digits only (no sign, no exponent, no spaces),
/// fitting in a `u64`.
pub(crate) fn parse_tokens(text: &[u8]) -> Result<u64, String> {
    match digits(text) {
        Some(tokens) => Ok(tokens),
        None => Err(not_tokens(text)),
    }
}

/// The number `text` writes in decimal digits (leading zeros allowed), if it fits in a
/// `u64`.
#[inline]
fn digits(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    // Up to 19 digits always fit (u64::MAX has 20): only longer numbers need checking.
    let short = text.len() < 20;
    let mut tokens: u64 = 0;
    for &byte in text {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        tokens = if short {
            tokens * 10 + u64::from(digit)
        } else {
            tokens.checked_mul(10)?.checked_add(u64::from(digit))?
        };
    }
    Some(tokens)
}

/// Why `text` is not a token count.
#[cold]
fn not_tokens(text: &[u8]) -> String {
    let shown = String::from_utf8_lossy(text);
    if text.is_empty() {
        "an empty value is not a number of tokens".to_owned()
    } else if text.iter().all(u8::is_ascii_digit) {
        format!("`{shown}` does not fit in 64 bits")
    } else {
        format!("`{shown}` is not a whole number of tokens")
    }
}

/// The estimate in header `name`, checked as [`Estimator::header`] says.
pub(crate) fn header_estimate(found: Found<'_>, name: &HeaderName) -> Result<Option<u64>, Error> {
    let value = match found {
        Found::Missing => return Ok(None),
        Found::One(value) => value,
        // Which one would count is anyone's guess; refuse rather than pick the smaller.
        Found::Many => {
            return Err(Error::InvalidEstimate {
                reason: format!("more than one `{name}` header"),
            })
        }
    };
    parse_tokens(value.as_bytes())
        .map(Some)
        .map_err(|reason| Error::InvalidEstimate {
            reason: format!("header `{name}`: {reason}"),
        })
}

fn content_estimate(headers: &HeaderMap, bytes_per_token: u64) -> Result<Option<u64>, Error> {
    content_length(headers).map(|len| len.map(|len| len.div_ceil(bytes_per_token)))
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Error> {
    match headers.get(CONTENT_LENGTH) {
        None => Ok(None),
        Some(value) => {
            parse_tokens(value.as_bytes())
                .map(Some)
                .map_err(|reason| Error::InvalidEstimate {
                    reason: format!("`content-length`: {reason}"),
                })
        }
    }
}

/// Why an estimate could not be made; the request is refused with 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EstimateError {
    malformed: bool,
    message: String,
}

impl EstimateError {
    /// The request carries an estimate, or what an estimate is computed from, that makes
    /// no sense (`invalid_token_estimate`).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            malformed: false,
            message: message.into(),
        }
    }

    /// The body cannot be parsed at all (`invalid_json`).
    pub fn malformed(message: impl Into<String>) -> Self {
        Self {
            malformed: true,
            message: message.into(),
        }
    }
}

impl fmt::Display for EstimateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for EstimateError {}

impl From<EstimateError> for Error {
    fn from(error: EstimateError) -> Self {
        if error.malformed {
            Error::MalformedBody {
                reason: error.message,
            }
        } else {
            Error::InvalidEstimate {
                reason: error.message,
            }
        }
    }
}

/// What to do with a request that carries no token estimate.
///
/// An estimate that is present but unusable is always refused with 400.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissingEstimate {
    /// Refuse with 400 Bad Request (the default).
    #[default]
    Reject,
    /// Reserve this many tokens instead.
    Default(u64),
    /// Let the request through without reserving anything.
    Unmetered,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_estimate(estimator: Estimator) -> BodyEstimate {
        match estimator.from {
            EstimateFrom::Body(body) => body,
            _ => unreachable!("not a body estimator"),
        }
    }

    #[test]
    fn a_body_function_finds_no_model_even_when_asked() {
        let (parts, ()) = http::Request::new(()).into_parts();
        let body = Bytes::from_static(br#"{"model":"m","max_tokens":5,"messages":["abcd"]}"#);
        let found = |estimator: Estimator, want_model: bool| {
            body_estimate(estimator)
                .estimate_learning(&parts, &body, want_model, &Learned::default())
                .unwrap()
        };
        let from_fn = || Estimator::from_body_fn(1024, |_, body| Ok(body.len() as u64));
        assert_eq!(
            found(from_fn(), true),
            Estimated {
                tokens: body.len() as u64,
                prompt: 0,
                model: None,
                unlimited: false,
                features: None,
            }
        );
    }
}
