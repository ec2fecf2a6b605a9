//! The outboxes: revocations and profile versions committed in PostgreSQL whose Redis step has
//! not been confirmed yet. A row is written in the same statement as the change it mirrors, and
//! deleted only by an instance that has Redis once Redis confirmed the step — never by an instance
//! with Redis disabled, whose "nothing to do" would throw away what a Redis-backed instance still
//! has to apply. Every instance with Redis drains what is left.
use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::{Db, StoreError};

/// A revocation whose Redis tombstone may not be in place yet.
#[derive(Debug, Clone, FromRow)]
pub struct Invalidation {
    pub id: i64,
    pub token_hash: Vec<u8>,
    pub user_id: Uuid,
    /// The tombstone is useless after this: the session would have expired anyway.
    pub expires_at: DateTime<Utc>,
}

/// One row of a revoking statement's answer.
#[derive(FromRow)]
pub(super) struct QueuedRow {
    #[sqlx(flatten)]
    invalidation: Invalidation,
    /// Queued by this statement (the session was revoked by it).
    fresh: bool,
    /// Revoked by this statement while still usable.
    active: bool,
}

/// What a revoking statement did.
#[derive(Debug, Default)]
pub struct Revocation {
    /// Sessions it revoked.
    pub revoked: usize,
    /// Of those, the ones that were still usable (not expired).
    pub active: usize,
    /// Every invalidation still queued for the sessions concerned, its own included: all of them
    /// must reach Redis before the revoking call returns.
    pub pending: Vec<Invalidation>,
}

impl Revocation {
    pub(super) fn from_rows(rows: Vec<QueuedRow>) -> Self {
        let mut revocation = Revocation::default();
        for row in rows {
            revocation.revoked += usize::from(row.fresh);
            revocation.active += usize::from(row.active);
            revocation.pending.push(row.invalidation);
        }
        revocation
    }
}

/// A profile version that Redis may not have yet.
#[derive(Debug, Clone, FromRow)]
pub struct ProfileInvalidation {
    pub id: i64,
    pub user_id: Uuid,
    pub version: i64,
}

#[derive(Clone, Copy)]
pub struct OutboxRepo<'a>(&'a Db);

impl Db {
    pub fn outbox(&self) -> OutboxRepo<'_> {
        OutboxRepo(self)
    }
}

impl OutboxRepo<'_> {
    /// The oldest session invalidations not yet confirmed in Redis.
    pub async fn pending_sessions(&self, limit: i64) -> Result<Vec<Invalidation>, StoreError> {
        let query = sqlx::query_as::<_, Invalidation>(
            "select id, token_hash, user_id, expires_at from session_invalidations
             order by id limit $1",
        )
        .bind(limit);
        self.0.run(query.fetch_all(&self.0.pool)).await
    }

    pub async fn confirm_sessions(&self, ids: &[i64]) -> Result<(), StoreError> {
        let query = sqlx::query("delete from session_invalidations where id = any($1)").bind(ids);
        self.0.run(query.execute(&self.0.pool)).await?;
        Ok(())
    }

    /// The oldest profile versions not yet confirmed in Redis.
    pub async fn pending_profiles(
        &self,
        limit: i64,
    ) -> Result<Vec<ProfileInvalidation>, StoreError> {
        let query = sqlx::query_as::<_, ProfileInvalidation>(
            "select id, user_id, version from profile_invalidations order by id limit $1",
        )
        .bind(limit);
        self.0.run(query.fetch_all(&self.0.pool)).await
    }

    pub async fn confirm_profiles(&self, ids: &[i64]) -> Result<(), StoreError> {
        let query = sqlx::query("delete from profile_invalidations where id = any($1)").bind(ids);
        self.0.run(query.execute(&self.0.pool)).await?;
        Ok(())
    }
}
