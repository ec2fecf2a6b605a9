//! A service this instance does not serve, said so: every method of it answers UNIMPLEMENTED
//! naming the settings that turn it on (tonic's router would answer an empty UNIMPLEMENTED, as
//! for a path nobody serves). Reflection lists only what is served (see `app`).
use std::{
    convert::Infallible,
    marker::PhantomData,
    task::{Context, Poll},
};

use futures::future::{Ready, ready};
use tonic::server::NamedService;

/// `service` when it is served, else its [`Disabled`] stand-in answering `message`: exactly one
/// of the two is mounted (both would be a route mounted twice, which panics).
pub fn or_disabled<S>(
    service: Option<S>,
    message: &'static str,
) -> (Option<S>, Option<Disabled<S>>) {
    match service {
        Some(service) => (Some(service), None),
        None => (None, Some(Disabled::new(message))),
    }
}

/// `S`'s methods, answered UNIMPLEMENTED with `message`.
pub struct Disabled<S> {
    message: &'static str,
    service: PhantomData<fn() -> S>,
}

impl<S> Disabled<S> {
    pub fn new(message: &'static str) -> Self {
        Self {
            message,
            service: PhantomData,
        }
    }
}

impl<S> Clone for Disabled<S> {
    fn clone(&self) -> Self {
        Self::new(self.message)
    }
}

impl<S: NamedService> NamedService for Disabled<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Disabled<S> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<B>) -> Self::Future {
        ready(Ok(tonic::Status::unimplemented(self.message).into_http()))
    }
}
