//! A profile as stored in PostgreSQL and copied into Redis, and a set of changes to one.
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A profile as stored in PostgreSQL and copied into Redis (timestamps as integer microseconds,
/// cheap to decode on the hot path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ProfileRecord {
    pub user_id: Uuid,
    pub display_name: String,
    pub bio: String,
    pub avatar_url: String,
    pub locale: String,
    pub time_zone: String,
    pub version: i64,
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "chrono::serde::ts_microseconds")]
    pub updated_at: DateTime<Utc>,
    /// When the account's email address was verified (`None`: not verified; also in a copy
    /// written by an earlier release, which a verification's new version replaces).
    #[serde(default, with = "chrono::serde::ts_microseconds_option")]
    pub email_verified_at: Option<DateTime<Utc>>,
}

/// New values for some fields (`None` = untouched), already validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfileChanges {
    pub display_name: Option<String>,
    pub bio: Option<String>,
    pub avatar_url: Option<String>,
    pub locale: Option<String>,
    pub time_zone: Option<String>,
}
