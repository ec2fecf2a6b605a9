//! A session as stored in PostgreSQL and copied into Redis (never the token).
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Timestamps are cached as integer microseconds: decoding them is on the hot path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: Uuid,
    pub user_id: Uuid,
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub last_seen_at: DateTime<Utc>,
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub absolute_expires_at: DateTime<Utc>,
    /// When the password was last checked for this session.
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub authenticated_at: DateTime<Utc>,
    pub ip_address: String,
    pub user_agent: String,
    /// When the account's email address was verified (`None`: not verified). A copy written by
    /// an earlier release lacks it and reads as `None`: late copies only ever say "not verified"
    /// (see `auth::email`).
    #[serde(default, with = "chrono::serde::ts_microseconds_option")]
    pub email_verified_at: Option<DateTime<Utc>>,
    /// How the session was authenticated (NIST SP 800-63B's level): 1, a password; 2, a password
    /// and a second factor. Fixed for the session's life. A copy written by an earlier release
    /// lacks it and reads as 1: a late copy only ever understates it.
    #[serde(default = "password_only")]
    pub aal: u8,
}

fn password_only() -> u8 {
    1
}
