//! The event stream's log (`change_events`, see its migration): one row per change that
//! invalidates a caller's cached validation or profile, written by the change's own statement
//! (`sessions`, `profiles`, `admin`). `crate::events` reads it for each subscription, each row
//! once (`follow::follow_ids`); rows are purged after the retention, and
//! `change_events_purged` says through which id they may be gone.
use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::{Db, StoreError, follow::Row, history::TIMELINE, micros};

/// Why sessions were revoked, as the log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Logout,
    /// RevokeSession by the session's user.
    Revoked,
    /// RevokeAllSessions by the user.
    RevokedAll,
    /// A Login at the session cap evicted it.
    SessionLimit,
    PasswordChanged,
    /// A password reset completed (every session of the account).
    PasswordReset,
    /// The account was deleted.
    UserDeleted,
    UserDisabled,
    /// AdminService RevokeUserSession or RevokeUserSessions.
    Admin,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Logout => "logout",
            Reason::Revoked => "revoked",
            Reason::RevokedAll => "revoked_all",
            Reason::SessionLimit => "session_limit",
            Reason::PasswordChanged => "password_changed",
            Reason::PasswordReset => "password_reset",
            Reason::UserDeleted => "user_deleted",
            Reason::UserDisabled => "user_disabled",
            Reason::Admin => "admin",
        }
    }

    /// The reason a row records (`None`: one this release does not know, or none).
    pub fn parse(text: &str) -> Option<Self> {
        [
            Reason::Logout,
            Reason::Revoked,
            Reason::RevokedAll,
            Reason::SessionLimit,
            Reason::PasswordChanged,
            Reason::PasswordReset,
            Reason::UserDeleted,
            Reason::UserDisabled,
            Reason::Admin,
        ]
        .into_iter()
        .find(|r| r.as_str() == text)
    }
}

/// What a row says happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    SessionRevoked {
        session_id: Uuid,
    },
    /// Every session of the user created at or before `cutoff`, but `kept`.
    SessionsRevoked {
        cutoff: DateTime<Utc>,
        kept: Option<Uuid>,
    },
    UserDisabled,
    UserEnabled,
    /// The account is deleted (its sessions revoked and its profile floored by events of the
    /// same change).
    UserDeleted,
    ProfileUpdated {
        version: i64,
    },
}

/// One row of the log.
#[derive(Debug, Clone, FromRow)]
pub struct ChangeEvent {
    pub id: i64,
    kind: String,
    pub user_id: Uuid,
    session_id: Option<Uuid>,
    reason: String,
    cutoff: Option<DateTime<Utc>>,
    kept_session: Option<Uuid>,
    version: Option<i64>,
    pub created_at: DateTime<Utc>,
}

impl ChangeEvent {
    /// What the row says (`None`: a kind this release does not know, written by a later one).
    pub fn kind(&self) -> Option<EventKind> {
        Some(match self.kind.as_str() {
            "session_revoked" => EventKind::SessionRevoked {
                session_id: self.session_id?,
            },
            "sessions_revoked" => EventKind::SessionsRevoked {
                cutoff: self.cutoff?,
                kept: self.kept_session,
            },
            "user_disabled" => EventKind::UserDisabled,
            "user_enabled" => EventKind::UserEnabled,
            "user_deleted" => EventKind::UserDeleted,
            "profile_updated" => EventKind::ProfileUpdated {
                version: self.version?,
            },
            _ => return None,
        })
    }

    pub fn reason(&self) -> Option<Reason> {
        Reason::parse(&self.reason)
    }
}

impl Row for ChangeEvent {
    fn position(&self) -> (DateTime<Utc>, i64) {
        (self.created_at, self.id)
    }
}

/// The start of a pass: PostgreSQL's history, the last id handed out, and PostgreSQL's time
/// when it was read. Every row committed before `at` has an id up to `high` (ids are drawn
/// before commit) and is visible to the reads that follow.
#[derive(Debug, Clone)]
pub struct Stream {
    pub history: String,
    pub high: i64,
    pub at: DateTime<Utc>,
    /// Rows through this id may have been purged.
    pub purged_through: i64,
}

/// Rows one purge deletes at most (the SQL's limit).
pub const EVENT_PURGE_BATCH: u64 = 10_000;

const COLUMNS: &str =
    "id, kind, user_id, session_id, reason, cutoff, kept_session, version, created_at";

#[derive(Clone, Copy)]
pub struct EventRepo<'a>(&'a Db);

impl Db {
    pub fn events(&self) -> EventRepo<'_> {
        EventRepo(self)
    }
}

impl EventRepo<'_> {
    /// Where the log stands now (see [`Stream`]).
    pub async fn stream(&self) -> Result<Stream, StoreError> {
        let sql = format!(
            "select system_identifier::text || '/' || {TIMELINE},
                    coalesce(pg_sequence_last_value(
                        pg_get_serial_sequence('change_events', 'id')::regclass), 0),
                    clock_timestamp(),
                    (select through from change_events_purged)
             from pg_control_system()"
        );
        let query =
            sqlx::query_as::<_, (String, i64, DateTime<Utc>, i64)>(sqlx::AssertSqlSafe(sql));
        let (history, high, at, purged_through) =
            self.0.run(query.fetch_one(self.0.pool())).await?;
        Ok(Stream {
            history,
            high,
            at,
            purged_through,
        })
    }

    /// The id a new subscription starts after: the last row logged more than `back` ago (so
    /// that its first pass reads every row of that window), or the purge's mark.
    pub async fn start_after(&self, back: std::time::Duration) -> Result<i64, StoreError> {
        let query = sqlx::query_scalar::<_, i64>(
            "select coalesce(
                 (select id from change_events
                  where created_at < clock_timestamp() - $1::bigint * interval '1 microsecond'
                  order by created_at desc, id desc limit 1),
                 (select through from change_events_purged))",
        )
        .bind(micros(back));
        self.0.run(query.fetch_one(self.0.pool())).await
    }

    /// Rows with an id above `above`, in id order, at most `limit`.
    pub async fn above(&self, above: i64, limit: i64) -> Result<Vec<ChangeEvent>, StoreError> {
        let sql = format!("select {COLUMNS} from change_events where id > $1 order by id limit $2");
        let query = sqlx::query_as::<_, ChangeEvent>(sqlx::AssertSqlSafe(sql))
            .bind(above)
            .bind(limit);
        self.0.run(query.fetch_all(self.0.pool())).await
    }

    /// Rows whose ids fall in these inclusive ranges.
    pub async fn within(&self, ranges: &[(i64, i64)]) -> Result<Vec<ChangeEvent>, StoreError> {
        self.0
            .log_rows_within("change_events", COLUMNS, ranges)
            .await
    }

    /// Deletes up to [`EVENT_PURGE_BATCH`] rows older than `retention` and records through which
    /// id rows may be gone.
    pub async fn purge(&self, retention: std::time::Duration) -> Result<u64, StoreError> {
        let query = sqlx::query_as::<_, (i64,)>(
            "with doomed as (
                 delete from change_events where id in (
                     select id from change_events
                     where created_at < clock_timestamp() - $1::bigint * interval '1 microsecond'
                     order by created_at limit 10000)
                 returning id
             ), marked as (
                 update change_events_purged
                 set through = greatest(through, (select max(id) from doomed))
                 where exists (select 1 from doomed)
             )
             select count(*) from doomed",
        )
        .bind(micros(retention));
        let (deleted,) = self.0.run(query.fetch_one(self.0.pool())).await?;
        Ok(deleted.max(0).unsigned_abs())
    }
}
