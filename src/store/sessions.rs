//! Sessions and the outbox of revocations still to be mirrored into Redis.
use chrono::{DateTime, Utc};
use sqlx::{FromRow, postgres::PgRow};
use uuid::Uuid;

use super::{Db, StoreError};
use crate::auth::session::SessionRecord;

/// Revokes the sessions matching `$cond` (with `$1` the revocation time) and, in the same
/// statement, queues their Redis invalidations, returning them.
macro_rules! revoke_where {
    ($cond:literal) => {
        concat!(
            "with revoked as (
                 update sessions set revoked_at = $1
                 where revoked_at is null and ",
            $cond,
            " returning token_hash, user_id, absolute_expires_at
             )
             insert into session_invalidations (token_hash, user_id, expires_at)
             select token_hash, user_id, absolute_expires_at from revoked
             returning id, token_hash, user_id, expires_at"
        )
    };
}

/// A session is active while not revoked and before both deadlines; `$2` is now and `$3` is
/// the idle cutoff (now - idle timeout).
macro_rules! active {
    () => {
        "revoked_at is null and absolute_expires_at > $2 and last_seen_at > $3"
    };
}

/// A revocation whose Redis tombstone may not be in place yet.
#[derive(Debug, Clone, FromRow)]
pub struct Invalidation {
    pub id: i64,
    pub token_hash: Vec<u8>,
    pub user_id: Uuid,
    /// The tombstone is useless after this: the session would have expired anyway.
    pub expires_at: DateTime<Utc>,
}

/// A session row: the record plus whether it was revoked.
pub struct StoredSession {
    pub record: SessionRecord,
    pub revoked: bool,
}

impl FromRow<'_, PgRow> for StoredSession {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let revoked_at: Option<DateTime<Utc>> = row.try_get("revoked_at")?;
        Ok(Self {
            record: SessionRecord {
                id: row.try_get("id")?,
                user_id: row.try_get("user_id")?,
                created_at: row.try_get("created_at")?,
                last_seen_at: row.try_get("last_seen_at")?,
                absolute_expires_at: row.try_get("absolute_expires_at")?,
                authenticated_at: row.try_get("authenticated_at")?,
                ip_address: row.try_get("ip_address")?,
                user_agent: row.try_get("user_agent")?,
            },
            revoked: revoked_at.is_some(),
        })
    }
}

#[derive(Clone, Copy)]
pub struct SessionRepo<'a>(&'a Db);

impl Db {
    pub fn sessions(&self) -> SessionRepo<'_> {
        SessionRepo(self)
    }
}

impl SessionRepo<'_> {
    /// Inserts a new session, if the user's password hash is still `verified_hash`, and in the
    /// same statement revokes the user's least recently used active sessions beyond
    /// `max_per_user` (counting the new one), returning their queued invalidations. `None` when
    /// the password changed meanwhile (nothing is written). The user row is share-locked, so a
    /// concurrent ChangePassword either sees this session (and revokes it) or wins first.
    pub async fn insert_capped(
        &self,
        s: &SessionRecord,
        token_hash: &[u8],
        verified_hash: &str,
        idle_cutoff: DateTime<Utc>,
        max_per_user: i64,
    ) -> Result<Option<Vec<Invalidation>>, StoreError> {
        let mut tx = self.0.run(self.0.pool.begin()).await?;
        let current = sqlx::query_scalar::<_, String>(
            "select password_hash from users where id = $1 for share",
        )
        .bind(s.user_id);
        if self
            .0
            .run(current.fetch_optional(&mut *tx))
            .await?
            .as_deref()
            != Some(verified_hash)
        {
            return Ok(None);
        }
        let query = sqlx::query_as::<_, Invalidation>(concat!(
            "with new_session as (
                 insert into sessions (id, user_id, token_hash, created_at, last_seen_at,
                                       absolute_expires_at, authenticated_at, ip_address, user_agent)
                 values ($4, $5, $6, $2, $2, $7, $2, $8, $9)
             ), ",
            // The new row is invisible to the rest of the statement: keep max - 1 others.
            "least_recent as (
                 select id from sessions where user_id = $5 and ",
            active!(),
            " order by last_seen_at desc, created_at desc offset $10
             ), ",
            "revoked as (
                 update sessions set revoked_at = $1
                 where id in (select id from least_recent) and revoked_at is null
                 returning token_hash, user_id, absolute_expires_at
             )
             insert into session_invalidations (token_hash, user_id, expires_at)
             select token_hash, user_id, absolute_expires_at from revoked
             returning id, token_hash, user_id, expires_at"
        ))
        .bind(s.created_at)
        .bind(s.created_at)
        .bind(idle_cutoff)
        .bind(s.id)
        .bind(s.user_id)
        .bind(token_hash)
        .bind(s.absolute_expires_at)
        .bind(&s.ip_address)
        .bind(&s.user_agent)
        .bind((max_per_user - 1).max(0));
        let evicted = self.0.run(query.fetch_all(&mut *tx)).await?;
        self.0.run(tx.commit()).await?;
        Ok(Some(evicted))
    }

    /// The user's active sessions, newest first.
    pub async fn list_active(
        &self,
        user_id: Uuid,
        now: DateTime<Utc>,
        idle_cutoff: DateTime<Utc>,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let query = sqlx::query_as::<_, StoredSession>(concat!(
            "select id, user_id, created_at, last_seen_at, absolute_expires_at, authenticated_at,
                    ip_address, user_agent, revoked_at
             from sessions where user_id = $1 and ",
            active!(),
            " order by created_at desc, id desc"
        ))
        .bind(user_id)
        .bind(now)
        .bind(idle_cutoff);
        let rows = self.0.run(query.fetch_all(&self.0.pool)).await?;
        Ok(rows.into_iter().map(|s| s.record).collect())
    }

    /// Revokes one of the user's sessions. `Ok(None)` when there was nothing to revoke.
    pub async fn revoke_by_id(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<Invalidation>, StoreError> {
        let query = sqlx::query_as::<_, Invalidation>(revoke_where!("user_id = $2 and id = $3"))
            .bind(now)
            .bind(user_id)
            .bind(session_id);
        self.0.run(query.fetch_optional(&self.0.pool)).await
    }

    /// Whether this session (in any state) belongs to this user.
    pub async fn belongs_to(&self, user_id: Uuid, session_id: Uuid) -> Result<bool, StoreError> {
        let query = sqlx::query_scalar::<_, bool>(
            "select exists (select 1 from sessions where id = $1 and user_id = $2)",
        )
        .bind(session_id)
        .bind(user_id);
        self.0.run(query.fetch_one(&self.0.pool)).await
    }

    /// Revokes every active session of the user except `keep`.
    pub async fn revoke_all(
        &self,
        user_id: Uuid,
        keep: Option<Uuid>,
        now: DateTime<Utc>,
        idle_cutoff: DateTime<Utc>,
    ) -> Result<Vec<Invalidation>, StoreError> {
        self.revoke_all_in(&self.0.pool, user_id, keep, now, idle_cutoff)
            .await
    }

    /// [`SessionRepo::revoke_all`] on a given connection (possibly inside a transaction).
    pub(super) async fn revoke_all_in<'c>(
        &self,
        executor: impl sqlx::PgExecutor<'c>,
        user_id: Uuid,
        keep: Option<Uuid>,
        now: DateTime<Utc>,
        idle_cutoff: DateTime<Utc>,
    ) -> Result<Vec<Invalidation>, StoreError> {
        let query = sqlx::query_as::<_, Invalidation>(revoke_where!(
            "user_id = $2 and id is distinct from $3 and absolute_expires_at > $1 \
             and last_seen_at > $4"
        ))
        .bind(now)
        .bind(user_id)
        .bind(keep)
        .bind(idle_cutoff);
        self.0.run(query.fetch_all(executor)).await
    }

    /// Deletes up to `batch` sessions revoked or expired before `cutoff` (idle expiry computed
    /// with `idle_cutoff` = cutoff - idle timeout), and invalidations no longer needed.
    /// Each batch is its own short statement, and rows locked by requests are skipped.
    pub async fn purge(
        &self,
        cutoff: DateTime<Utc>,
        idle_cutoff: DateTime<Utc>,
        now: DateTime<Utc>,
        batch: i64,
    ) -> Result<u64, StoreError> {
        let query = sqlx::query(
            "with doomed as (
                 select id from sessions
                 where revoked_at < $1 or absolute_expires_at < $1 or last_seen_at < $2
                 limit $4 for update skip locked
             ), gone as (
                 delete from session_invalidations where expires_at < $3
             )
             delete from sessions where id in (select id from doomed)",
        )
        .bind(cutoff)
        .bind(idle_cutoff)
        .bind(now)
        .bind(batch);
        let done = self.0.run(query.execute(&self.0.pool)).await?;
        Ok(done.rows_affected())
    }

    pub async fn find_by_token_hash(
        &self,
        token_hash: &[u8],
    ) -> Result<Option<StoredSession>, StoreError> {
        let query = sqlx::query_as::<_, StoredSession>(
            "select id, user_id, created_at, last_seen_at, absolute_expires_at, authenticated_at,
                    ip_address, user_agent, revoked_at
             from sessions where token_hash = $1",
        )
        .bind(token_hash);
        self.0.run(query.fetch_optional(&self.0.pool)).await
    }

    /// Records activity at `now` unless the session was revoked or expired meanwhile (an
    /// expired session is never revived); `None` means the caller must not accept the session.
    pub async fn touch(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        idle_cutoff: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let query = sqlx::query_scalar(
            "update sessions set last_seen_at = greatest(last_seen_at, $2)
             where id = $1 and revoked_at is null and absolute_expires_at > $2
               and last_seen_at > $3
             returning last_seen_at",
        )
        .bind(id)
        .bind(now)
        .bind(idle_cutoff);
        self.0.run(query.fetch_optional(&self.0.pool)).await
    }

    /// Revokes the session of this token and, in the same statement, queues its Redis
    /// invalidation. `None` when there was nothing to revoke.
    pub async fn revoke_by_token_hash(
        &self,
        token_hash: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<Invalidation>, StoreError> {
        let query = sqlx::query_as::<_, Invalidation>(revoke_where!("token_hash = $2"))
            .bind(now)
            .bind(token_hash);
        self.0.run(query.fetch_optional(&self.0.pool)).await
    }

    /// The oldest invalidations not yet confirmed in Redis.
    pub async fn pending_invalidations(&self, limit: i64) -> Result<Vec<Invalidation>, StoreError> {
        let query = sqlx::query_as::<_, Invalidation>(
            "select id, token_hash, user_id, expires_at from session_invalidations
             order by id limit $1",
        )
        .bind(limit);
        self.0.run(query.fetch_all(&self.0.pool)).await
    }

    pub async fn delete_invalidations(&self, ids: &[i64]) -> Result<(), StoreError> {
        let query = sqlx::query("delete from session_invalidations where id = any($1)").bind(ids);
        self.0.run(query.execute(&self.0.pool)).await?;
        Ok(())
    }
}
