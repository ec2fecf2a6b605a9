//! Around every RPC: a request id (the caller's `x-request-id`, or a new one, returned in the
//! response metadata), a span carrying it, one log line when the RPC answers (method, code,
//! latency, request id, trace id when traces are exported), and the RPC metrics; the span is
//! the call's OpenTelemetry server span, in the caller's trace (`telemetry::traces`); and the
//! call's deadline (`GRPC__REQUEST_TIMEOUT`, or the caller's shorter `grpc-timeout`), past which
//! it answers DEADLINE_EXCEEDED; and the call's work (`store::Work`): the share of the PostgreSQL pool its method uses, and the
//! caller's address.
//!
//! The status of an error is in the response headers (gRPC "trailers-only"); a response without
//! one is OK, its status following in the trailers. Streams (health Watch) are recorded when they
//! start.
use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http::{HeaderValue, Request, Response};
use tonic::Code;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::{
    metrics::Metrics,
    store::{Share, Work},
    telemetry::traces,
};

pub const REQUEST_ID: &str = "x-request-id";

#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
    request_timeout: std::time::Duration,
}

impl ObserveLayer {
    /// `request_timeout`: `GRPC__REQUEST_TIMEOUT`, the deadline of every call (a caller's
    /// shorter `grpc-timeout` wins), made known to what the call awaits (`clock::deadline`).
    pub fn new(metrics: Arc<Metrics>, request_timeout: std::time::Duration) -> Self {
        Self {
            metrics,
            request_timeout,
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            metrics: self.metrics.clone(),
            request_timeout: self.request_timeout,
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
    request_timeout: std::time::Duration,
}

/// The call's request id, in the request's extensions for handlers that record it.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The caller's request id when it is reasonable (printable ASCII, at most 128 bytes).
fn request_id<B>(request: &Request<B>) -> HeaderValue {
    request
        .headers()
        .get(REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.to_str().is_ok())
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                .expect("a UUID is a valid header value")
        })
}

/// The share of the PostgreSQL pool a method's work takes (see `store::work`).
fn share_of(path: &str) -> Share {
    match path.trim_start_matches('/').split_once('/') {
        Some(("authd.v1.AuthService", "Login" | "Register")) => Share::Logins,
        Some(("authd.v1.AuthService", "ValidateSession" | "IssueJwt" | "GetJwks"))
        | Some((crate::grpc::ext_authz::SERVICE, "Check"))
        | Some(("authd.v1.ProfileService", "GetProfile" | "BatchGetProfiles")) => Share::Lookups,
        Some(("authd.v1.AuthService" | "authd.v1.ProfileService", _)) => Share::Changes,
        Some(("authd.v1.AdminService", _)) => Share::Admin,
        // Health and reflection need no PostgreSQL; unknown paths neither.
        _ => Share::Lookups,
    }
}

/// The path as logged and traced: a caller's made-up path (up to the 16 KiB of headers) is cut
/// at 128 bytes; authd's own are under 50.
fn shown(path: &str) -> &str {
    let mut end = path.len().min(128);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

fn status_code<B>(response: &Response<B>) -> Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

impl<S, B, RB> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let start = Instant::now();
        let id = request_id(&request);
        if let Ok(text) = id.to_str() {
            request.extensions_mut().insert(RequestId(text.to_owned()));
        }
        let asked = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::clock::grpc_timeout);
        let deadline = start + asked.map_or(self.request_timeout, |t| t.min(self.request_timeout));
        let path = request.uri().path().to_owned();
        let work = Work {
            share: share_of(&path),
            peer: request
                .extensions()
                .get::<super::limits::PeerInfo>()
                .and_then(|peer| peer.remote)
                .map(|remote| remote.ip()),
        };
        // `otel.*` are filled only when traces are exported (`telemetry::traces`).
        let span = tracing::info_span!(
            "rpc",
            method = %shown(&path),
            request_id = %id.to_str().unwrap_or_default(),
            otel.name = tracing::field::Empty,
            otel.kind = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        traces::serve(&span, shown(&path), request.headers());
        // The clone that was made ready serves this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let call = inner.call(request).instrument(span.clone());
            let call = crate::clock::with_deadline(deadline, crate::store::as_work(work, call));
            // On a task of its own, run to its end: a caller that hangs up, or a deadline that
            // passes, must not cut a PostgreSQL statement short mid-conversation — sqlx 0.9 then
            // never gives the connection back to its pool, and a few such calls would empty a
            // share of it for good (`hardening::pool::calls_cut_short_leave_the_pool_whole`). What the
            // call awaits is bounded anyway (statements by DATABASE__QUERY_TIMEOUT, waits by the
            // deadline it knows).
            let call = tokio::spawn(call);
            // The call's deadline ends it here, so that it is answered DEADLINE_EXCEEDED (what
            // a gRPC client expects), logged and counted like any other call.
            let mut response = match tokio::time::timeout_at(deadline.into(), call).await {
                Ok(Ok(response)) => response?,
                Ok(Err(failed)) => {
                    tracing::error!(parent: &span, error = %failed, "the call's task failed");
                    tonic::Status::internal("internal error").into_http()
                }
                Err(_elapsed) => {
                    tonic::Status::deadline_exceeded("the call's deadline passed on the server")
                        .into_http()
                }
            };
            let code = status_code(&response);
            response.headers_mut().insert(REQUEST_ID, id);
            let elapsed = start.elapsed();
            // Unknown paths answer UNIMPLEMENTED; keep them out of the label values (callers
            // choose paths, and each label value is a new time series).
            let (service, method) = match path.trim_start_matches('/').split_once('/') {
                Some(parts) if code != Code::Unimplemented => parts,
                _ => ("unknown", "unknown"),
            };
            let code_name = format!("{code:?}");
            traces::answered(&span, &path, code);
            metrics
                .rpc_requests
                .with_label_values(&[service, method, &code_name])
                .inc();
            metrics
                .rpc_duration
                .with_label_values(&[service, method])
                .observe(elapsed.as_secs_f64());
            span.in_scope(|| {
                tracing::info!(
                    target: "authd::rpc",
                    code = %code_name,
                    latency_ms = elapsed.as_secs_f64() * 1000.0,
                    trace_id = traces::trace_id(&span),
                    "rpc"
                );
            });
            Ok(response)
        })
    }
}
