//! The outboxes: logs of the revocations and profile versions committed in PostgreSQL, each row
//! written in the same statement as the change it mirrors.
//!
//! Several caches may share the database: instances on different Redis deployments or key
//! prefixes (a rolling change of `REDIS__URL` or `REDIS__KEY_PREFIX`), of different releases, or
//! with Redis disabled. A row applied to one cache is still owed to the others, so rows are never
//! deleted when applied: each cache ("namespace": key prefix + generation) follows the logs with a
//! cursor of its own ([`OutboxRepo::cursor`]), and rows are purged only once nothing they
//! invalidate can still be cached anywhere (session rows at the session's absolute expiry, profile
//! rows after the longest profile TTL).
//!
//! Cursors are timestamps (PostgreSQL's), and a row's timestamp is taken before its transaction
//! commits; readers therefore re-read an [`in_flight`] allowance before their cursor, which is longer than any
//! transaction that writes these rows can last (statements and idle time in a transaction are
//! both bounded by `DATABASE__QUERY_TIMEOUT`).
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::{Db, StoreError};

/// A revocation, to be made visible in a cache as a tombstone.
#[derive(Debug, Clone, FromRow)]
pub struct Invalidation {
    pub id: i64,
    pub token_hash: Vec<u8>,
    pub user_id: Uuid,
    /// The tombstone is useless after this: the session would have expired anyway.
    pub expires_at: DateTime<Utc>,
    /// When it was logged.
    pub created_at: DateTime<Utc>,
}

/// Where a namespace stands in the two logs.
#[derive(Debug, Clone, Copy, FromRow)]
pub struct Cursor {
    pub sessions_after: DateTime<Utc>,
    pub profiles_after: DateTime<Utc>,
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
    /// The token hashes of the sessions it revoked.
    pub revoked_hashes: Vec<Vec<u8>>,
    /// Every invalidation logged for the sessions concerned within the wait horizon or since the
    /// caller's cache last followed the log (see `sessions::Since`), its own included: all of
    /// them must be invalidated everywhere before the revoking call returns.
    pub pending: Vec<Invalidation>,
    /// The earlier invalidations were more than one statement returns: `pending` is not all.
    pub truncated: bool,
}

impl Revocation {
    pub(super) fn from_rows(rows: Vec<QueuedRow>) -> Self {
        let mut revocation = Revocation::default();
        let earlier = rows.iter().filter(|r| !r.fresh).count();
        revocation.truncated = earlier >= super::sessions::EARLIER_ROWS;
        for row in rows {
            revocation.revoked += usize::from(row.fresh);
            if row.fresh {
                let hash = row.invalidation.token_hash.clone();
                revocation.revoked_hashes.push(hash);
            }
            revocation.active += usize::from(row.active);
            revocation.pending.push(row.invalidation);
        }
        revocation
    }
}

/// A profile version, to be made visible in a cache.
#[derive(Debug, Clone, FromRow)]
pub struct ProfileInvalidation {
    pub id: i64,
    pub user_id: Uuid,
    pub version: i64,
    /// When it was logged.
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Copy)]
pub struct OutboxRepo<'a>(&'a Db);

impl Db {
    pub fn outbox(&self) -> OutboxRepo<'_> {
        OutboxRepo(self)
    }
}

impl OutboxRepo<'_> {
    /// The cursor of `namespace`, the cache of Redis generation `generation`. One it has not
    /// yet is created at the generation's birth (when it was first bound to a fingerprint;
    /// PostgreSQL's time now if that is not known): no copy of the generation was filled
    /// before, so every row logged since must reach it — including rows whose write another
    /// instance confirmed on servers of an earlier generation while this one was being filled
    /// (a Sentinel failover: see `cache::Redis::adopt`).
    pub async fn cursor(&self, namespace: &str, generation: u64) -> Result<Cursor, StoreError> {
        let query = sqlx::query_as::<_, Cursor>(
            "with born as (
                 select coalesce(min(created_at), clock_timestamp()) as at
                 from redis_fingerprints where generation = $2
             ),
             created as (
                 insert into outbox_cursors (namespace, sessions_after, profiles_after)
                 select $1, at, at from born
                 on conflict (namespace) do nothing
                 returning sessions_after, profiles_after
             )
             select * from created
             union all
             select sessions_after, profiles_after from outbox_cursors where namespace = $1",
        )
        .bind(namespace)
        .bind(i64::try_from(generation).unwrap_or(i64::MAX));
        match self.0.run(query.fetch_optional(self.0.pool())).await? {
            Some(cursor) => Ok(cursor),
            // Created concurrently by another instance: visible now.
            None => {
                let query = sqlx::query_as::<_, Cursor>(
                    "select sessions_after, profiles_after from outbox_cursors where namespace = $1",
                )
                .bind(namespace);
                self.0.run(query.fetch_one(self.0.pool())).await
            }
        }
    }

    /// Moves the namespace's cursor forward (never back).
    pub async fn advance(&self, namespace: &str, to: Cursor) -> Result<(), StoreError> {
        let query = sqlx::query(
            "update outbox_cursors
             set sessions_after = greatest(sessions_after, $2),
                 profiles_after = greatest(profiles_after, $3),
                 updated_at = now()
             where namespace = $1",
        )
        .bind(namespace)
        .bind(to.sessions_after)
        .bind(to.profiles_after);
        self.0.run(query.execute(self.0.pool())).await?;
        Ok(())
    }

    /// Session invalidations logged after `(after, after_id)` (keyset order), at most `limit`.
    pub async fn sessions_after(
        &self,
        after: (DateTime<Utc>, i64),
        limit: i64,
    ) -> Result<Vec<Invalidation>, StoreError> {
        let query = sqlx::query_as::<_, Invalidation>(
            "select id, token_hash, user_id, expires_at, created_at from session_invalidations
             where (created_at, id) > ($1, $2) order by created_at, id limit $3",
        )
        .bind(after.0)
        .bind(after.1)
        .bind(limit);
        self.0.run(query.fetch_all(self.0.pool())).await
    }

    /// Profile versions logged after `(after, after_id)` (keyset order), at most `limit`.
    pub async fn profiles_after(
        &self,
        after: (DateTime<Utc>, i64),
        limit: i64,
    ) -> Result<Vec<ProfileInvalidation>, StoreError> {
        let query = sqlx::query_as::<_, ProfileInvalidation>(
            "select id, user_id, version, created_at from profile_invalidations
             where (created_at, id) > ($1, $2) order by created_at, id limit $3",
        )
        .bind(after.0)
        .bind(after.1)
        .bind(limit);
        self.0.run(query.fetch_all(self.0.pool())).await
    }

    /// The id of the newest row logged before `before` (0 when none) in the sessions log
    /// (`profiles`: the profile log). Every id up to it was drawn before `before` (an id and its
    /// row's time are taken in the same statement), so its transaction is over once the
    /// in-flight allowance has passed since (see [`in_flight`]).
    pub async fn floor(&self, profiles: bool, before: DateTime<Utc>) -> Result<i64, StoreError> {
        let table = table(profiles);
        let sql = format!(
            "select coalesce((select id from {table} where created_at < $1
                              order by created_at desc, id desc limit 1), 0)"
        );
        let query = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql)).bind(before);
        self.0.run(query.fetch_one(self.0.pool())).await
    }

    /// The last id each log's sequence handed out (sessions, profiles; 0 before the first).
    /// It never goes back but when the database's history did (a restore, a standby promoted
    /// without the last commits): a follower that read past it starts over.
    pub async fn highs(&self) -> Result<(i64, i64), StoreError> {
        let query = sqlx::query_as::<_, (i64, i64)>(
            "select coalesce(pg_sequence_last_value(
                        pg_get_serial_sequence('session_invalidations', 'id')::regclass), 0),
                    coalesce(pg_sequence_last_value(
                        pg_get_serial_sequence('profile_invalidations', 'id')::regclass), 0)",
        );
        self.0.run(query.fetch_one(self.0.pool())).await
    }

    /// Session invalidations with an id above `above`, in id order, at most `limit`.
    pub async fn sessions_above(
        &self,
        above: i64,
        limit: i64,
    ) -> Result<Vec<Invalidation>, StoreError> {
        self.above(false, above, limit).await
    }

    /// Profile versions with an id above `above`, in id order, at most `limit`.
    pub async fn profiles_above(
        &self,
        above: i64,
        limit: i64,
    ) -> Result<Vec<ProfileInvalidation>, StoreError> {
        self.above(true, above, limit).await
    }

    /// Session invalidations whose ids fall in these inclusive ranges.
    pub async fn sessions_within(
        &self,
        ranges: &[(i64, i64)],
    ) -> Result<Vec<Invalidation>, StoreError> {
        self.within(false, ranges).await
    }

    /// Profile versions whose ids fall in these inclusive ranges.
    pub async fn profiles_within(
        &self,
        ranges: &[(i64, i64)],
    ) -> Result<Vec<ProfileInvalidation>, StoreError> {
        self.within(true, ranges).await
    }

    async fn above<T>(&self, profiles: bool, above: i64, limit: i64) -> Result<Vec<T>, StoreError>
    where
        T: for<'r> FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        let (table, columns) = (table(profiles), columns(profiles));
        let sql = format!("select {columns} from {table} l where l.id > $1 order by l.id limit $2");
        let query = sqlx::query_as::<_, T>(sqlx::AssertSqlSafe(sql))
            .bind(above)
            .bind(limit);
        self.0.run(query.fetch_all(self.0.pool())).await
    }

    async fn within<T>(&self, profiles: bool, ranges: &[(i64, i64)]) -> Result<Vec<T>, StoreError>
    where
        T: for<'r> FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        self.0
            .log_rows_within(table(profiles), columns(profiles), ranges)
            .await
    }

    /// Deletes what no cache can need any more: session rows past the session's expiry, profile
    /// rows older than `profile_retention`, and cursors untouched for `cursor_retention`
    /// (namespaces gone). The rules that keep rows from older releases' deletes let this through.
    pub async fn purge(
        &self,
        profile_retention: std::time::Duration,
        cursor_retention: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let mut tx = self.0.run(self.0.pool().begin()).await?;
        let allow = sqlx::query("select set_config('authd.purge', 'on', true)");
        self.0.run(allow.execute(&mut *tx)).await?;
        let sessions = sqlx::query(
            "delete from session_invalidations where id in (
                 select id from session_invalidations where expires_at < clock_timestamp()
                 limit 10000)",
        );
        let mut deleted = self
            .0
            .run(sessions.execute(&mut *tx))
            .await?
            .rows_affected();
        let profiles = sqlx::query(
            "delete from profile_invalidations where id in (
                 select id from profile_invalidations
                 where created_at < clock_timestamp() - $1::bigint * interval '1 microsecond'
                 limit 10000)",
        )
        .bind(super::micros(profile_retention));
        deleted += self
            .0
            .run(profiles.execute(&mut *tx))
            .await?
            .rows_affected();
        let cursors = sqlx::query(
            "delete from outbox_cursors
             where updated_at < clock_timestamp() - $1::bigint * interval '1 microsecond'",
        )
        .bind(super::micros(cursor_retention));
        self.0.run(cursors.execute(&mut *tx)).await?;
        self.0.run(tx.commit()).await?;
        Ok(deleted)
    }
}

fn table(profiles: bool) -> &'static str {
    if profiles {
        "profile_invalidations"
    } else {
        "session_invalidations"
    }
}

fn columns(profiles: bool) -> &'static str {
    if profiles {
        "l.id, l.user_id, l.version, l.created_at"
    } else {
        "l.id, l.token_hash, l.user_id, l.expires_at, l.created_at"
    }
}

/// How long before a cursor readers look again: longer than any transaction writing these logs
/// can last (see the module comment), given `query_timeout`.
pub fn in_flight(query_timeout: std::time::Duration) -> TimeDelta {
    TimeDelta::from_std(query_timeout * 10).unwrap_or(TimeDelta::MAX) + TimeDelta::seconds(1)
}
