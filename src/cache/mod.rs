//! Redis: one client pool built once, and the stores built on it.
//!
//! Redis only ever holds copies of PostgreSQL state, so every failure here is survivable: a
//! command that fails or times out is treated as a miss and the request goes to PostgreSQL.
//! "Disabled" is a real mode of [`Redis`] (no client at all), not a branch in each caller.
//!
//! # When a cached copy may be served
//!
//! Redis may forget: FLUSHALL, a restart (empty, or from an old snapshot), a failover to a replica
//! that missed writes. Tombstones and newer profile versions can be lost that way while older
//! copies survive or come back. Three mechanisms keep every copy that is served at least as new as
//! every revocation and update that has returned:
//!
//! 1. **Generations** (see [`generation`]). Every value authd writes starts with the number of
//!    the generation it was written in. A generation names one history of the Redis data: it is
//!    bound, in PostgreSQL, to the identity of the serving Redis processes (run id and replication
//!    id of each primary), which every restart, restore and failover changes. A copy is served only
//!    when its generation is the one this instance has established for the servers it is talking
//!    to *now*: after a reconnection or a cluster topology change nothing is served until the new
//!    identity has been bound to a generation, and copies of older generations are ignored
//!    forever. The check is synchronous: the events fred broadcasts before it uses a new
//!    connection are looked at after every reply (see [`Latch`]).
//! 2. **Fill leases.** A copy read from PostgreSQL is written to Redis only under a lease taken
//!    *before* the PostgreSQL read (compare-and-set on the lease value). A revocation or update
//!    replaces the lease, and FLUSHALL or a restart deletes it, so a fill that raced either can
//!    never write the state it read.
//! 3. **Gen-less invalidation.** Tombstones are authoritative in any generation (a revoked session
//!    never comes back), and profile updates lower nothing: they replace older versions in
//!    whatever generation the key holds. Revocations therefore never depend on knowing the
//!    generation.
//!
//! FLUSHALL needs no new generation: it deletes copies and tombstones together, and leases stop
//! the fills that were in flight.
mod applied;
mod connect;
mod generation;
mod profile_cache;
mod rate_limit;
mod sentinel;
mod session_store;
mod trust;
mod values;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use fred::{
    clients::{Client, Pool},
    interfaces::{ClientLike, EventInterface},
    prelude::{Builder, ReconnectPolicy},
    types::config::{TcpConfig, UnresponsiveConfig},
};
use tokio::sync::Notify;

pub use applied::{Announcement, Log};
pub use connect::{Deployment, Invalid, fred_config, normalize_url};
pub use generation::Fingerprint;
pub use profile_cache::{CachedProfile, ProfileCache, ProfileWrite};
pub use rate_limit::{Bucket, RateLimiter};
pub use session_store::{Cached, Lease, SessionStore};

use crate::{
    config::{ConfigError, RedisSettings},
    metrics::Metrics,
};
use generation::Latch;

/// The Redis commands authd sends (scripts' own calls included), as an ACL rule: an ACL user
/// with `~<prefix>* ` followed by this needs nothing more.
pub const ACL_COMMANDS: &str = "+get +set +mget +del +sadd +srem +expire +time +evalsha \
     +script|load +info +ping +role +cluster|slots +asking +select +client|setname +client|id \
     +publish +subscribe +unsubscribe";

/// Kinds of keys; with the schema version they form `<prefix><kind>:v2:<id>`. v2: every value
/// carries its generation.
const SCHEMA_VERSION: &str = "v2";

/// Where the follower applies the logs: the key namespace of one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// `<prefix><schema>|<generation>`: the cursor's name in PostgreSQL.
    pub name: String,
    pub generation: u64,
    /// When it was read (see [`Stamp`]).
    pub stamp: Stamp,
}

/// The generation established when a batch of writes began, and the count of establishments
/// and history changes then: writes made under a stamp reached the servers of its generation
/// only if the stamp is still [`Redis::settled`] once they are done (no reconnection, no
/// establishment — not even one that came back to the same generation — in between).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub generation: u64,
    epoch: u64,
}

#[derive(Clone)]
pub struct Redis {
    inner: Option<Arc<Inner>>,
    metrics: Arc<Metrics>,
}

struct Inner {
    pool: Pool,
    deployment: Deployment,
    /// One per pooled client, in the same order.
    latches: Vec<Latch>,
    next: AtomicUsize,
    prefix: String,
    /// Whether the last command succeeded; flips are logged, so an outage is logged once.
    healthy: AtomicBool,
    /// When Redis was last found usable again: for [`SETTLING`] after, a failure is the pool's
    /// other connections still reconnecting, not a new outage (not logged, `authd_redis_up`
    /// stays 1).
    recovered: std::sync::Mutex<Option<std::time::Instant>>,
    /// Keys whose invalidation (tombstone, profile version) this instance failed to write: each
    /// may hold a stale copy, so this instance serves none of them until a later write of that
    /// key succeeds (the outbox follower retries every pass). Past [`PENDING_MAX`] keys, nothing
    /// at all is served until a complete pass.
    pending: std::sync::Mutex<std::collections::HashSet<String>>,
    pending_len: AtomicUsize,
    /// Set when `pending` overflowed: copies wait for a complete pass that started after it
    /// (a pass's start mark, compared with this counter).
    overflows: AtomicU64,
    trusted_through: AtomicU64,
    /// Cached copies (in Redis and in memory) are served only until this instant
    /// ([`crate::clock::boot_us`]): one `SESSION__INVALIDATION_INTERVAL` plus one
    /// `REDIS__COMMAND_TIMEOUT` after the start of the last complete pass over the logs. An
    /// instance that cannot read them (PostgreSQL out of reach) stops serving copies, since it
    /// cannot know what was revoked meanwhile.
    trusted_until: AtomicU64,
    /// Where this instance's namespace stands in the session log (µs since the Unix epoch; 0
    /// while unknown): every invalidation logged before it has reached this cache.
    log_position: std::sync::atomic::AtomicI64,
    /// The generation established for the servers the pool talks to; 0 while none is.
    generation: AtomicU64,
    /// The identity that generation was established for.
    fingerprint: std::sync::Mutex<Option<Fingerprint>>,
    /// The last generation established (kept while none is), to tell a change from the first.
    last_generation: AtomicU64,
    /// Bumped by every establishment and history change (see [`Stamp`]).
    epoch: AtomicU64,
    /// Woken when a new generation is adopted (the follower passes in it at once).
    adopted: Notify,
    /// When a failure to read the servers' identity was last logged (ms since [`EPOCH`]).
    identity_warned: AtomicU64,
    /// Woken by every reconnection and topology change (and by the read path when it finds no
    /// generation), so the generation job runs at once.
    changed: Arc<Notify>,
    /// Test hook: runs when the generation job is about to react to an event.
    establish_hook: std::sync::OnceLock<Hook>,
    /// Log rows already applied to this cache (see [`applied`]).
    applied: applied::Registry,
    /// With Sentinel: who to ask which server is the primary (see [`sentinel`]).
    sentinels: Option<sentinel::Sentinels>,
    /// The subscribers' clients ([`Redis::new_client`]), moved with the pool's.
    subscribers: std::sync::Mutex<Vec<Client>>,
}

/// A test hook (see [`Redis::set_establish_hook`]).
pub type Hook = Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

impl Redis {
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        metrics.redis_up.set(0);
        Self {
            inner: None,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// What only fred can judge of `REDIS__*` (the URL, TLS files, Sentinel and Cluster
    /// settings), naming the setting; nothing when Redis is off. Startup runs it before anything
    /// connects, so that a wrong one stops it (exit 2).
    pub fn check(settings: &RedisSettings) -> Result<(), ConfigError> {
        if settings.enabled {
            fred_config(settings)?;
        }
        Ok(())
    }

    /// Builds the pool and connects, waiting at most `REDIS__CONNECT_TIMEOUT`. The service does
    /// not need Redis to start: while it is unreachable every command fails fast and requests use
    /// PostgreSQL; the reconnect policy never gives up, so Redis is used as soon as it is back.
    pub async fn connect(
        settings: &RedisSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, fred::error::Error> {
        if !settings.enabled {
            return Ok(Self::disabled(metrics));
        }
        let (mut config, deployment) = fred_config(settings).map_err(|e| {
            fred::error::Error::new(
                fred::error::ErrorKind::Config,
                format!("{} {}", e.setting, e.reason),
            )
        })?;
        config.fail_fast = false;
        let sentinels = sentinel::Sentinels::new(&config, settings.command_timeout);
        let max_delay = u32::try_from(settings.reconnect_max_delay.as_millis()).unwrap_or(u32::MAX);
        let builder = Builder::from_config(config)
            .with_performance_config(|p| p.default_command_timeout = settings.command_timeout)
            .with_connection_config(|c| {
                c.connection_timeout = settings.connect_timeout;
                c.internal_command_timeout = settings.connect_timeout;
                // More than one: fred follows a cluster's ASK redirection with an attempt of its
                // own (with one, its router gives up for good). Every write authd makes may run
                // twice harmlessly (a lease taken twice is refused the second time; a rate-limit
                // attempt counted twice errs on the safe side).
                c.max_command_attempts = 3;
                c.unresponsive = UnresponsiveConfig {
                    max_timeout: Some(settings.command_timeout.max(Duration::from_millis(500)) * 4),
                    interval: Duration::from_millis(500),
                };
                c.tcp = TcpConfig {
                    nodelay: Some(true),
                    ..TcpConfig::default()
                };
            })
            .set_policy(ReconnectPolicy::new_exponential(
                0,
                50,
                max_delay.max(50),
                2,
            ))
            .to_owned();
        let pool = builder.build_pool(settings.pool_size)?;
        // Subscribed before connecting: the first connection is an event like any other.
        let changed = Arc::new(Notify::new());
        let latches = pool
            .clients()
            .iter()
            .map(|client| Latch::new(client, &changed))
            .collect();
        let explain = Arc::new(std::sync::Mutex::new(None));
        let sentinel = deployment == Deployment::Sentinel;
        for client in pool.clients() {
            let explain = explain.clone();
            client.on_error(move |(error, _)| {
                explain_connection_error(&explain, &error, sentinel);
                async { Ok(()) }
            });
        }
        drop(pool.connect());
        let connected =
            tokio::time::timeout(settings.connect_timeout, pool.wait_for_connect()).await;
        let connected = matches!(connected, Ok(Ok(())));
        if !connected {
            tracing::warn!(
                "redis is unreachable at startup; serving from PostgreSQL until it is back"
            );
        }
        metrics.redis_up.set(i64::from(connected));
        metrics.redis_enabled.set(1);
        Ok(Self {
            inner: Some(Arc::new(Inner {
                pool,
                deployment,
                latches,
                next: AtomicUsize::new(0),
                prefix: settings.key_prefix.clone(),
                healthy: AtomicBool::new(connected),
                recovered: std::sync::Mutex::new(None),
                pending: std::sync::Mutex::new(std::collections::HashSet::new()),
                pending_len: AtomicUsize::new(0),
                overflows: AtomicU64::new(0),
                trusted_through: AtomicU64::new(0),
                trusted_until: AtomicU64::new(0),
                log_position: std::sync::atomic::AtomicI64::new(0),
                generation: AtomicU64::new(0),
                fingerprint: std::sync::Mutex::new(None),
                last_generation: AtomicU64::new(0),
                epoch: AtomicU64::new(0),
                adopted: Notify::new(),
                identity_warned: AtomicU64::new(0),
                changed,
                establish_hook: std::sync::OnceLock::new(),
                applied: applied::Registry::default(),
                sentinels,
                subscribers: std::sync::Mutex::new(Vec::new()),
            })),
            metrics,
        })
    }

    /// With Sentinel: asks the sentinels which server is the primary now, and reconnects every
    /// client (pooled or subscribed) connected to another (see [`sentinel`]). Called with each
    /// identity check.
    pub async fn follow_sentinels(&self) {
        let Some(inner) = self.inner() else {
            return;
        };
        let Some(sentinels) = &inner.sentinels else {
            return;
        };
        let Some(primary) = sentinels.primary().await else {
            return;
        };
        let (host, port) = (&primary.0, primary.1);
        let subscribers = inner
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let elsewhere: Vec<&Client> = inner
            .pool
            .clients()
            .iter()
            .chain(&subscribers)
            .filter(|client| {
                client.is_connected()
                    && client
                        .active_connections()
                        .iter()
                        .any(|server| *server.host != **host || server.port != port)
            })
            .collect();
        if elsewhere.is_empty() || !sentinels.may_move(&primary) {
            return;
        }
        tracing::warn!(
            clients = elsewhere.len(),
            primary = %format!("{host}:{port}"),
            "the sentinels name another primary: reconnecting to it"
        );
        // At once, and not waited for past a bound: a primary out of this instance's reach
        // must not hold the identity checks (fred goes on reconnecting by itself).
        let reconnections = elsewhere
            .iter()
            .map(|client| tokio::time::timeout(sentinel::MOVE_WAIT, client.force_reconnection()));
        futures::future::join_all(reconnections).await;
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// `<prefix><name>`: the pub/sub channels of the in-process caches live under the prefix.
    pub fn channel(&self, name: &str) -> Option<String> {
        Some(format!("{}{name}", self.inner()?.prefix))
    }

    /// PUBLISH on a connected client; `false` when it could not be sent.
    pub async fn publish(&self, channel: &str, message: String) -> bool {
        use fred::interfaces::PubsubInterface;
        let Some(client) = self.connected() else {
            return false;
        };
        let sent = client.publish::<i64, _, _>(channel, message).await;
        self.observe(sent).is_some()
    }

    /// A new client to the same servers, with the same settings but room for `backlog`
    /// undelivered messages, not yet connected: the in-process caches subscribe on it (a
    /// subscribed connection carries nothing else).
    pub fn new_client(&self, backlog: usize) -> Option<Client> {
        let inner = self.inner()?;
        let base = inner.pool.next();
        let mut performance = base.perf_config();
        performance.broadcast_channel_capacity = backlog;
        let client = Client::new(
            base.client_config(),
            Some(performance),
            Some(base.connection_config().clone()),
            base.client_reconnect_policy(),
        );
        if inner.sentinels.is_some() {
            inner
                .subscribers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(client.clone());
        }
        Some(client)
    }

    pub async fn quit(&self) {
        if let Some(inner) = &self.inner {
            let _ = inner.pool.quit().await;
        }
    }

    /// The deployment `REDIS__URL` names (`None` when disabled).
    pub fn deployment(&self) -> Option<Deployment> {
        self.inner().map(|i| i.deployment)
    }

    /// `<prefix><kind>:v2:<id>`
    fn key(&self, kind: &str, id: &str) -> Option<String> {
        let inner = self.inner.as_ref()?;
        Some(format!("{}{kind}:{SCHEMA_VERSION}:{id}", inner.prefix))
    }

    /// The key the previous release used for the same thing (`<prefix><kind>:v1:<id>`): still
    /// invalidated, for rolling upgrades.
    fn key_v1(&self, kind: &str, id: &str) -> Option<String> {
        let inner = self.inner.as_ref()?;
        Some(format!("{}{kind}:v1:{id}", inner.prefix))
    }

    fn inner(&self) -> Option<&Inner> {
        self.inner.as_deref()
    }

    /// A connected client, or `None` when Redis is disabled or no connection is up: callers then
    /// fall back at once instead of queueing behind a reconnection. Commands sent on it are
    /// bounded by `REDIS__COMMAND_TIMEOUT` and never re-sent (`max_command_attempts = 1`).
    /// The first pooled client that is connected: the same one while it stays connected, so
    /// that state which must live on one server (a rate-limit bucket) is not split between two
    /// during a reconnection.
    fn steady(&self) -> Option<&Client> {
        let found = self
            .inner()?
            .pool
            .clients()
            .iter()
            .find(|c| c.is_connected());
        if found.is_none() {
            let down =
                fred::error::Error::new(fred::error::ErrorKind::IO, "no connection to redis");
            self.observe::<()>(Err(down));
        }
        found
    }

    fn connected(&self) -> Option<&Client> {
        let inner = self.inner()?;
        let clients = inner.pool.clients();
        let start = inner.next.fetch_add(1, Ordering::Relaxed);
        let found = (0..clients.len())
            .map(|i| &clients[(start + i) % clients.len()])
            .find(|c| c.is_connected());
        if found.is_none() {
            let down =
                fred::error::Error::new(fred::error::ErrorKind::IO, "no connection to redis");
            self.observe::<()>(Err(down));
        }
        found
    }

    /// Records the outcome of a command, logging when Redis becomes unusable or usable again.
    fn observe<T>(&self, result: Result<T, fred::error::Error>) -> Option<T> {
        let inner = self.inner()?;
        match result {
            Ok(value) => {
                if !inner.healthy.swap(true, Ordering::Relaxed) {
                    *inner.recovered.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(std::time::Instant::now());
                    self.metrics.redis_up.set(1);
                    tracing::info!("redis is reachable again; using the cache");
                }
                Some(value)
            }
            Err(error) => {
                let kind = match error.kind() {
                    fred::error::ErrorKind::Timeout => "timeout",
                    fred::error::ErrorKind::IO | fred::error::ErrorKind::Canceled => "disconnected",
                    _ => "error",
                };
                self.metrics.redis_errors.with_label_values(&[kind]).inc();
                self.unreachable(&error);
                None
            }
        }
    }

    /// Redis cannot be used (a command failed, or no connection is up): `authd_redis_up` 0,
    /// logged once per outage (a failure while the pool settles after an outage is part of it).
    fn unreachable(&self, error: &fred::error::Error) {
        let Some(inner) = self.inner() else {
            return;
        };
        let settling = inner.healthy.load(Ordering::Relaxed)
            && inner
                .recovered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|at| at.elapsed() < SETTLING);
        if settling {
            tracing::debug!(%error, "redis command failed while the pool reconnects");
        } else if inner.healthy.swap(false, Ordering::Relaxed) {
            self.metrics.redis_up.set(0);
            tracing::warn!(%error, "redis is unreachable; serving from PostgreSQL until it returns");
        } else {
            tracing::debug!(%error, "redis command failed");
        }
    }
}

/// After Redis is found usable again, how long failures are taken for the pool's other
/// connections still reconnecting (the end of the same outage, not a new one).
const SETTLING: std::time::Duration = std::time::Duration::from_secs(2);

/// Logs why connections fail, naming the setting to check for TLS and credential errors; each
/// distinct reason once a minute at most (reconnection retries forever).
fn explain_connection_error(
    last: &std::sync::Mutex<Option<(String, std::time::Instant)>>,
    error: &fred::error::Error,
    sentinel: bool,
) {
    let details = error.details().to_owned();
    let lower = details.to_ascii_lowercase();
    let setting = if matches!(error.kind(), fred::error::ErrorKind::Tls)
        || lower.contains("certificate")
        || lower.contains("tls")
    {
        Some(
            "REDIS__TLS__CA_FILE (and REDIS__TLS__CERT_FILE, REDIS__TLS__KEY_FILE), and that the \
             server certificate names the host in REDIS__URL",
        )
    } else if matches!(error.kind(), fred::error::ErrorKind::Auth)
        || lower.contains("wrongpass")
        || lower.contains("noauth")
        || lower.contains("noperm")
    {
        Some(if sentinel {
            "REDIS__USERNAME and REDIS__PASSWORD (or the credentials in REDIS__URL), and \
             REDIS__SENTINEL__USERNAME and REDIS__SENTINEL__PASSWORD"
        } else {
            "REDIS__USERNAME and REDIS__PASSWORD (or the credentials in REDIS__URL)"
        })
    } else {
        None
    };
    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
    let repeated = last
        .as_ref()
        .is_some_and(|(seen, at)| *seen == details && at.elapsed() < Duration::from_secs(60));
    if repeated {
        return;
    }
    *last = Some((details.clone(), std::time::Instant::now()));
    match setting {
        Some(setting) => tracing::error!(
            error = %details,
            "cannot connect to redis: check {setting}; serving from PostgreSQL meanwhile"
        ),
        None => tracing::warn!(error = %details, "redis connection error; retrying"),
    }
}

/// The origin of the monotonic instants kept in atomics.
static EPOCH: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

fn monotonic_ms(at: std::time::Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*EPOCH).as_millis()).unwrap_or(u64::MAX)
}
