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
mod generation;
mod profile_cache;
mod rate_limit;
mod session_store;
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
    interfaces::ClientLike,
    prelude::{Builder, Config, ReconnectPolicy},
    types::config::{TcpConfig, UnresponsiveConfig},
};
use secrecy::ExposeSecret;
use tokio::sync::Notify;

pub use generation::Fingerprint;
pub use profile_cache::{CachedProfile, ProfileCache, ProfileWrite};
pub use rate_limit::{Bucket, RateLimiter};
pub use session_store::{Cached, Lease, SessionStore};

use crate::{config::RedisSettings, metrics::Metrics};
use generation::Latch;

/// Kinds of keys; with the schema version they form `<prefix><kind>:v2:<id>`. v2: every value
/// carries its generation.
const SCHEMA_VERSION: &str = "v2";

#[derive(Clone)]
pub struct Redis {
    inner: Option<Arc<Inner>>,
    metrics: Arc<Metrics>,
}

struct Inner {
    pool: Pool,
    /// One per pooled client, in the same order.
    latches: Vec<Latch>,
    next: AtomicUsize,
    prefix: String,
    /// Whether the last command succeeded; flips are logged, so an outage is logged once.
    healthy: AtomicBool,
    /// Count of failed commands. A failure may have been a lost tombstone, so cached copies are
    /// not trusted again until a drain of the invalidation queue that started after the last
    /// failure has completed (`trusted_through` caught up).
    failures: AtomicU64,
    trusted_through: AtomicU64,
    /// The generation established for the servers the pool talks to; 0 while none is.
    generation: AtomicU64,
    /// The identity that generation was established for.
    fingerprint: std::sync::Mutex<Option<Fingerprint>>,
    /// Woken by every reconnection and topology change (and by the read path when it finds no
    /// generation), so the generation job runs at once.
    changed: Arc<Notify>,
    /// Test hook: runs when the generation job is about to react to an event.
    establish_hook: std::sync::OnceLock<Hook>,
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
        let mut config = Config::from_url(settings.url.expose_secret())?;
        config.fail_fast = false;
        let max_delay = u32::try_from(settings.reconnect_max_delay.as_millis()).unwrap_or(u32::MAX);
        let pool = Builder::from_config(config)
            .with_performance_config(|p| p.default_command_timeout = settings.command_timeout)
            .with_connection_config(|c| {
                c.connection_timeout = settings.connect_timeout;
                c.internal_command_timeout = settings.connect_timeout;
                c.max_command_attempts = 1;
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
            .build_pool(settings.pool_size)?;
        // Subscribed before connecting: the first connection is an event like any other.
        let changed = Arc::new(Notify::new());
        let latches = pool
            .clients()
            .iter()
            .map(|client| Latch::new(client, &changed))
            .collect();
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
        Ok(Self {
            inner: Some(Arc::new(Inner {
                pool,
                latches,
                next: AtomicUsize::new(0),
                prefix: settings.key_prefix.clone(),
                healthy: AtomicBool::new(connected),
                failures: AtomicU64::new(0),
                trusted_through: AtomicU64::new(0),
                generation: AtomicU64::new(0),
                fingerprint: std::sync::Mutex::new(None),
                changed,
                establish_hook: std::sync::OnceLock::new(),
            })),
            metrics,
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub async fn quit(&self) {
        if let Some(inner) = &self.inner {
            let _ = inner.pool.quit().await;
        }
    }

    /// `<prefix><kind>:v2:<id>`
    fn key(&self, kind: &str, id: &str) -> Option<String> {
        let inner = self.inner.as_ref()?;
        Some(format!("{}{kind}:{SCHEMA_VERSION}:{id}", inner.prefix))
    }

    fn inner(&self) -> Option<&Inner> {
        self.inner.as_deref()
    }

    /// A connected client, or `None` when Redis is disabled or no connection is up: callers then
    /// fall back at once instead of queueing behind a reconnection. Commands sent on it are
    /// bounded by `REDIS__COMMAND_TIMEOUT` and never re-sent (`max_command_attempts = 1`).
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
                    self.metrics.redis_up.set(1);
                    tracing::info!("redis is reachable again; using the cache");
                }
                Some(value)
            }
            Err(error) => {
                inner.failures.fetch_add(1, Ordering::AcqRel);
                let kind = match error.kind() {
                    fred::error::ErrorKind::Timeout => "timeout",
                    fred::error::ErrorKind::IO | fred::error::ErrorKind::Canceled => "disconnected",
                    _ => "error",
                };
                self.metrics.redis_errors.with_label_values(&[kind]).inc();
                if inner.healthy.swap(false, Ordering::Relaxed) {
                    self.metrics.redis_up.set(0);
                    tracing::warn!(%error, "redis is unreachable; serving from PostgreSQL until it returns");
                } else {
                    tracing::debug!(%error, "redis command failed");
                }
                None
            }
        }
    }
}

impl Redis {
    /// Where the failure count stands now; pass it to [`Redis::trust`] once every invalidation
    /// queued before this moment has reached Redis.
    pub fn failure_mark(&self) -> u64 {
        self.inner()
            .map_or(0, |i| i.failures.load(Ordering::Acquire))
    }

    pub fn trust(&self, mark: u64) {
        if let Some(inner) = self.inner() {
            inner.trusted_through.fetch_max(mark, Ordering::AcqRel);
        }
    }

    /// The generation whose copies may be served *now*: `None` when Redis is disabled, when no
    /// generation is established for the servers currently connected (a reconnection or topology
    /// change not yet looked at), or when a command failed since the last complete drain of the
    /// invalidation queue. Call it after the reply whose value is to be judged.
    pub fn serving_generation(&self) -> Option<u64> {
        let inner = self.inner()?;
        let generation = inner.generation.load(Ordering::SeqCst);
        if generation == 0 || inner.latches.iter().any(Latch::tripped) {
            inner.changed.notify_one();
            return None;
        }
        let failures = inner.failures.load(Ordering::Acquire);
        (inner.trusted_through.load(Ordering::Acquire) >= failures).then_some(generation)
    }

    /// The established generation, trusted or not (fills carry it; 0 when none).
    fn write_generation(&self) -> u64 {
        self.inner()
            .map_or(0, |i| i.generation.load(Ordering::SeqCst))
    }
}
