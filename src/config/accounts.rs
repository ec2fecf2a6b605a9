//! `SESSION__*`, `AUTH__*`, `RATE_LIMIT__*`, `TOKENS__*`: sessions, passwords, brute-force limits
//! and the tokens' signing keys.
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid};

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

impl SessionSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
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
        Ok(())
    }
}

/// The longest password accepted, in characters (after NFKC normalization); the shortest,
/// `AUTH__PASSWORD_MIN_LENGTH`, may be at most this.
pub const PASSWORD_MAX_CHARS: usize = 128;

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

impl AuthSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let longest = PASSWORD_MAX_CHARS;
        if !(8..=longest).contains(&self.password_min_length) {
            return invalid(
                "AUTH__PASSWORD_MIN_LENGTH",
                &format!("must be 8 to {longest} (NIST SP 800-63B asks for at least 8)"),
            );
        }
        if self.hash_concurrency == 0 {
            return invalid("AUTH__HASH_CONCURRENCY", "must be at least 1");
        }
        Ok(())
    }
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

impl RateLimitSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let rl = self;
        if rl.login_window.is_zero() {
            return invalid("RATE_LIMIT__LOGIN_WINDOW", "must be greater than zero");
        }
        if rl.unknown_lookups_window.is_zero() {
            return invalid(
                "RATE_LIMIT__UNKNOWN_LOOKUPS_WINDOW",
                "must be greater than zero",
            );
        }
        if rl.register_window.is_zero() {
            return invalid("RATE_LIMIT__REGISTER_WINDOW", "must be greater than zero");
        }
        if !(1..=128).contains(&rl.ipv6_prefix) {
            return invalid("RATE_LIMIT__IPV6_PREFIX", "must be 1 to 128");
        }
        Ok(())
    }
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

impl TokenSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.key_rotation < Duration::from_secs(3600) {
            return invalid("TOKENS__KEY_ROTATION", "must be at least 1h");
        }
        Ok(())
    }
}
