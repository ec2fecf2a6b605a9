//! The container: builds every piece once from [`Settings`], serves, and shuts down in order.
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, sync::oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    auth::{AuthService, password::PasswordHasher, session::SessionPolicy},
    cache::{ProfileCache, RateLimiter, Redis, SessionStore},
    config::Settings,
    grpc::{
        auth::{AuthGrpc, AuthServiceServer},
        profile::{ProfileGrpc, ProfileServiceServer},
    },
    profile::ProfileService,
    proto,
    store::{self, Db},
};

/// Health service names authd reports besides the overall "".
const SERVICES: [&str; 2] = ["authd.v1.AuthService", "authd.v1.ProfileService"];

pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    settings: Settings,
    db: Arc<Db>,
    redis: Redis,
    auth: Arc<AuthService>,
    profiles: Arc<ProfileService>,
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
        let db = Arc::new(
            Db::connect(&settings.database)
                .await
                .context("cannot reach PostgreSQL at DATABASE__URL")?,
        );
        if settings.database.migrate {
            db.migrate().await.context("database migrations failed")?;
        }
        let redis = Redis::connect(&settings.redis)
            .await
            .context("invalid Redis configuration")?;
        let hasher = PasswordHasher::new(&settings.auth)?;
        let auth = Arc::new(AuthService::new(
            db.clone(),
            SessionStore::new(redis.clone(), settings.session.absolute_timeout),
            hasher,
            SessionPolicy::from(&settings.session),
            RateLimiter::new(redis.clone()),
            settings.rate_limit.clone(),
        ));
        let profiles = Arc::new(ProfileService::new(
            db.clone(),
            ProfileCache::new(redis.clone(), settings.profile_cache.clone()),
            auth.clone(),
        ));
        Ok(Self {
            listener,
            addr,
            settings,
            db,
            redis,
            auth,
            profiles,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The database handle (its query counter tells what a request cost).
    pub fn db(&self) -> Arc<Db> {
        self.db.clone()
    }

    /// The auth service (tests install hooks on it).
    pub fn auth(&self) -> Arc<AuthService> {
        self.auth.clone()
    }

    /// The profile service (tests install hooks on it).
    pub fn profiles(&self) -> Arc<ProfileService> {
        self.profiles.clone()
    }

    /// Serves until `shutdown` completes, then: health NOT_SERVING, stop accepting, let in-flight
    /// calls finish within `GRPC__SHUTDOWN_GRACE`, close the pools.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        let background = CancellationToken::new();
        let (auth, profiles, redis) =
            (self.auth.clone(), self.profiles.clone(), self.redis.clone());
        let drainer = tokio::spawn(every(
            self.settings.session.invalidation_interval,
            background.clone(),
            move || drain_invalidations(auth.clone(), profiles.clone(), redis.clone()),
        ));
        let (auth, retention) = (self.auth.clone(), self.settings.session.retention);
        let purger = tokio::spawn(every(
            self.settings.session.purge_interval,
            background.clone(),
            move || {
                let auth = auth.clone();
                async move {
                    if let Err(error) = auth.purge_sessions(retention).await {
                        tracing::warn!(%error, "session purge failed; retrying next time");
                    }
                }
            },
        ));

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let router = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .trace_fn(|request| tracing::info_span!("rpc", method = %request.uri().path()))
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(AuthServiceServer::new(AuthGrpc::new(self.auth.clone())))
            .add_service(ProfileServiceServer::new(ProfileGrpc::new(
                self.profiles.clone(),
            )));
        // Our own listener: the builder's TCP options do not reach it, so set them here (without
        // TCP_NODELAY, small responses wait for delayed ACKs: 40 ms stalls).
        let incoming = TcpIncoming::from(self.listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        }));
        set_status(&health, ServingStatus::Serving).await;
        tracing::info!(addr = %self.addr, redis = self.redis.is_enabled(), "authd serving");

        tokio::select! {
            () = shutdown => {}
            result = &mut server => {
                // The server stopped by itself: that is a failure.
                background.cancel();
                return Err(anyhow::anyhow!("gRPC server stopped: {:?}", result?.err()));
            }
        }
        tracing::info!("shutting down: draining in-flight calls");
        set_status(&health, ServingStatus::NotServing).await;
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
        background.cancel();
        let _ = tokio::join!(drainer, purger);
        self.redis.quit().await;
        self.db.close().await;
        tracing::info!("authd stopped");
        Ok(())
    }
}

/// Reflection over authd's protos, the health protocol and the error details authd sends
/// (`google.rpc.BadRequest`, `RetryInfo`), so grpcurl needs no proto files.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

/// Re-applies, to Redis, revocations and profile versions whose Redis step failed on any
/// instance. When everything queued before the pass began has been applied, this instance trusts
/// cached copies again (see `cache::Redis::trusted`).
async fn drain_invalidations(auth: Arc<AuthService>, profiles: Arc<ProfileService>, redis: Redis) {
    let mark = redis.failure_mark();
    let sessions = auth.drain_invalidations().await;
    let profiles = profiles.drain_invalidations().await;
    match (sessions, profiles) {
        (Ok(true), Ok(true)) => redis.trust(mark),
        (Ok(_), Ok(_)) => {}
        (Err(error), _) | (_, Err(error)) => {
            tracing::debug!(%error, "could not drain queued invalidations; retrying");
        }
    }
}

async fn set_status(health: &HealthReporter, status: ServingStatus) {
    for service in std::iter::once("").chain(SERVICES) {
        health.set_service_status(service, status).await;
    }
}

/// Runs `job` every `period` until `stop` (a background job of every instance: the invalidation
/// drain, the session purge).
async fn every<F, Fut>(period: Duration, stop: CancellationToken, job: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = store::in_background(job()) => {}
        }
    }
}
