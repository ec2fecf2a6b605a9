//! The health and metrics ports: small servers of their own, bounded apart from the gRPC port.
use super::*;

/// The health port: a health check is a few bytes; probes need a handful of connections (the
/// kubelet's all come from the node's address), and live minutes at most.
pub(super) const HEALTH_MAX_MESSAGE: usize = 1024;
pub(super) const HEALTH_MAX_CONNECTIONS: usize = 64;
pub(super) const HEALTH_MAX_CONNECTIONS_PER_ADDRESS: usize = 16;
pub(super) const HEALTH_MAX_CONNECTION_AGE: Duration = Duration::from_secs(5 * 60);

/// `grpc.health.v1` alone, in plain text, on `HEALTH__ADDR` (Kubernetes probes cannot speak
/// TLS). It reports what the main port's health service reports, within small bounds of its own.
pub(super) async fn serve_health(
    listener: TcpListener,
    health: tonic_health::pb::health_server::HealthServer<crate::health::Watched>,
    ipv6_prefix: u8,
    stop: CancellationToken,
) {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let caps = limits::Caps {
        total: HEALTH_MAX_CONNECTIONS,
        per_address: HEALTH_MAX_CONNECTIONS_PER_ADDRESS,
        opening_bytes: limits::HTTP2_OPENING,
        ipv6_prefix,
    };
    let served = Server::builder()
        .timeout(Duration::from_secs(5))
        .max_connection_age(HEALTH_MAX_CONNECTION_AGE)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(8)
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(64 * 1024)
        .http2_max_header_list_size(8 * 1024)
        .add_service(health)
        .serve_with_incoming_shutdown(limits::limit(incoming, caps), stop.cancelled())
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "the health endpoint failed");
    }
}

/// A connection to `/metrics` lives at most this long (a scraper simply reconnects).
pub(super) const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// `GET /metrics` in the Prometheus text format, and `GET /.well-known/jwks.json` when JWTs are
/// on (HTTP/1.1): at most `METRICS__MAX_CONNECTIONS` connections, each closed when a request's
/// headers take longer than `METRICS__HEADER_READ_TIMEOUT`.
pub(super) async fn serve_metrics(
    listener: TcpListener,
    settings: crate::config::MetricsSettings,
    metrics: Arc<Metrics>,
    db: Arc<Db>,
    auth: Arc<AuthService>,
    stop: CancellationToken,
) {
    use axum::{http::StatusCode, response::IntoResponse};
    use futures::StreamExt;
    use hyper_util::rt::{TokioIo, TokioTimer};

    let jwks = move || {
        let auth = auth.clone();
        async move {
            match auth.jwks().map(|set| serde_json::to_vec(&set)) {
                Ok(Ok(body)) => {
                    let cache = format!(
                        "private, max-age={}",
                        crate::auth::jwt::JWKS_MAX_AGE.as_secs()
                    );
                    let headers = [
                        ("content-type", "application/json"),
                        ("cache-control", &cache),
                    ];
                    (headers, body).into_response()
                }
                Ok(Err(error)) => {
                    tracing::error!(%error, "could not write the JWKS");
                    StatusCode::INTERNAL_SERVER_ERROR.into_response()
                }
                Err(crate::auth::AuthError::NotEnabled(_)) => StatusCode::NOT_FOUND.into_response(),
                // Keys this instance could not reload lately: another instance may answer.
                Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
            }
        }
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let (metrics, db) = (metrics.clone(), db.clone());
                async move {
                    db.record_pool_metrics();
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/.well-known/jwks.json", axum::routing::get(jwks));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    // An HTTP/1 request line can be short; the header read timeout bounds the rest.
    let caps = limits::Caps {
        total: settings.max_connections,
        per_address: settings.max_connections_per_address,
        opening_bytes: 1,
        ipv6_prefix: 64,
    };
    let limited = limits::limit(incoming, caps);
    let mut incoming = Box::pin(limited);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = incoming.next() => accepted,
        };
        let stream = match accepted {
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                tracing::debug!(%error, "metrics connection not accepted");
                continue;
            }
            None => return,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(METRICS_CONNECTION_LIFETIME, connection).await;
        });
    }
}
