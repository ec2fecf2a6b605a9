//! Settings: built-in defaults, then an optional TOML file, then environment variables named
//! `SECTION__KEY` (for example `REDIS__ENABLED=false`). Durations are human-readable (`250ms`,
//! `30m`, `7d`). Anything invalid stops startup with a message naming the setting.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Top-level sections; environment variables outside them are ignored.
const SECTIONS: [&str; 13] = [
    "grpc",
    "admin",
    "audit",
    "metrics",
    "health",
    "database",
    "redis",
    "session",
    "auth",
    "rate_limit",
    "profile_cache",
    "local_cache",
    "log",
];

/// Environment variables read verbatim, never parsed (see [`Settings::load`]).
const RAW_SECRETS: [&str; 2] = ["REDIS__PASSWORD", "REDIS__SENTINEL__PASSWORD"];

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct Settings {
    pub grpc: GrpcSettings,
    pub admin: AdminSettings,
    pub audit: AuditSettings,
    pub metrics: MetricsSettings,
    pub health: HealthSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub session: SessionSettings,
    pub auth: AuthSettings,
    pub rate_limit: RateLimitSettings,
    pub profile_cache: ProfileCacheSettings,
    pub local_cache: LocalCacheSettings,
    pub tokens: TokenSettings,
    pub log: LogSettings,
    /// Test-only: pretend this host's clock is off by this many milliseconds (never read from a
    /// file or the environment).
    #[doc(hidden)]
    #[serde(skip)]
    pub test_clock_skew_ms: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcSettings {
    pub addr: SocketAddr,
    /// How long in-flight calls may take to finish after SIGTERM before the server stops anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Largest request message accepted, in bytes (authd's real requests stay under 8 KiB).
    pub max_message_size: usize,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Connections served at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// Connections one client address may hold at once (0: no cap); further ones are closed.
    pub max_connections_per_address: usize,
    /// Bound on one call on the server (it answers CANCELLED past it).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Serve gRPC server reflection (for grpcurl); turn off in production if you prefer.
    pub reflection: bool,
    pub tls: GrpcTlsSettings,
}

/// TLS for the gRPC port: on when a certificate and key are given.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcTlsSettings {
    /// PEM certificate chain of the server.
    pub cert_file: Option<PathBuf>,
    /// Its PEM private key.
    pub key_file: Option<PathBuf>,
    /// PEM roots that client certificates are verified with (mutual TLS); clients are asked for
    /// one when set.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse connections without a valid client certificate (otherwise optional: only
    /// AdminService admission by SAN looks at it).
    pub require_client_cert: bool,
    /// How often the files are checked for changes (a changed file is loaded for new
    /// connections; open ones keep theirs).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl GrpcTlsSettings {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some()
    }
}

impl Default for GrpcTlsSettings {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            require_client_cert: false,
            reload_interval: Duration::from_secs(10),
        }
    }
}

/// AdminService: served only when callers can be admitted (see `admin::access`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Comma-separated SANs (URI such as a SPIFFE ID, or DNS name) of client certificates
    /// admitted.
    pub allowed_clients: String,
    /// TOML file of `[[key]]` tables (`name`, `sha256`) of admitted bearer keys.
    pub api_keys_file: Option<PathBuf>,
    /// How often the keys file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl AdminSettings {
    /// The admitted SANs.
    pub fn allowed_clients(&self) -> impl Iterator<Item = &str> {
        self.allowed_clients
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            allowed_clients: String::new(),
            api_keys_file: None,
            reload_interval: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    /// AdminService audit rows are deleted this long after the call.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Serve Prometheus metrics at `http://<addr>/metrics`.
    pub enabled: bool,
    pub addr: SocketAddr,
    /// Connections served at once; others wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections one client address (an IPv6 /64) may hold; past it, closed at once: one
    /// address cannot keep every scraper out.
    pub max_connections_per_address: usize,
    /// A request's headers must arrive within this, or the connection is closed (slowloris).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthSettings {
    /// PostgreSQL unreachable for longer than this turns health NOT_SERVING (until it answers).
    #[serde(with = "humantime_serde")]
    pub db_grace: Duration,
    /// How often PostgreSQL is pinged for health.
    #[serde(with = "humantime_serde")]
    pub db_check_interval: Duration,
    /// A plaintext listener serving `grpc.health.v1` alone (for Kubernetes probes, which cannot
    /// speak TLS); none when unset.
    pub addr: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: SecretString,
    pub max_connections: u32,
    pub min_connections: u32,
    /// Waiting for a pooled connection longer than this answers UNAVAILABLE: kept well under any
    /// caller's deadline so an outage fails fast instead of queueing.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Server-side `statement_timeout`, and the client-side bound on one store operation.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// Create the database at startup when it does not exist.
    pub create_if_missing: bool,
    /// Run the embedded migrations at startup.
    pub migrate: bool,
    pub shares: PoolShares,
}

/// A class of PostgreSQL work, with a share of the pool of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Share {
    /// Reads any caller can ask for without proving anything first: ValidateSession,
    /// GetProfile, BatchGetProfiles.
    Lookups,
    /// Login and Register.
    Logins,
    /// What a session's owner changes: Logout, the revocations, ChangePassword, ListSessions,
    /// UpdateProfile.
    Changes,
    /// AdminService and its audit.
    Admin,
    /// Background jobs (follower, leases, generations, health, purges) and startup.
    Background,
}

impl Share {
    /// Every share, in the order of [`PoolShares::connections`].
    pub const ALL: [Share; 5] = [
        Share::Lookups,
        Share::Logins,
        Share::Changes,
        Share::Admin,
        Share::Background,
    ];

    /// The metrics label (`authd_db_connections{share}`).
    pub fn name(self) -> &'static str {
        match self {
            Share::Lookups => "lookups",
            Share::Logins => "logins",
            Share::Changes => "changes",
            Share::Admin => "admin",
            Share::Background => "background",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The pool's shares (`DATABASE__SHARES__*`), in percent of `DATABASE__MAX_CONNECTIONS`: each
/// class of work has connections of its own (see `store::work`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolShares {
    pub lookups: u32,
    pub logins: u32,
    pub changes: u32,
    pub admin: u32,
    pub background: u32,
}

impl Default for PoolShares {
    fn default() -> Self {
        Self {
            lookups: 30,
            logins: 20,
            changes: 20,
            admin: 10,
            background: 20,
        }
    }
}

impl PoolShares {
    fn percents(&self) -> [(Share, u32); 5] {
        [
            (Share::Lookups, self.lookups),
            (Share::Logins, self.logins),
            (Share::Changes, self.changes),
            (Share::Admin, self.admin),
            (Share::Background, self.background),
        ]
    }

    /// Connections of each share (in [`Share::ALL`]'s order) out of `max`: its percent, rounded
    /// down, at least one.
    pub fn connections(&self, max: u32) -> [u32; 5] {
        self.percents()
            .map(|(_, percent)| (u64::from(max) * u64::from(percent) / 100).max(1) as u32)
    }
}

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
pub struct SessionSettings {
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub absolute_timeout: Duration,
    /// `last_seen_at` is written at most this often per session.
    #[serde(with = "humantime_serde")]
    pub touch_interval: Duration,
    /// How often each instance re-applies revocations whose Redis step failed.
    #[serde(with = "humantime_serde")]
    pub invalidation_interval: Duration,
    /// Active sessions a user may have; a new login beyond it revokes the least recently used.
    pub max_per_user: u32,
    /// Revoked and expired sessions are deleted this long after they ended.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the purge job runs.
    #[serde(with = "humantime_serde")]
    pub purge_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Password hashes computed at once (each takes one core for ~20 ms).
    pub hash_concurrency: usize,
    /// Hash requests allowed to wait for a slot; beyond this, RESOURCE_EXHAUSTED at once.
    pub hash_queue: usize,
    /// Shortest new password, in characters after NFKC normalisation.
    pub password_min_length: usize,
}

/// Brute-force protection. Counts are per fixed window; 0 turns a limit off.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Password guesses per account (from clients it does not trust) in any login window.
    pub login_per_email: u32,
    /// Password checks per client address (an IPv6 /`ipv6_prefix`) in any login window.
    pub login_per_ip: u32,
    #[serde(with = "humantime_serde")]
    pub login_window: Duration,
    /// Registrations per client address in any register window.
    pub register_per_ip: u32,
    #[serde(with = "humantime_serde")]
    pub register_window: Duration,
    /// Consecutive wrong passwords after which an account refuses clients it does not trust
    /// (0: no such cap).
    pub max_failed_logins: u32,
    /// IPv6 addresses are counted per network of this prefix length.
    pub ipv6_prefix: u8,
    /// How long a client (device, or address) that signed in stays trusted by the account.
    #[serde(with = "humantime_serde")]
    pub trusted_client_ttl: Duration,
    /// PostgreSQL lookups that found nothing (a token of an earlier release, an unknown profile
    /// id) per caller address in any unknown-lookups window (0: no limit).
    pub unknown_lookups_per_ip: u32,
    #[serde(with = "humantime_serde")]
    pub unknown_lookups_window: Duration,
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

/// Session tokens' signing keys (see `auth::keys`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenSettings {
    /// A new signing key this often (each verifies its tokens for their whole life).
    #[serde(with = "humantime_serde")]
    pub key_rotation: Duration,
    /// Tokens of an earlier release (without a key id) are refused from then on, even if their
    /// session is live; by default they are accepted for as long as one is.
    pub legacy_until: Option<chrono::DateTime<chrono::Utc>>,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            key_rotation: Duration::from_secs(30 * 24 * 3600),
            legacy_until: None,
        }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing filter (`info`, `authd=debug,sqlx=warn`); `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for GrpcSettings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 50051)),
            shutdown_grace: Duration::from_secs(20),
            max_message_size: 16 * 1024,
            max_concurrent_streams: 100,
            max_connections: 1024,
            max_connections_per_address: 256,
            request_timeout: Duration::from_secs(10),
            reflection: true,
            tls: GrpcTlsSettings::default(),
        }
    }
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            addr: SocketAddr::from(([0, 0, 0, 0], 9090)),
            max_connections: 16,
            max_connections_per_address: 4,
            header_read_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            db_grace: Duration::from_secs(10),
            db_check_interval: Duration::from_secs(1),
            addr: None,
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("postgres://postgres@127.0.0.1:5432/authd"),
            max_connections: 10,
            min_connections: 1,
            acquire_timeout: Duration::from_secs(1),
            query_timeout: Duration::from_secs(2),
            create_if_missing: true,
            migrate: true,
            shares: PoolShares::default(),
        }
    }
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

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(7 * 24 * 3600),
            absolute_timeout: Duration::from_secs(30 * 24 * 3600),
            touch_interval: Duration::from_secs(5 * 60),
            invalidation_interval: Duration::from_secs(1),
            max_per_user: 50,
            retention: Duration::from_secs(7 * 24 * 3600),
            purge_interval: Duration::from_secs(10 * 60),
        }
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            hash_concurrency: (cores / 2).max(1),
            hash_queue: 32,
            password_min_length: 8,
        }
    }
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            login_per_email: 10,
            login_per_ip: 100,
            login_window: Duration::from_secs(15 * 60),
            register_per_ip: 20,
            register_window: Duration::from_secs(3600),
            max_failed_logins: 100,
            ipv6_prefix: 64,
            trusted_client_ttl: Duration::from_secs(30 * 24 * 3600),
            unknown_lookups_per_ip: 20,
            unknown_lookups_window: Duration::from_secs(10),
        }
    }
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

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid setting {setting}: {reason}")]
    Invalid { setting: String, reason: String },
}

impl ConfigError {
    /// A setting that cannot be used as given (`authd` then exits with status 2).
    pub fn invalid(setting: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            setting: setting.to_owned(),
            reason: reason.into(),
        }
    }

    /// Names the setting the way operators write it (`REDIS__ENABLED`), whatever layer it came from.
    fn from_figment(error: figment::Error) -> Self {
        let file = error
            .metadata
            .as_ref()
            .and_then(|m| m.source.as_ref())
            .and_then(figment::Source::file_path)
            .map(Path::to_path_buf);
        let setting = match (error.path.is_empty(), &file) {
            (false, _) => error.path.join("__").to_ascii_uppercase(),
            (true, Some(_)) => "--config".to_owned(),
            (true, None) => "(configuration)".to_owned(),
        };
        let source = match (&file, error.metadata.as_ref()) {
            (Some(path), _) => format!(" (from {})", path.display()),
            (None, Some(m)) => format!(" (from {})", m.name),
            (None, None) => String::new(),
        };
        // One line: a TOML syntax error comes with a multi-line excerpt of the file.
        let reason = format!("{}{source}", error.kind);
        Self::invalid(
            &setting,
            reason.split_whitespace().collect::<Vec<_>>().join(" "),
        )
    }
}

/// figment 0.10 reads a quoted string in an environment value (`"…"`, also inside `[…]` or
/// `{…}`) by slicing it at a *character* index where it finds a backslash: after a non-ASCII
/// character that panics or garbles the value. Such a value of one of authd's variables stops
/// startup with its name instead (write it without quotes).
fn unreadable_by_figment() -> Result<(), ConfigError> {
    for (key, value) in std::env::vars_os() {
        let (Some(key), Some(value)) = (key.to_str(), value.to_str()) else {
            continue;
        };
        let ours = key == "DATABASE_URL"
            || SECTIONS.iter().any(|section| {
                key.to_ascii_lowercase()
                    .strip_prefix(section)
                    .is_some_and(|rest| rest.starts_with("__"))
            });
        let upper = key.to_ascii_uppercase();
        if ours
            && !RAW_SECRETS.contains(&upper.as_str())
            && value.contains('"')
            && value.contains('\\')
            && !value.is_ascii()
        {
            return Err(ConfigError::invalid(
                &upper,
                "a value with double quotes, a backslash and non-ASCII characters cannot be \
                 read; write it without the quotes",
            ));
        }
    }
    Ok(())
}

impl Settings {
    /// Defaults, then `file` (when given), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            if let Err(error) = std::fs::File::open(path) {
                return Err(Self::unreadable(path, &error));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        unreadable_by_figment()?;
        let figment = figment
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database.url".into()),
            )
            .merge(
                Env::raw()
                    .filter(|key| {
                        !RAW_SECRETS.contains(&key.as_str().to_ascii_uppercase().as_str())
                            && SECTIONS.iter().any(|section| {
                                key.as_str()
                                    .to_ascii_lowercase()
                                    .strip_prefix(section)
                                    .is_some_and(|rest| rest.starts_with("__"))
                            })
                    })
                    .split("__"),
            );
        let mut settings: Settings = figment.extract().map_err(ConfigError::from_figment)?;
        // Passwords are taken as they are: figment would read `0123` as a number (and print it in
        // its error).
        if let Ok(password) = std::env::var("REDIS__PASSWORD") {
            settings.redis.password = Some(SecretString::from(password));
        }
        if let Ok(password) = std::env::var("REDIS__SENTINEL__PASSWORD") {
            settings.redis.sentinel.password = Some(SecretString::from(password));
        }
        settings.validate()?;
        Ok(settings)
    }

    /// The configuration file named by `--config` cannot be read.
    fn unreadable(path: &Path, error: &std::io::Error) -> ConfigError {
        ConfigError::invalid(
            "--config",
            format!("cannot read {}: {error}", path.display()),
        )
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting, reason: &str| Err(ConfigError::invalid(setting, reason));
        let g = &self.grpc;
        if !(1024..=4 * 1024 * 1024).contains(&g.max_message_size) {
            return invalid("GRPC__MAX_MESSAGE_SIZE", "must be 1024 to 4194304 bytes");
        }
        if g.max_concurrent_streams == 0 {
            return invalid("GRPC__MAX_CONCURRENT_STREAMS", "must be at least 1");
        }
        if g.max_connections == 0 {
            return invalid("GRPC__MAX_CONNECTIONS", "must be at least 1");
        }
        if g.request_timeout < Duration::from_millis(100) {
            return invalid("GRPC__REQUEST_TIMEOUT", "must be at least 100ms");
        }
        let tls = &self.grpc.tls;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return invalid(
                "GRPC__TLS__CERT_FILE",
                "GRPC__TLS__CERT_FILE and GRPC__TLS__KEY_FILE go together",
            );
        }
        if tls.client_ca_file.is_some() && !tls.enabled() {
            return invalid(
                "GRPC__TLS__CLIENT_CA_FILE",
                "needs GRPC__TLS__CERT_FILE and GRPC__TLS__KEY_FILE (TLS on)",
            );
        }
        if tls.require_client_cert && tls.client_ca_file.is_none() {
            return invalid(
                "GRPC__TLS__REQUIRE_CLIENT_CERT",
                "needs GRPC__TLS__CLIENT_CA_FILE (the roots client certificates are checked with)",
            );
        }
        if tls.reload_interval.is_zero() {
            return invalid("GRPC__TLS__RELOAD_INTERVAL", "must be greater than zero");
        }
        if tls.enabled()
            && let Err(e) = crate::grpc::tls::TlsServer::load(tls)
        {
            return Err(ConfigError::invalid(e.setting, e.reason));
        }
        if let Err(reason) = crate::admin::Access::from_settings(&self.admin) {
            return invalid("ADMIN__API_KEYS_FILE", &reason);
        }
        if self.admin.allowed_clients().next().is_some() && tls.client_ca_file.is_none() {
            return invalid(
                "ADMIN__ALLOWED_CLIENTS",
                "admits client certificates: needs GRPC__TLS__CLIENT_CA_FILE (mutual TLS)",
            );
        }
        if self.admin.reload_interval.is_zero() {
            return invalid("ADMIN__RELOAD_INTERVAL", "must be greater than zero");
        }
        if self.audit.retention < Duration::from_secs(86_400) {
            return invalid(
                "AUDIT__RETENTION",
                "must be at least 1d (no audit row younger is ever purged)",
            );
        }
        if self.metrics.max_connections == 0 {
            return invalid("METRICS__MAX_CONNECTIONS", "must be at least 1");
        }
        let per_address = self.metrics.max_connections_per_address;
        if per_address == 0 || per_address > self.metrics.max_connections {
            return invalid(
                "METRICS__MAX_CONNECTIONS_PER_ADDRESS",
                "must be 1 to METRICS__MAX_CONNECTIONS",
            );
        }
        if self.metrics.header_read_timeout.is_zero() {
            return invalid("METRICS__HEADER_READ_TIMEOUT", "must be greater than zero");
        }
        if self.health.db_check_interval.is_zero() {
            return invalid("HEALTH__DB_CHECK_INTERVAL", "must be greater than zero");
        }
        if self.metrics.enabled && self.metrics.addr == self.grpc.addr {
            return invalid("METRICS__ADDR", "must differ from GRPC__ADDR");
        }
        let d = &self.database;
        if !d.url.expose_secret().starts_with("postgres://")
            && !d.url.expose_secret().starts_with("postgresql://")
        {
            return invalid("DATABASE__URL", "must be a postgres:// URL");
        }
        if let Err(reason) = crate::store::tls::check_url(d.url.expose_secret()) {
            return invalid("DATABASE__URL", &reason);
        }
        if d.max_connections < 5 || d.min_connections > d.max_connections {
            return invalid(
                "DATABASE__MAX_CONNECTIONS",
                "must be at least 5 (a connection for each share of the pool) and at least \
                 DATABASE__MIN_CONNECTIONS",
            );
        }
        for (share, percent) in d.shares.percents() {
            if !(1..=100).contains(&percent) {
                let setting = format!("DATABASE__SHARES__{}", share.name().to_uppercase());
                return Err(ConfigError::invalid(
                    &setting,
                    "must be 1 to 100 (percent of DATABASE__MAX_CONNECTIONS)",
                ));
            }
        }
        if d.shares.percents().iter().map(|(_, p)| p).sum::<u32>() > 100 {
            return invalid(
                "DATABASE__SHARES",
                "the shares add up to more than 100 (percent of DATABASE__MAX_CONNECTIONS)",
            );
        }
        let connections: u32 = d.shares.connections(d.max_connections).iter().sum();
        if connections > d.max_connections {
            return invalid(
                "DATABASE__MAX_CONNECTIONS",
                &format!(
                    "is too small for DATABASE__SHARES__*: each share has at least one \
                     connection, {connections} in all"
                ),
            );
        }
        if d.acquire_timeout.is_zero() {
            return invalid("DATABASE__ACQUIRE_TIMEOUT", "must be greater than zero");
        }
        if d.query_timeout < Duration::from_millis(10) {
            return invalid("DATABASE__QUERY_TIMEOUT", "must be at least 10ms");
        }
        let r = &self.redis;
        if r.enabled {
            if let Err(e) = crate::cache::fred_config(r) {
                return Err(ConfigError::invalid(e.setting, e.reason));
            }
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
        let s = &self.session;
        if s.idle_timeout < Duration::from_secs(1) {
            return invalid("SESSION__IDLE_TIMEOUT", "must be at least 1s");
        }
        if s.absolute_timeout < Duration::from_secs(1) {
            return invalid("SESSION__ABSOLUTE_TIMEOUT", "must be at least 1s");
        }
        if s.touch_interval >= s.idle_timeout {
            return invalid(
                "SESSION__TOUCH_INTERVAL",
                "must be shorter than SESSION__IDLE_TIMEOUT",
            );
        }
        if s.invalidation_interval.is_zero() {
            return invalid(
                "SESSION__INVALIDATION_INTERVAL",
                "must be greater than zero",
            );
        }
        if s.max_per_user == 0 {
            return invalid("SESSION__MAX_PER_USER", "must be at least 1");
        }
        if s.purge_interval.is_zero() {
            return invalid("SESSION__PURGE_INTERVAL", "must be greater than zero");
        }
        let rl = &self.rate_limit;
        if rl.login_window.is_zero() {
            return invalid("RATE_LIMIT__LOGIN_WINDOW", "must be greater than zero");
        }
        if rl.unknown_lookups_window.is_zero() {
            return invalid(
                "RATE_LIMIT__UNKNOWN_LOOKUPS_WINDOW",
                "must be greater than zero",
            );
        }
        if self.tokens.key_rotation < Duration::from_secs(3600) {
            return invalid("TOKENS__KEY_ROTATION", "must be at least 1h");
        }
        if rl.register_window.is_zero() {
            return invalid("RATE_LIMIT__REGISTER_WINDOW", "must be greater than zero");
        }
        if !(1..=128).contains(&rl.ipv6_prefix) {
            return invalid("RATE_LIMIT__IPV6_PREFIX", "must be 1 to 128");
        }
        let longest = crate::auth::input::PASSWORD_MAX_CHARS;
        if !(8..=longest).contains(&self.auth.password_min_length) {
            return invalid(
                "AUTH__PASSWORD_MIN_LENGTH",
                &format!("must be 8 to {longest} (NIST SP 800-63B asks for at least 8)"),
            );
        }
        let pc = &self.profile_cache;
        if pc.ttl.is_zero() {
            return invalid("PROFILE_CACHE__TTL", "must be greater than zero");
        }
        if pc.negative_ttl.is_zero() {
            return invalid("PROFILE_CACHE__NEGATIVE_TTL", "must be greater than zero");
        }
        if !(0.0..=1.0).contains(&pc.jitter) {
            return invalid("PROFILE_CACHE__JITTER", "must be between 0 and 1");
        }
        let lc = &self.local_cache;
        if !(Duration::from_millis(500)..=Duration::from_secs(60)).contains(&lc.lease) {
            return invalid("LOCAL_CACHE__LEASE", "must be 500ms to 60s");
        }
        if lc.enabled && lc.lease > crate::clock::covers(self.grpc.request_timeout) {
            return invalid(
                "LOCAL_CACHE__LEASE",
                "must leave GRPC__REQUEST_TIMEOUT room: a revoking call may wait for a lease \
                 (plus 1% and 100ms) and needs a second more",
            );
        }
        if !(1..=10_000_000).contains(&lc.max_entries) {
            return invalid("LOCAL_CACHE__MAX_ENTRIES", "must be 1 to 10000000");
        }
        if lc.enabled && !self.redis.enabled {
            return invalid(
                "LOCAL_CACHE__ENABLED",
                "needs Redis (REDIS__ENABLED=true): invalidations travel over Redis pub/sub",
            );
        }
        if self.auth.hash_concurrency == 0 {
            return invalid("AUTH__HASH_CONCURRENCY", "must be at least 1");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return invalid("LOG__LEVEL", "must be a tracing filter such as `info`");
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return its large error type
mod tests {
    use figment::Jail;

    use super::*;

    fn load_err(jail: &mut Jail, key: &str, value: &str) -> String {
        jail.set_env(key, value);
        let error = match Settings::load(None) {
            Ok(_) => panic!("{key}={value} was accepted"),
            Err(e) => e.to_string(),
        };
        jail.clear_env();
        error
    }

    #[test]
    fn defaults_work_on_a_developer_machine() {
        Jail::expect_with(|_| {
            let s = Settings::load(None).unwrap();
            assert_eq!(s.grpc.addr, "0.0.0.0:50051".parse().unwrap());
            assert_eq!(
                s.database.url.expose_secret(),
                "postgres://postgres@127.0.0.1:5432/authd"
            );
            assert!(s.redis.enabled);
            assert_eq!(s.redis.key_prefix, "authd:");
            assert_eq!(s.session.idle_timeout, Duration::from_secs(7 * 86400));
            assert_eq!(s.session.absolute_timeout, Duration::from_secs(30 * 86400));
            assert_eq!(s.session.touch_interval, Duration::from_secs(300));
            assert!(s.auth.hash_concurrency >= 1);
            Ok(())
        });
    }

    #[test]
    fn file_then_environment_override_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "authd.toml",
                "[redis]\nenabled = false\nkey_prefix = \"file:\"\n[session]\nidle_timeout = \"1h\"\n",
            )?;
            jail.set_env("SESSION__IDLE_TIMEOUT", "30m");
            jail.set_env("GRPC__ADDR", "127.0.0.1:6000");
            let s = Settings::load(Some(Path::new("authd.toml"))).unwrap();
            assert!(!s.redis.enabled);
            assert_eq!(s.redis.key_prefix, "file:");
            assert_eq!(s.session.idle_timeout, Duration::from_secs(1800));
            assert_eq!(s.grpc.addr, "127.0.0.1:6000".parse().unwrap());
            Ok(())
        });
    }

    #[test]
    fn database_url_is_honoured_below_the_sectioned_name() {
        Jail::expect_with(|jail| {
            jail.set_env("DATABASE_URL", "postgres://a@h/x");
            let s = Settings::load(None).unwrap();
            assert_eq!(s.database.url.expose_secret(), "postgres://a@h/x");
            jail.set_env("DATABASE__URL", "postgres://b@h/y");
            let s = Settings::load(None).unwrap();
            assert_eq!(s.database.url.expose_secret(), "postgres://b@h/y");
            Ok(())
        });
    }

    #[test]
    fn invalid_settings_are_named() {
        Jail::expect_with(|jail| {
            for (key, value) in [
                ("REDIS__ENABLED", "maybe"),
                ("SESSION__IDLE_TIMEOUT", "soon"),
                ("SESSION__TOUCH_INTERVAL", "8d"),
                ("DATABASE__MAX_CONNECTIONS", "0"),
                ("DATABASE__URL", "mysql://x"),
                ("REDIS__URL", "http://x"),
                ("REDIS__KEY_PREFIX", "has space"),
                ("AUTH__HASH_CONCURRENCY", "0"),
                ("REDIS__NO_SUCH_SETTING", "1"),
                ("LOG__FORMAT", "xml"),
            ] {
                let error = load_err(jail, key, value);
                assert!(error.contains(key), "{key}={value}: {error}");
            }
            Ok(())
        });
    }

    #[test]
    fn local_cache_settings_are_checked_together() {
        Jail::expect_with(|jail| {
            for (key, value) in [
                ("LOCAL_CACHE__LEASE", "100ms"),
                ("LOCAL_CACHE__LEASE", "2m"),
                ("LOCAL_CACHE__MAX_ENTRIES", "0"),
            ] {
                let error = load_err(jail, key, value);
                assert!(error.contains(key), "{key}={value}: {error}");
            }
            jail.set_env("LOCAL_CACHE__ENABLED", "true");
            let error = load_err(jail, "REDIS__ENABLED", "false");
            assert!(error.contains("LOCAL_CACHE__ENABLED"), "{error}");
            jail.set_env("LOCAL_CACHE__ENABLED", "true");
            jail.set_env("LOCAL_CACHE__LEASE", "9s");
            let error = load_err(jail, "GRPC__REQUEST_TIMEOUT", "10s");
            assert!(error.contains("LOCAL_CACHE__LEASE"), "{error}");
            jail.set_env("LOCAL_CACHE__ENABLED", "true");
            let s = Settings::load(None).unwrap();
            assert!(s.local_cache.enabled);
            assert_eq!(s.local_cache.lease, Duration::from_secs(3));
            Ok(())
        });
    }

    #[test]
    fn passwords_are_read_verbatim_and_never_printed() {
        Jail::expect_with(|jail| {
            jail.set_env("REDIS__PASSWORD", "0031415926535897");
            let s = Settings::load(None).unwrap();
            let password = s
                .redis
                .password
                .as_ref()
                .unwrap()
                .expose_secret()
                .to_owned();
            assert_eq!(password, "0031415926535897");
            let debug = format!("{s:?}");
            assert!(!debug.contains("31415926535897"), "{debug}");
            jail.set_env("REDIS__ENABLED", "maybe");
            let error = Settings::load(None).unwrap_err().to_string();
            assert!(!error.contains("31415926535897"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn secrets_never_print() {
        Jail::expect_with(|jail| {
            jail.set_env("DATABASE__URL", "postgres://u:hunter2@h/db");
            jail.set_env("REDIS__URL", "redis://:hunter3@h:6379");
            let debug = format!("{:?}", Settings::load(None).unwrap());
            assert!(
                !debug.contains("hunter2") && !debug.contains("hunter3"),
                "{debug}"
            );
            Ok(())
        });
    }
}
