//! The container: builds every piece once from [`Settings`], serves, and shuts down in order.
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, sync::oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};

use crate::{
    admin::{Access, AdminService},
    auth::{
        AuthParts, AuthService, FlowLimits, UnknownLookups, jwt::JwtKeys, keys::TokenKeys,
        password::PasswordHasher, password_policy::PasswordPolicy, session::SessionPolicy,
    },
    cache::{ProfileCache, RateLimiter, Redis, SessionStore},
    clock::Clock,
    config::{ConfigError, Settings},
    events::Events,
    grpc::{
        account::{AccountGrpc, AccountServiceServer},
        admin::{AdminGrpc, AdminServiceServer},
        auth::{AuthGrpc, AuthServiceServer},
        disabled::or_disabled,
        events::{EventServiceServer, EventsGrpc},
        ext_authz::{AuthorizationServer, ExtAuthzGrpc},
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
    store::Db,
};

/// What only a piece's own code can judge of the settings (`config` only parses): the gRPC
/// port's certificates, the admin keys file, the fred configuration and `DATABASE__URL`'s TLS
/// parameters. Judged first, before anything listens or connects, so that a wrong setting stops
/// startup (exit 2, naming it) whatever else is down; the pieces loaded on the way are kept.
struct Judged {
    tls: Option<Arc<TlsServer>>,
    access: Option<Access>,
    /// Who may subscribe to EventService (served when some caller can be admitted).
    subscribers: Option<Access>,
    /// Who may start account flows (AccountService, served likewise).
    notifiers: Option<Access>,
}

impl Judged {
    fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let tls = match settings.grpc.tls.enabled() {
            true => Some(Arc::new(TlsServer::load(&settings.grpc.tls)?)),
            false => None,
        };
        let access = Access::from_settings(&settings.admin)
            .map_err(|reason| ConfigError::invalid("ADMIN__API_KEYS_FILE", reason))?;
        let subscribers = Access::from_settings(&settings.events.admission())
            .map_err(|reason| ConfigError::invalid("EVENTS__API_KEYS_FILE", reason))?;
        let notifiers = Access::from_settings(&settings.accounts.admission())
            .map_err(|reason| ConfigError::invalid("ACCOUNTS__API_KEYS_FILE", reason))?;
        Db::check(&settings.database)?;
        Redis::check(&settings.redis)?;
        Ok(Self {
            tls,
            access,
            subscribers,
            notifiers,
        })
    }
}

mod lease;
mod ports;
mod reflection;

use lease::fleet_lease;
use ports::{HEALTH_MAX_MESSAGE, serve_health, serve_metrics};

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
    /// EventService and who may subscribe, when served.
    events: Option<(Arc<Events>, Arc<Access>)>,
    /// Who may start account flows, when AccountService is served.
    notifiers: Option<Arc<Access>>,
}

impl Application {
    /// Binds `GRPC__ADDR` and builds everything.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let judged = Judged::from_settings(&settings)?;
        let listener = TcpListener::bind(settings.grpc.addr)
            .await
            .with_context(|| format!("cannot listen on GRPC__ADDR={}", settings.grpc.addr))?;
        Self::build_judged(settings, listener, judged).await
    }

    /// Builds on a listener the caller bound (tests bind `127.0.0.1:0`).
    pub async fn build_with_listener(
        settings: Settings,
        listener: TcpListener,
    ) -> anyhow::Result<Self> {
        let judged = Judged::from_settings(&settings)?;
        Self::build_judged(settings, listener, judged).await
    }

    async fn build_judged(
        settings: Settings,
        listener: TcpListener,
        Judged {
            tls,
            access,
            subscribers,
            notifiers,
        }: Judged,
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
        let jwt = Arc::new(JwtKeys::new(
            db.clone(),
            clock.clone(),
            settings.jwt.clone(),
        ));
        jwt.refresh().await.map_err(|e| {
            anyhow::anyhow!("cannot load the JWT signing keys from PostgreSQL: {e}")
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
            jwt,
            unknown: Arc::new(UnknownLookups::new(&settings.rate_limit, metrics.clone())),
            flows: FlowLimits::from(&settings.accounts),
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
        let admin = match access {
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
        let events = subscribers.map(|access| {
            let events = Events::new(
                db.clone(),
                local.clone(),
                settings.events.clone(),
                crate::store::in_flight(settings.database.query_timeout),
                metrics.clone(),
            );
            (Arc::new(events), Arc::new(access))
        });
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
            events,
            notifiers: notifiers.map(Arc::new),
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
        let streams = CancellationToken::new();
        let mut jobs = Jobs {
            auth: self.auth.clone(),
            follower: self.follower.clone(),
            redis: self.redis.clone(),
            db: self.db.clone(),
            health: health.clone(),
            clock: self.clock.clone(),
            metrics: self.metrics.clone(),
            reload_tls: self.tls.clone().map(|tls| {
                let reload: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
                    tls.reload();
                });
                reload
            }),
            admin: self.admin.clone(),
            access_lists: [
                (
                    self.events.as_ref().map(|(_, access)| access.clone()),
                    self.settings.events.reload_interval,
                ),
                (
                    self.notifiers.clone(),
                    self.settings.accounts.reload_interval,
                ),
            ]
            .into_iter()
            .filter_map(|(access, every)| Some((access?, every)))
            .collect(),
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
                self.auth.clone(),
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
        let (ext_authz, ext_authz_off) = or_disabled(
            self.settings.ext_authz.enabled.then(|| {
                let ext_authz = self.settings.ext_authz.clone();
                let max = ext_authz.max_request_size;
                AuthorizationServer::new(ExtAuthzGrpc::new(self.auth.clone(), ext_authz), max)
            }),
            "envoy.service.auth.v3.Authorization is not served by this instance: it is when \
             EXT_AUTHZ__ENABLED=true",
        );
        let (admin, admin_off) = or_disabled(
            self.admin.clone().map(|admin| {
                AdminServiceServer::new(AdminGrpc::new(admin, self.profiles.clone()))
                    .max_decoding_message_size(max)
            }),
            "authd.v1.AdminService is not served by this instance: it is when \
             ADMIN__ALLOWED_CLIENTS or ADMIN__API_KEYS_FILE is set",
        );
        let (events, events_off) = or_disabled(
            self.events.clone().map(|(events, access)| {
                let grpc = EventsGrpc::new(events, access, streams.clone());
                EventServiceServer::new(grpc).max_decoding_message_size(max)
            }),
            "authd.v1.EventService is not served by this instance: it is when \
             EVENTS__ALLOWED_CLIENTS or EVENTS__API_KEYS_FILE is set",
        );
        let (accounts, accounts_off) = or_disabled(
            self.notifiers.clone().map(|notifiers| {
                AccountServiceServer::new(AccountGrpc::new(self.auth.clone(), notifiers))
                    .max_decoding_message_size(max)
            }),
            "authd.v1.AccountService is not served by this instance: it is when \
             ACCOUNTS__ALLOWED_CLIENTS or ACCOUNTS__API_KEYS_FILE is set",
        );
        let served = reflection::served(reflection::Optional {
            ext_authz: ext_authz.is_some(),
            admin: admin.is_some(),
            events: events.is_some(),
            accounts: accounts.is_some(),
        });
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
                    .then(|| reflection::reflection(&served).build_v1())
                    .transpose()?
                    .map(|r| r.max_decoding_message_size(max)),
            )
            .add_optional_service(
                reflection_on
                    .then(|| reflection::reflection(&served).build_v1alpha())
                    .transpose()?
                    .map(|r| r.max_decoding_message_size(max)),
            )
            .add_service(
                AuthServiceServer::new(AuthGrpc::new(self.auth.clone(), self.profiles.clone()))
                    .max_decoding_message_size(max),
            )
            .add_service(
                ProfileServiceServer::new(ProfileGrpc::new(self.profiles.clone()))
                    .max_decoding_message_size(max),
            )
            .add_optional_service(ext_authz)
            .add_optional_service(ext_authz_off)
            .add_optional_service(admin)
            .add_optional_service(admin_off)
            .add_optional_service(events)
            .add_optional_service(events_off)
            .add_optional_service(accounts)
            .add_optional_service(accounts_off);
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
        // Event streams end at once (UNAVAILABLE): their subscribers go to another instance.
        streams.cancel();
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

/// After the drain, how long background jobs and the pools may take to close.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection lives at most this long (then it is closed gracefully; clients reconnect).
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);
/// HTTP/2 pings on idle connections, and how long an answer may take.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
