//! A tower [`Layer`] for tonic servers: every request must carry `authorization: Bearer
//! <token>` for a valid session; the session goes into the request's extensions
//! ([`Authenticated`]) for the handler. UNAUTHENTICATED otherwise, and authd's own status when
//! it cannot be asked (UNAVAILABLE, DEADLINE_EXCEEDED).
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::Either;
use tonic::Status;
use tower::{Layer, Service};

use crate::{Validator, proto as pb};

/// The session a request was authenticated with, in its extensions (shared with the
/// validator's memory).
#[derive(Debug, Clone)]
pub struct Authenticated(pub Arc<pb::Session>);

/// Validates each request's bearer token with a [`Validator`].
#[derive(Clone)]
pub struct AuthLayer {
    validator: Validator,
}

impl AuthLayer {
    pub fn new(validator: Validator) -> Self {
        Self { validator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            validator: self.validator.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    validator: Validator,
}

/// The token of `authorization: Bearer <token>` (the scheme compared without case).
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl<S, B, RB> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    /// The inner service's own future when the memory answered; a task of the validation and
    /// the call otherwise.
    type Future =
        Either<S::Future, Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let Some(token) = bearer(request.headers()) else {
            let refused = Status::unauthenticated("`authorization: Bearer <token>` is required");
            return Either::Right(Box::pin(async move { Ok(refused.into_http()) }));
        };
        // The warm path: no copy of the token or the session, no future of its own.
        if let Some(session) = self.validator.validate_from_memory(token) {
            request.extensions_mut().insert(Authenticated(session));
            return Either::Left(self.inner.call(request));
        }
        let token = token.to_owned();
        // The clone that was made ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let validator = self.validator.clone();
        Either::Right(Box::pin(async move {
            match validator.validate(&token).await {
                Ok(session) => {
                    request
                        .extensions_mut()
                        .insert(Authenticated(Arc::new(session)));
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bearer_token_is_read() {
        let with = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            bearer(&headers).map(str::to_owned)
        };
        assert_eq!(with("Bearer abc"), Some("abc".to_owned()));
        assert_eq!(with("bearer  abc "), Some("abc".to_owned()));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(bearer(&http::HeaderMap::new()), None);
    }
}
