//! The container: builds every piece once from [`Settings`], serves, and shuts down in order.
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, sync::oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};

use crate::{
    admin::{Access, AdminService},
    auth::{
        AuthParts, AuthService, UnknownLookups, keys::TokenKeys, password::PasswordHasher,
        password_policy::PasswordPolicy, session::SessionPolicy,
    },
    cache::{ProfileCache, RateLimiter, Redis, SessionStore},
    clock::Clock,
    config::Settings,
    grpc::{
        admin::{AdminGrpc, AdminServiceServer},
        auth::{AuthGrpc, AuthServiceServer},
        limits,
        observe::ObserveLayer,
        profile::{ProfileGrpc, ProfileServiceServer},
        tls::TlsServer,
    },
    health::Health,
    jobs::{Jobs, follow::Follower},
    local::{LocalCache, LocalParts},
    metrics::Metrics,
    profile::ProfileService,
    proto,
    store::Db,
};

pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    metrics_listener: Option<TcpListener>,
    health_listener: Option<TcpListener>,
    settings: Settings,
    metrics: Arc<Metrics>,
    db: Arc<Db>,
    redis: Redis,
    clock: Arc<Clock>,
    auth: Arc<AuthService>,
    profiles: Arc<ProfileService>,
    follower: Arc<Follower>,
    local: LocalCache,
    tls: Option<Arc<TlsServer>>,
    admin: Option<Arc<AdminService>>,
}

impl Application {
    /// Binds `GRPC__ADDR` and builds everything.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.grpc.addr)
            .await
            .with_context(|| format!("cannot listen on GRPC__ADDR={}", settings.grpc.addr))?;
        Self::build_with_listener(settings, listener).await
    }

    /// Builds on a listener the caller bound (tests bind `127.0.0.1:0`).
    pub async fn build_with_listener(
        settings: Settings,
        listener: TcpListener,
    ) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let metrics_listener = match settings.metrics.enabled {
            true => Some(
                TcpListener::bind(settings.metrics.addr)
                    .await
                    .with_context(|| {
                        format!("cannot listen on METRICS__ADDR={}", settings.metrics.addr)
                    })?,
            ),
            false => None,
        };
        let health_listener = match settings.health.addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on HEALTH__ADDR={addr}"))?,
            ),
            None => None,
        };
        let tls = match settings.grpc.tls.enabled() {
            true => Some(Arc::new(TlsServer::load(&settings.grpc.tls).map_err(
                |e| anyhow::anyhow!("invalid setting {}: {}", e.setting, e.reason),
            )?)),
            false => None,
        };
        let metrics = Metrics::new();
        let db = Arc::new(
            Db::connect(&settings.database, metrics.clone())
                .await
                .context("cannot reach PostgreSQL at DATABASE__URL")?,
        );
        if settings.database.migrate {
            db.migrate().await.context("database migrations failed")?;
        }
        // Before the Redis generation, which is bound to PostgreSQL's history too.
        db.check_history()
            .await
            .context("cannot read PostgreSQL's system identifier and timeline")?;
        let redis = Redis::connect(&settings.redis, metrics.clone())
            .await
            .context("invalid Redis configuration")?;
        if redis.is_enabled()
            && let Err(error) = crate::jobs::generation::establish(&redis, &db).await
        {
            tracing::debug!(%error, "no redis generation at startup; the cache waits for one");
        }
        let clock = Arc::new(Clock::new(chrono::TimeDelta::milliseconds(
            settings.test_clock_skew_ms,
        )));
        let sent = clock.local();
        if let Ok(database) = db.clock_timestamp().await {
            clock.calibrate(sent, database, clock.local());
        }
        // A fill lease must outlast the PostgreSQL read it covers (and the commands around it).
        let lease_ttl = settings.database.query_timeout * 2 + settings.redis.command_timeout * 4;
        let hasher = PasswordHasher::new(&settings.auth, metrics.clone())?;
        let instance = uuid::Uuid::new_v4();
        let lease = fleet_lease(&settings, &db, redis.is_enabled(), instance).await?;
        let local = LocalCache::new(LocalParts {
            instance,
            covers: crate::clock::covers(settings.grpc.request_timeout),
            settings: settings.local_cache.clone(),
            lease,
            profile_ttl: settings.profile_cache.ttl,
            session_recheck: settings.session.touch_interval,
            in_flight: crate::store::in_flight(settings.database.query_timeout),
            db: db.clone(),
            redis: redis.clone(),
            metrics: metrics.clone(),
        });
        {
            // A new PostgreSQL history: nothing copied before it is trusted.
            let (local, redis) = (local.clone(), redis.clone());
            db.on_history_change(Arc::new(move || {
                local.history_changed();
                redis.history_changed();
            }));
        }
        let keys = Arc::new(TokenKeys::new(
            db.clone(),
            clock.clone(),
            settings.tokens.clone(),
            settings.session.absolute_timeout,
        ));
        // Tokens are minted from the first call on: a key must be loaded (made, on a new
        // database).
        keys.refresh().await.map_err(|e| {
            anyhow::anyhow!("cannot load the token signing keys from PostgreSQL: {e}")
        })?;
        let auth = Arc::new(AuthService::new(AuthParts {
            db: db.clone(),
            cache: SessionStore::new(redis.clone(), settings.session.absolute_timeout, lease_ttl),
            hasher,
            policy: SessionPolicy::from(&settings.session),
            limiter: RateLimiter::new(redis.clone()),
            limits: settings.rate_limit.clone(),
            passwords: PasswordPolicy::new(settings.auth.password_min_length),
            clock: clock.clone(),
            local: local.clone(),
            keys: keys.clone(),
            unknown: Arc::new(UnknownLookups::new(&settings.rate_limit, metrics.clone())),
        }));
        let profiles = Arc::new(ProfileService::new(
            db.clone(),
            ProfileCache::new(redis.clone(), settings.profile_cache.clone(), lease_ttl),
            auth.clone(),
            local.clone(),
        ));
        let follower = Arc::new(Follower::new(
            auth.clone(),
            profiles.clone(),
            local.clone(),
            redis.clone(),
            db.clone(),
            crate::store::in_flight(settings.database.query_timeout),
            settings.session.invalidation_interval + settings.redis.command_timeout,
        ));
        let admin = match Access::from_settings(&settings.admin)
            .map_err(|e| anyhow::anyhow!("invalid setting ADMIN__API_KEYS_FILE: {e}"))?
        {
            Some(access) => {
                if tls.is_none() && settings.admin.api_keys_file.is_some() {
                    tracing::warn!(
                        "AdminService API keys travel in plain text: set GRPC__TLS__CERT_FILE and \
                         GRPC__TLS__KEY_FILE unless a mesh or proxy encrypts the hop"
                    );
                }
                Some(Arc::new(AdminService::new(
                    auth.clone(),
                    access,
                    db.clone(),
                    metrics.clone(),
                )))
            }
            None => None,
        };
        // Cached copies are served only after a first complete pass over the outbox logs.
        if redis.is_enabled()
            && let Err(error) = crate::store::in_background(follower.pass()).await
        {
            tracing::debug!(%error, "the outbox logs are not followed yet; the cache waits");
        }
        Ok(Self {
            listener,
            addr,
            metrics_listener,
            health_listener,
            settings,
            metrics,
            db,
            redis,
            clock,
            auth,
            profiles,
            follower,
            local,
            tls,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where `/metrics` is served, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The database handle (its query counter tells what a request cost).
    pub fn db(&self) -> Arc<Db> {
        self.db.clone()
    }

    /// The auth service (tests install hooks on it).
    pub fn auth(&self) -> Arc<AuthService> {
        self.auth.clone()
    }

    /// The Redis client (tests install hooks on it).
    pub fn redis(&self) -> Redis {
        self.redis.clone()
    }

    /// The profile service (tests install hooks on it).
    pub fn profiles(&self) -> Arc<ProfileService> {
        self.profiles.clone()
    }

    /// Serves until `shutdown` completes, then: health NOT_SERVING, stop accepting, let in-flight
    /// calls finish within `GRPC__SHUTDOWN_GRACE` (open Watch streams cannot hold it longer),
    /// close the pools.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let health = Arc::new(Health::new(self.metrics.clone()));
        let health_service = health.server();
        let background = CancellationToken::new();
        let mut jobs = Jobs {
            auth: self.auth.clone(),
            follower: self.follower.clone(),
            redis: self.redis.clone(),
            db: self.db.clone(),
            health: health.clone(),
            clock: self.clock.clone(),
            metrics: self.metrics.clone(),
            tls: self.tls.clone(),
            admin: self.admin.clone(),
        }
        .spawn(&self.settings, &background);
        jobs.extend(self.local.spawn(background.clone()));
        if let Some(listener) = self.health_listener {
            jobs.push(tokio::spawn(serve_health(
                listener,
                health_service
                    .clone()
                    .max_decoding_message_size(HEALTH_MAX_MESSAGE),
                self.settings.rate_limit.ipv6_prefix,
                background.clone(),
            )));
        }
        if let Some(listener) = self.metrics_listener {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "metrics served at http://{addr}/metrics");
            }
            jobs.push(tokio::spawn(serve_metrics(
                listener,
                self.settings.metrics.clone(),
                self.metrics.clone(),
                self.db.clone(),
                background.clone(),
            )));
        }

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let g = &self.settings.grpc;
        let max = g.max_message_size;
        let reflection_on = g.reflection;
        // Bounds on what a caller can make the server hold (see `grpc::limits`): message size,
        // streams per connection, a small per-connection flow-control window (so unread request
        // bodies cannot pile up), header size, and a deadline on every call.
        let window = u32::try_from(max.max(64 * 1024)).unwrap_or(u32::MAX);
        let router = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .max_concurrent_streams(g.max_concurrent_streams)
            .initial_stream_window_size(u32::try_from(max).unwrap_or(u32::MAX))
            .initial_connection_window_size(window)
            .http2_adaptive_window(Some(false))
            .http2_max_header_list_size(16 * 1024)
            // An idle connection does not hold its place for ever: at its age it is sent a GOAWAY
            // and closed once its calls are done (clients reconnect). (No
            // `max_connection_age_grace`: with it tonic 0.14 skips the GOAWAY and drops the
            // connection, calls and all, at age + grace.) A peer that stops answering pings is
            // dropped.
            .max_connection_age(MAX_CONNECTION_AGE)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .layer(ObserveLayer::new(self.metrics.clone(), g.request_timeout))
            .add_service(health_service.max_decoding_message_size(max))
            .add_optional_service(
                reflection_on
                    .then(|| reflection().build_v1())
                    .transpose()?
                    .map(|r| r.max_decoding_message_size(max)),
            )
            .add_optional_service(
                reflection_on
                    .then(|| reflection().build_v1alpha())
                    .transpose()?
                    .map(|r| r.max_decoding_message_size(max)),
            )
            .add_service(
                AuthServiceServer::new(AuthGrpc::new(self.auth.clone()))
                    .max_decoding_message_size(max),
            )
            .add_service(
                ProfileServiceServer::new(ProfileGrpc::new(self.profiles.clone()))
                    .max_decoding_message_size(max),
            )
            .add_optional_service(self.admin.clone().map(|admin| {
                AdminServiceServer::new(AdminGrpc::new(admin)).max_decoding_message_size(max)
            }));
        // Our own listener: the builder's TCP options do not reach it, so set them here (without
        // TCP_NODELAY, small responses wait for delayed ACKs: 40 ms stalls).
        let incoming = TcpIncoming::from(self.listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let caps = limits::Caps {
            total: g.max_connections,
            per_address: g.max_connections_per_address,
            opening_bytes: limits::HTTP2_OPENING,
            ipv6_prefix: self.settings.rate_limit.ipv6_prefix,
        };
        let incoming: std::pin::Pin<Box<dyn futures::Stream<Item = _> + Send>> = match &self.tls {
            Some(tls) => Box::pin(limits::limit_tls(incoming, caps, tls.clone())),
            None => Box::pin(limits::limit(incoming, caps)),
        };
        let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        }));
        health.start_serving().await;
        tracing::info!(
            addr = %self.addr,
            tls = self.tls.is_some(),
            admin = self.admin.is_some(),
            redis = self.redis.is_enabled(),
            "authd serving"
        );

        tokio::select! {
            () = shutdown => {}
            result = &mut server => {
                // The server stopped by itself: that is a failure.
                background.cancel();
                return Err(anyhow::anyhow!("gRPC server stopped: {:?}", result?.err()));
            }
        }
        tracing::info!("shutting down: draining in-flight calls");
        health.drain().await;
        let _ = stop_tx.send(());
        let grace = self.settings.grpc.shutdown_grace;
        match tokio::time::timeout(grace, &mut server).await {
            Ok(result) => result?.context("gRPC server failed while draining")?,
            Err(_) => {
                tracing::warn!(
                    ?grace,
                    "grace period over; closing the remaining connections"
                );
                server.abort();
            }
        }
        // Admin calls whose callers hung up still run: their audit rows are written first.
        if let Some(admin) = &self.admin {
            admin.tasks.close();
            // Long enough for an audit row's retries and their last query.
            let audit_wait = crate::admin::AUDIT_RETRY
                + self.settings.database.query_timeout
                + Duration::from_secs(1);
            if tokio::time::timeout(audit_wait, admin.tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!("admin calls still running at shutdown; their audit may be missing");
            }
        }
        background.cancel();
        // Jobs stop at their next await; closing the connections is polite, not required: a
        // dependency that hangs (a stopped PostgreSQL, a Redis node gone mid-failover) must not
        // keep the process from exiting.
        let cleanup = async {
            for job in jobs {
                let _ = job.await;
            }
            self.redis.quit().await;
            self.db.close().await;
        };
        if tokio::time::timeout(CLEANUP_TIMEOUT, cleanup)
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?CLEANUP_TIMEOUT,
                "background jobs or connections did not close in time; exiting anyway"
            );
        }
        tracing::info!("authd stopped");
        Ok(())
    }
}

/// The lease length this instance holds and waits for: the fleet's (see
/// `store::LeaseRepo::fleet_lease`). Every instance may wait for a holder's lease, its own cache
/// on or off, so its request timeout must leave room for it; and this instance is recorded as
/// running, so that no instance starting later sets a length it could not wait for.
async fn fleet_lease(
    settings: &Settings,
    db: &Db,
    redis: bool,
    instance: uuid::Uuid,
) -> anyhow::Result<Duration> {
    let configured = settings.local_cache.lease;
    let mine = (settings.local_cache.enabled && redis).then_some(configured);
    let timeout = settings.grpc.request_timeout;
    let covers = crate::clock::covers(timeout);
    let mut fleet = db
        .leases()
        .fleet_lease(instance, mine, covers, false)
        .await
        .context("cannot read the fleet's lease from PostgreSQL")?;
    if let Some(pause) = fleet.and_then(|f| f.confirm_after) {
        tracing::warn!(
            ?pause,
            "LOCAL_CACHE__LEASE would replace the fleet's lease, but instances that held leases \
             lately were not seen for a while (stopped, or PostgreSQL out of their reach): \
             waiting to see whether they still run"
        );
        tokio::time::sleep(pause).await;
        fleet = db
            .leases()
            .fleet_lease(instance, mine, covers, true)
            .await
            .context("cannot read the fleet's lease from PostgreSQL")?;
    }
    let Some(fleet) = fleet else {
        // No instance ever had the cache on: nobody to wait for.
        return Ok(configured);
    };
    if let Some(covered) = fleet.uncovered {
        return Err(crate::config::ConfigError::invalid(
            "LOCAL_CACHE__LEASE",
            format!(
                "must be at most {covered:?} while instances run whose GRPC__REQUEST_TIMEOUT \
                 cannot wait for a longer lease (their revoking calls wait for every holder's \
                 lease); raise their timeout first, or stop them"
            ),
        )
        .into());
    }
    if !(Duration::from_millis(500)..=crate::local::LONGEST_LEASE).contains(&fleet.lease) {
        return Err(crate::config::ConfigError::invalid(
            "LOCAL_CACHE__LEASE",
            format!(
                "the fleet's lease in local_cache_fleet is {:?}, outside 500ms to 60s (edited \
                 by hand?)",
                fleet.lease
            ),
        )
        .into());
    }
    if fleet.adopted {
        tracing::warn!(
            configured = ?configured,
            fleet = ?fleet.lease,
            "LOCAL_CACHE__LEASE differs from the lease the fleet holds; using the fleet's (it \
             changes once no instance holding leases runs, e.g. once the whole fleet restarted)"
        );
    }
    if fleet.lease > crate::clock::covers(timeout) {
        let longest = crate::clock::lease_wait(fleet.lease) + crate::clock::WAIT_SLACK;
        return Err(crate::config::ConfigError::invalid(
            "GRPC__REQUEST_TIMEOUT",
            format!(
                "must be more than {longest:?}: a revoking call may wait for a lease of the \
                 fleet's {:?} (plus 1% and 100ms) and needs a second more",
                fleet.lease
            ),
        )
        .into());
    }
    Ok(fleet.lease)
}

/// Reflection over authd's protos, the health protocol and the error details authd sends
/// (`google.rpc.BadRequest`, `RetryInfo`), so grpcurl needs no proto files.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

/// After the drain, how long background jobs and the pools may take to close.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection lives at most this long (then it is closed gracefully; clients reconnect).
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);
/// HTTP/2 pings on idle connections, and how long an answer may take.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The health port: a health check is a few bytes; probes need a handful of connections (the
/// kubelet's all come from the node's address), and live minutes at most.
const HEALTH_MAX_MESSAGE: usize = 1024;
const HEALTH_MAX_CONNECTIONS: usize = 64;
const HEALTH_MAX_CONNECTIONS_PER_ADDRESS: usize = 16;
const HEALTH_MAX_CONNECTION_AGE: Duration = Duration::from_secs(5 * 60);

/// `grpc.health.v1` alone, in plain text, on `HEALTH__ADDR` (Kubernetes probes cannot speak
/// TLS). It reports what the main port's health service reports, within small bounds of its own.
async fn serve_health(
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
const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// `GET /metrics` in the Prometheus text format (HTTP/1.1): at most `METRICS__MAX_CONNECTIONS`
/// connections, each closed when a request's headers take longer than
/// `METRICS__HEADER_READ_TIMEOUT`.
async fn serve_metrics(
    listener: TcpListener,
    settings: crate::config::MetricsSettings,
    metrics: Arc<Metrics>,
    db: Arc<Db>,
    stop: CancellationToken,
) {
    use futures::StreamExt;
    use hyper_util::rt::{TokioIo, TokioTimer};

    let app = axum::Router::new().route(
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
    );
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
