//! Sessions and the outbox of revocations still to be mirrored into Redis.
use chrono::{DateTime, Utc};
use sqlx::{FromRow, postgres::PgRow};
use uuid::Uuid;

use super::{Db, StoreError};
use crate::auth::session::SessionRecord;

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
    pub async fn insert(&self, s: &SessionRecord, token_hash: &[u8]) -> Result<(), StoreError> {
        let query = sqlx::query(
            "insert into sessions (id, user_id, token_hash, created_at, last_seen_at,
                                   absolute_expires_at, authenticated_at, ip_address, user_agent)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(s.id)
        .bind(s.user_id)
        .bind(token_hash)
        .bind(s.created_at)
        .bind(s.last_seen_at)
        .bind(s.absolute_expires_at)
        .bind(s.authenticated_at)
        .bind(&s.ip_address)
        .bind(&s.user_agent);
        self.0.run(query.execute(&self.0.pool)).await?;
        Ok(())
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

    /// Records activity at `now` unless the session was revoked meanwhile; `None` means revoked
    /// (or gone), so the caller must not accept the session.
    pub async fn touch(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let query = sqlx::query_scalar(
            "update sessions set last_seen_at = greatest(last_seen_at, $2)
             where id = $1 and revoked_at is null
             returning last_seen_at",
        )
        .bind(id)
        .bind(now);
        self.0.run(query.fetch_optional(&self.0.pool)).await
    }

    /// Revokes the session of this token and, in the same statement, queues its Redis
    /// invalidation. `None` when there was nothing to revoke.
    pub async fn revoke_by_token_hash(
        &self,
        token_hash: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<Invalidation>, StoreError> {
        let query = sqlx::query_as::<_, Invalidation>(
            "with revoked as (
                 update sessions set revoked_at = $2
                 where token_hash = $1 and revoked_at is null
                 returning token_hash, user_id, absolute_expires_at
             )
             insert into session_invalidations (token_hash, user_id, expires_at)
             select token_hash, user_id, absolute_expires_at from revoked
             returning id, token_hash, user_id, expires_at",
        )
        .bind(token_hash)
        .bind(now);
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
