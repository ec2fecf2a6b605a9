//! `REDIS__*`, `PROFILE_CACHE__*`, `LOCAL_CACHE__*`: the shared cache and the in-process one.
use std::{path::PathBuf, time::Duration};

use secrecy::SecretString;
use serde::Deserialize;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    pub enabled: bool,
    /// `redis://`, `rediss://`, `redis-cluster://h1:p1,h2:p2`, `redis-sentinel://s1,s2/?service_name=N`
    /// (and their TLS forms).
    pub url: SecretString,
    /// ACL user name; wins over the URL's.
    pub username: Option<String>,
    /// ACL password; wins over the URL's.
    pub password: Option<SecretString>,
    pub tls: RedisTlsSettings,
    /// Credentials for the sentinels, where they differ from the data nodes'.
    pub sentinel: SentinelSettings,
    /// Every key authd writes starts with this.
    pub key_prefix: String,
    pub pool_size: usize,
    /// Bound on one Redis command; past it the request falls back to PostgreSQL.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Reconnection backs off exponentially up to this delay, and never gives up.
    #[serde(with = "humantime_serde")]
    pub reconnect_max_delay: Duration,
    /// How often the identity of the Redis servers is checked (a restart or failover that no
    /// reconnection revealed still starts a new generation).
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            url: SecretString::from("redis://127.0.0.1:6379"),
            key_prefix: "authd:".to_owned(),
            pool_size: 2,
            command_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(1),
            reconnect_max_delay: Duration::from_secs(2),
            check_interval: Duration::from_secs(1),
            username: None,
            password: None,
            tls: RedisTlsSettings::default(),
            sentinel: SentinelSettings::default(),
        }
    }
}

impl RedisSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let r = self;
        if r.enabled {
            if r.pool_size == 0 {
                return invalid("REDIS__POOL_SIZE", "must be at least 1");
            }
            if r.check_interval.is_zero() {
                return invalid("REDIS__CHECK_INTERVAL", "must be greater than zero");
            }
            if r.command_timeout.is_zero() || r.connect_timeout.is_zero() {
                return invalid(
                    "REDIS__COMMAND_TIMEOUT",
                    "REDIS__COMMAND_TIMEOUT and REDIS__CONNECT_TIMEOUT must be greater than zero",
                );
            }
        }
        if r.key_prefix.is_empty() || r.key_prefix.chars().any(char::is_whitespace) {
            return invalid("REDIS__KEY_PREFIX", "must be non-empty, without spaces");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisTlsSettings {
    /// PEM roots to verify the servers with (otherwise the system's).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain), for servers that ask for one.
    pub cert_file: Option<PathBuf>,
    /// Its PEM private key.
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SentinelSettings {
    pub username: Option<String>,
    pub password: Option<SecretString>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileCacheSettings {
    /// How long a cached profile lives (plus jitter).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long "no such user" is cached, so a stream of bad ids cannot hammer PostgreSQL.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Each TTL is lengthened by a random fraction up to this (0.1 = up to 10%).
    pub jitter: f64,
}

impl Default for ProfileCacheSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(30),
            jitter: 0.1,
        }
    }
}

impl ProfileCacheSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let pc = self;
        if pc.ttl.is_zero() {
            return invalid("PROFILE_CACHE__TTL", "must be greater than zero");
        }
        if pc.negative_ttl.is_zero() {
            return invalid("PROFILE_CACHE__NEGATIVE_TTL", "must be greater than zero");
        }
        if !(0.0..=1.0).contains(&pc.jitter) {
            return invalid("PROFILE_CACHE__JITTER", "must be between 0 and 1");
        }
        Ok(())
    }
}

/// The in-process cache in front of Redis (see `crate::local`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalCacheSettings {
    /// Off by default: it needs Redis pub/sub (`PUBLISH`, `SUBSCRIBE`) and makes every revoking
    /// call wait for the other instances' acknowledgements.
    pub enabled: bool,
    /// Entries kept per kind (validated sessions, profiles).
    pub max_entries: u64,
    /// The longest a revocation or profile update waits for an instance it cannot reach (plus
    /// [`crate::local::RATE_MARGIN`] of it and [`crate::local::FIXED_MARGIN`]).
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

impl Default for LocalCacheSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            max_entries: 100_000,
            lease: Duration::from_secs(3),
        }
    }
}

impl LocalCacheSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let lc = self;
        if !(Duration::from_millis(500)..=Duration::from_secs(60)).contains(&lc.lease) {
            return invalid("LOCAL_CACHE__LEASE", "must be 500ms to 60s");
        }
        if !(1..=10_000_000).contains(&lc.max_entries) {
            return invalid("LOCAL_CACHE__MAX_ENTRIES", "must be 1 to 10000000");
        }
        Ok(())
    }
}
