//! Settings: built-in defaults, then an optional TOML file, then environment variables named
//! `SECTION__KEY` (for example `REDIS__ENABLED=false`). Durations are human-readable (`250ms`,
//! `30m`, `7d`). Anything invalid stops startup with a message naming the setting.
use std::path::Path;

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use secrecy::SecretString;
use serde::Deserialize;

mod accounts;
mod admin;
mod database;
mod events;
mod ext_authz;
mod flows;
mod grpc;
mod jwt;
mod redis;

pub use accounts::{
    AuthSettings, PASSWORD_MAX_CHARS, RateLimitSettings, SessionSettings, TokenSettings,
};
pub use admin::{AdminSettings, AuditSettings};
pub use database::{DatabaseSettings, PoolShares, Share};
pub use events::EventsSettings;
pub use ext_authz::ExtAuthzSettings;
pub use flows::AccountsSettings;
pub use grpc::{
    GrpcSettings, GrpcTlsSettings, HealthSettings, LogFormat, LogSettings, MetricsSettings,
    TracesSettings,
};
pub use jwt::{JwtAlgorithm, JwtSettings, MAX_TTL_CEILING as JWT_MAX_TTL_CEILING};
pub use redis::{
    LocalCacheSettings, ProfileCacheSettings, RedisSettings, RedisTlsSettings, SentinelSettings,
};

/// Top-level sections; environment variables outside them are ignored.
const SECTIONS: [&str; 19] = [
    "grpc",
    "ext_authz",
    "admin",
    "accounts",
    "events",
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
    "tokens",
    "jwt",
    "log",
    "traces",
];

/// Environment variables read verbatim, never parsed (see [`Settings::load`]).
const RAW_SECRETS: [&str; 2] = ["REDIS__PASSWORD", "REDIS__SENTINEL__PASSWORD"];

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct Settings {
    pub grpc: GrpcSettings,
    pub admin: AdminSettings,
    pub accounts: AccountsSettings,
    pub events: EventsSettings,
    pub ext_authz: ExtAuthzSettings,
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
    pub jwt: JwtSettings,
    pub log: LogSettings,
    pub traces: TracesSettings,
    /// Test-only: pretend this host's clock is off by this many milliseconds (never read from a
    /// file or the environment).
    #[doc(hidden)]
    #[serde(skip)]
    pub test_clock_skew_ms: i64,
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

/// A check's refusal: `setting` cannot be used, for `reason`.
fn invalid(setting: &str, reason: &str) -> Result<(), ConfigError> {
    Err(ConfigError::invalid(setting, reason))
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

    /// Each section checks its own values; then what ties sections together.
    fn validate(&self) -> Result<(), ConfigError> {
        self.grpc.validate()?;
        self.admin.validate()?;
        self.accounts.validate()?;
        self.events.validate()?;
        self.ext_authz.validate()?;
        self.audit.validate()?;
        self.metrics.validate()?;
        self.health.validate()?;
        self.database.validate()?;
        self.redis.validate()?;
        self.session.validate()?;
        self.rate_limit.validate()?;
        self.tokens.validate()?;
        self.jwt.validate()?;
        self.auth.validate()?;
        self.profile_cache.validate()?;
        self.local_cache.validate()?;
        self.log.validate()?;
        self.traces.validate()?;
        let tls = &self.grpc.tls;
        let lc = &self.local_cache;
        if self.admin.allowed_clients().next().is_some() && tls.client_ca_file.is_none() {
            return invalid(
                "ADMIN__ALLOWED_CLIENTS",
                "admits client certificates: needs GRPC__TLS__CLIENT_CA_FILE (mutual TLS)",
            );
        }
        if !self.events.allowed_clients.trim().is_empty() && tls.client_ca_file.is_none() {
            return invalid(
                "EVENTS__ALLOWED_CLIENTS",
                "admits client certificates: needs GRPC__TLS__CLIENT_CA_FILE (mutual TLS)",
            );
        }
        if self.events.served() && lc.lease > crate::clock::covers(self.grpc.request_timeout) {
            return invalid(
                "LOCAL_CACHE__LEASE",
                "must leave GRPC__REQUEST_TIMEOUT room: strict subscribers hold leases of this \
                 length, which a revoking call may wait for (plus 1% and 100ms), and it needs a \
                 second more",
            );
        }
        if self.metrics.enabled && self.metrics.addr == self.grpc.addr {
            return invalid("METRICS__ADDR", "must differ from GRPC__ADDR");
        }
        if lc.enabled && lc.lease > crate::clock::covers(self.grpc.request_timeout) {
            return invalid(
                "LOCAL_CACHE__LEASE",
                "must leave GRPC__REQUEST_TIMEOUT room: a revoking call may wait for a lease \
                 (plus 1% and 100ms) and needs a second more",
            );
        }
        if lc.enabled && !self.redis.enabled {
            return invalid(
                "LOCAL_CACHE__ENABLED",
                "needs Redis (REDIS__ENABLED=true): invalidations travel over Redis pub/sub",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
