//! `envoy.service.auth.v3.Authorization` as a tower service: envoy-types' generated server,
//! but decoding the request into [`CheckRequestView`] (the same wire format, read lazily), so a
//! Check costs nothing for the dozens of headers authd does not read.
use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use futures::future::BoxFuture;
use tonic::{
    Request, Response, Status,
    codegen::{Body, StdError},
    server::{Grpc, NamedService, UnaryService},
};

use super::{ExtAuthzGrpc, SERVICE, wire::CheckRequestView};

/// The only method.
const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";

#[derive(Clone)]
pub struct AuthorizationServer {
    inner: Arc<ExtAuthzGrpc>,
    /// The largest CheckRequest taken (`EXT_AUTHZ__MAX_REQUEST_SIZE`); larger: OUT_OF_RANGE.
    max_request_size: usize,
}

impl AuthorizationServer {
    pub fn new(inner: ExtAuthzGrpc, max_request_size: usize) -> Self {
        Self {
            inner: Arc::new(inner),
            max_request_size,
        }
    }
}

impl NamedService for AuthorizationServer {
    const NAME: &'static str = SERVICE;
}

struct Check(Arc<ExtAuthzGrpc>);

impl UnaryService<CheckRequestView> for Check {
    type Response = CheckResponse;
    type Future = BoxFuture<'static, Result<Response<CheckResponse>, Status>>;

    fn call(&mut self, request: Request<CheckRequestView>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.check(request.get_ref()).await.map(Response::new) })
    }
}

impl<B> tower::Service<http::Request<B>> for AuthorizationServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != CHECK {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let method = Check(self.inner.clone());
        let codec = tonic_prost::ProstCodec::<CheckResponse, CheckRequestView>::default();
        let mut grpc =
            Grpc::new(codec).apply_max_message_size_config(Some(self.max_request_size), None);
        Box::pin(async move { Ok(grpc.unary(method, request).await) })
    }
}
