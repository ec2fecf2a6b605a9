//! Redis: one client pool built once, and the stores built on it.
//!
//! Redis only ever holds copies of PostgreSQL state, so every failure here is survivable: a
//! command that fails or times out is treated as a miss and the request goes to PostgreSQL.
//! "Disabled" is a real mode of [`Redis`] (no client at all), not a branch in each caller.
mod profile_cache;
mod rate_limit;
mod session_store;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use fred::{
    clients::Pool,
    interfaces::ClientLike,
    prelude::{Builder, Config, ReconnectPolicy},
    types::config::{TcpConfig, UnresponsiveConfig},
};
use secrecy::ExposeSecret;

pub use profile_cache::{CachedProfile, Entry, ProfileCache};
pub use rate_limit::{Bucket, RateLimiter};
pub use session_store::{Cached, SessionStore};

use crate::{config::RedisSettings, metrics::Metrics};

/// Kinds of keys; with the schema version they form `<prefix><kind>:v1:<id>`.
const SCHEMA_VERSION: &str = "v1";

#[derive(Clone)]
pub struct Redis {
    inner: Option<Arc<Inner>>,
    metrics: Arc<Metrics>,
}

struct Inner {
    pool: Pool,
    prefix: String,
    /// Whether the last command succeeded; flips are logged, so an outage is logged once.
    healthy: AtomicBool,
    /// Count of failed commands. A failure may have been a lost tombstone, so cached copies are
    /// not trusted again until a drain of the invalidation queue that started after the last
    /// failure has completed (`trusted_through` caught up).
    failures: AtomicU64,
    trusted_through: AtomicU64,
}

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
        pool.prefer_connected(true);
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
                prefix: settings.key_prefix.clone(),
                healthy: AtomicBool::new(connected),
                failures: AtomicU64::new(0),
                trusted_through: AtomicU64::new(0),
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

    /// `<prefix><kind>:v1:<id>`
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
    fn connected(&self) -> Option<&fred::clients::Client> {
        let client = self.inner()?.pool.next_connected();
        if client.is_connected() {
            return Some(client);
        }
        let down = fred::error::Error::new(fred::error::ErrorKind::IO, "no connection to redis");
        self.observe::<()>(Err(down));
        None
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

    /// Whether cached copies may be served: no command failed since the last complete drain.
    pub fn trusted(&self) -> bool {
        self.inner().is_none_or(|i| {
            i.trusted_through.load(Ordering::Acquire) >= i.failures.load(Ordering::Acquire)
        })
    }
}
