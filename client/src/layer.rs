//! A tower [`Layer`] for tonic servers: every request must carry `authorization: Bearer
//! <token>` for a valid session; the session goes into the request's extensions
//! ([`Authenticated`]) for the handler. UNAUTHENTICATED otherwise, and authd's own status when
//! it cannot be asked (UNAVAILABLE, DEADLINE_EXCEEDED).
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::Status;
use tower::{Layer, Service};

use crate::{Validator, proto as pb};

/// The session a request was authenticated with, in its extensions.
#[derive(Debug, Clone)]
pub struct Authenticated(pub pb::Session);

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
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was made ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let validator = self.validator.clone();
        let token = bearer(request.headers()).map(str::to_owned);
        Box::pin(async move {
            let Some(token) = token else {
                let refused =
                    Status::unauthenticated("`authorization: Bearer <token>` is required");
                return Ok(refused.into_http());
            };
            match validator.validate(&token).await {
                Ok(session) => {
                    request.extensions_mut().insert(Authenticated(session));
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
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
