//! `DATABASE__*`: PostgreSQL, its pool and the pool's shares.
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, invalid};

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

impl DatabaseSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let d = self;
        if !d.url.expose_secret().starts_with("postgres://")
            && !d.url.expose_secret().starts_with("postgresql://")
        {
            return invalid("DATABASE__URL", "must be a postgres:// URL");
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
        Ok(())
    }
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
