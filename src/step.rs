//! An answer known now, or one to wait for: how every ledger answers, so that a ledger in
//! memory answers without a future and one in Redis with one.

use std::future::Future;
use std::pin::Pin;

use crate::Error;

/// An answer that needs a wait (for Redis, or for capacity).
pub(crate) type Pending<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>;

/// An answer known now, or one to wait for.
pub(crate) enum Step<T> {
    Now(Result<T, Error>),
    Later(Pending<T>),
}

impl<T: Send + 'static> Step<T> {
    /// The answer, waiting for it if need be.
    pub(crate) async fn resolve(self) -> Result<T, Error> {
        match self {
            Step::Now(answer) => answer,
            Step::Later(pending) => pending.await,
        }
    }

    /// An answer to wait for, from `future`: the one place a step's future is boxed.
    pub(crate) fn later(future: impl Future<Output = Result<T, Error>> + Send + 'static) -> Self {
        Step::Later(Box::pin(future))
    }

    /// Goes on with `f` once the answer is known, success or refusal: at once when it is
    /// known now and `f` answers now, after the wait otherwise.
    #[inline]
    pub(crate) fn then<U: Send + 'static>(
        self,
        f: impl FnOnce(Result<T, Error>) -> Step<U> + Send + 'static,
    ) -> Step<U> {
        match self {
            Step::Now(answer) => f(answer),
            Step::Later(pending) => Step::later(async move { f(pending.await).resolve().await }),
        }
    }

    /// Turns the answer, once known, into another.
    #[inline]
    pub(crate) fn map<U: Send + 'static>(self, f: impl FnOnce(T) -> U + Send + 'static) -> Step<U> {
        match self {
            Step::Now(answer) => Step::Now(answer.map(f)),
            Step::Later(pending) => Step::later(async move { pending.await.map(f) }),
        }
    }
}
