//! Sessions. Every statement that revokes also queues the Redis invalidations in the same
//! statement (see `outbox`), and answers with every invalidation of the user still queued, so a
//! retried revocation re-applies what an earlier attempt committed but never confirmed.
//!
//! Deadlines are judged by PostgreSQL's clock (`clock_timestamp()`, read when the row is locked,
//! not when the statement started), and statements that revoke several sessions of a user first
//! lock the user's row: they serialise per user instead of deadlocking on each other's session
//! rows (ChangePassword against a login at the session cap, two logins at the cap).
use chrono::{DateTime, Utc};
use sqlx::{FromRow, postgres::PgRow};
use uuid::Uuid;

use super::{Db, Reason, Revocation, StoreError, micros, second_factor::Refusal};

/// What a revoking statement needs besides its target: the idle timeout (to tell which revoked
/// sessions were still active) and from when earlier invalidations of its target still matter:
/// an instance may still hold a copy in memory (the wait horizon of `crate::local`), or they
/// may not have reached this instance's Redis cache yet.
#[derive(Debug, Clone, Copy)]
pub struct Since {
    pub idle: std::time::Duration,
    pub pending_after: DateTime<Utc>,
}
use crate::model::SessionRecord;

/// At most this many earlier invalidations come back with a revocation (`limit` below).
pub(super) const EARLIER_ROWS: usize = 1000;

/// Revokes the sessions matching `$cond` (with `$1` the idle timeout in microseconds), queues
/// their invalidations, and returns them with the earlier invalidations matching `$pending` logged
/// after `$2` (see [`Since`]). `active` tells whether a revoked session was still usable.
macro_rules! revoke {
    ($cond:literal, $pending:literal, $events:expr) => {
        concat!(
            "with revoked as (
                 update sessions set revoked_at = clock_timestamp()
                 where revoked_at is null and ",
            $cond,
            " returning id, token_hash, user_id, absolute_expires_at,
                    absolute_expires_at > clock_timestamp()
                    and last_seen_at > clock_timestamp() - $1::bigint * interval '1 microsecond'
                    as active
             ), ",
            $events,
            queue!(),
            " union all (",
            earlier!($pending),
            ")"
        )
    };
}

/// The event stream's row of each session `revoked` revoked (`change_events`), `$reason` an
/// SQL expression.
macro_rules! session_events {
    ($reason:literal) => {
        concat!(
            "evented as (
                 insert into change_events (kind, user_id, session_id, reason)
                 select 'session_revoked', user_id, id, ",
            $reason,
            " from revoked
             ), "
        )
    };
}

/// The event stream's one row for a revocation of every session of user `$3` but `$4`
/// (reason `$5`), when it revoked any: the sessions created at or before the cutoff. The
/// cutoff is PostgreSQL's time, or later: never before a session's own `created_at` (the
/// service's clock), so no session it revoked is outside it.
macro_rules! user_events {
    () => {
        "evented as (
             insert into change_events (kind, user_id, reason, cutoff, kept_session)
             select 'sessions_revoked', $3, $5,
                    greatest(clock_timestamp(),
                             (select max(created_at) from sessions where user_id = $3)),
                    $4
             where exists (select 1 from revoked)
         ), "
    };
}

/// The invalidations matching `$pending` logged after `$2`, newest first and at most
/// [`EARLIER_ROWS`].
macro_rules! earlier {
    ($pending:literal) => {
        concat!(
            "select id, token_hash, user_id, expires_at, created_at, false, false
             from session_invalidations
             where created_at > $2::timestamptz and ",
            $pending,
            " order by created_at desc limit 1000"
        )
    };
}

/// The `queued` CTE and the select of what `revoked` produced.
macro_rules! queue {
    () => {
        "queued as (
             insert into session_invalidations (token_hash, user_id, expires_at, evented)
             select token_hash, user_id, absolute_expires_at, true from revoked
             returning id, token_hash, user_id, expires_at, created_at
         )
         select q.id, q.token_hash, q.user_id, q.expires_at, q.created_at, true as fresh, r.active
         from queued q join revoked r on r.token_hash = q.token_hash"
    };
}

/// Active: not revoked, before the absolute deadline, used within the idle timeout (`$1`, µs).
macro_rules! active {
    () => {
        "revoked_at is null and absolute_expires_at > clock_timestamp()
         and last_seen_at > clock_timestamp() - $1::bigint * interval '1 microsecond'"
    };
}

/// [`active!`] as a constant, for statements built at run time (`$1`: the idle timeout in µs).
pub(super) const ACTIVE: &str = active!();

/// A session's columns (from `sessions`), with its account's email verification.
pub(super) const COLUMNS: &str = "id, user_id, created_at, last_seen_at, absolute_expires_at, \
    authenticated_at, ip_address, user_agent, revoked_at, aal, \
    (select u.email_verified_at from users u where u.id = sessions.user_id) as email_verified_at";

/// What a touch re-reads: the activity it recorded, the account's email verification, and the
/// session's level (a copy of an earlier release lacks it).
#[derive(Debug, sqlx::FromRow)]
pub struct Touched {
    pub last_seen_at: DateTime<Utc>,
    pub email_verified_at: Option<DateTime<Utc>>,
    pub aal: i16,
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
                email_verified_at: row.try_get("email_verified_at")?,
                aal: u8::try_from(row.try_get::<i16, _>("aal")?).unwrap_or(1),
            },
            revoked: revoked_at.is_some(),
        })
    }
}

#[derive(Clone, Copy)]
pub struct SessionRepo<'a>(pub(super) &'a Db);

impl Db {
    pub fn sessions(&self) -> SessionRepo<'_> {
        SessionRepo(self)
    }
}

/// What a login needs to store its session.
pub struct NewSession<'a> {
    pub record: &'a SessionRecord,
    pub token_hash: &'a [u8],
    /// The key the token was minted under (`token_keys`).
    pub key_id: u32,
    /// What proved the account's owner: the session is stored only if it still holds.
    pub proof: Proof<'a>,
    pub max_per_user: i64,
    /// The client (hashed) to remember as trusted for this account, if any.
    pub client: Option<&'a [u8]>,
}

/// A stored session: the sessions its insert evicted (at the cap) and the account's email
/// verification; or why the proof no longer holds.
pub type Inserted = Result<(Revocation, Option<DateTime<Utc>>), Refusal>;

/// What a new session is stored on.
#[derive(Debug, Clone, Copy)]
pub enum Proof<'a> {
    /// The PHC hash the password was verified against: it must still be the account's.
    Password(&'a str),
    /// A login challenge and the code that completes it: checked and used by the transaction
    /// that stores the session (see `second_factor`).
    SecondFactor(super::second_factor::Attempt<'a>),
}

/// Trusted clients kept per account (the most recent).
const TRUSTED_PER_USER: i64 = 20;

impl SessionRepo<'_> {
    /// Inserts a new session, if the user's password hash is still the verified one and the
    /// account is not disabled, and in the same transaction revokes the user's least recently
    /// used active sessions beyond `max_per_user` (counting the new one). `None` when the password
    /// changed or the account was disabled meanwhile (nothing is written). The user row is locked
    /// first, so a concurrent ChangePassword or DisableUser either sees this session (and revokes
    /// it) or wins first, and an email verification either lists it or is what it reads: with the
    /// account's `email_verified_at` under that lock.
    pub async fn insert_capped(
        &self,
        s: &NewSession<'_>,
        since: Since,
    ) -> Result<Inserted, StoreError> {
        self.0.retrying(|| self.insert_capped_once(s, since)).await
    }

    async fn insert_capped_once(
        &self,
        s: &NewSession<'_>,
        since: Since,
    ) -> Result<Inserted, StoreError> {
        let r = s.record;
        let mut tx = self.0.run(self.0.pool().begin()).await?;
        let locked = self.0.users().lock_for_login(&mut tx, r.user_id).await?;
        let Some((password_hash, email_verified_at)) = locked else {
            return Ok(Err(Refusal::Gone));
        };
        let proven = match s.proof {
            Proof::Password(verified) if password_hash == verified => {
                // A factor confirmed while the password was being checked: the login must go
                // through its challenge (the confirmation held this row).
                match self
                    .0
                    .second_factor()
                    .confirmed_in(&mut tx, r.user_id)
                    .await?
                {
                    true => Err(Refusal::FactorRequired),
                    false => Ok(()),
                }
            }
            Proof::Password(_) => Err(Refusal::Gone),
            Proof::SecondFactor(attempt) => {
                self.0
                    .second_factor()
                    .complete_in(&mut tx, r.user_id, attempt)
                    .await?
            }
        };
        if let Err(refusal) = proven {
            // What the check counted (a wrong code) or used (a right one, when the account must
            // change its password first) stays.
            self.0.run(tx.commit()).await?;
            return Ok(Err(refusal));
        }
        let query = sqlx::query_as::<_, super::outbox::QueuedRow>(concat!(
            "with new_session as (
                 insert into sessions (id, user_id, token_hash, created_at, last_seen_at,
                                       absolute_expires_at, authenticated_at, ip_address, user_agent,
                                       key_id, aal)
                 values ($9, $3, $4, $5, $5, $6, $5, $7, $8, $11, $12)
             ), ",
            // The new row is invisible to the rest of the statement: keep max - 1 others.
            "least_recent as (
                 select id from sessions where user_id = $3 and ",
            active!(),
            " order by last_seen_at desc, created_at desc offset $10
             ), revoked as (
                 update sessions set revoked_at = clock_timestamp()
                 where id in (select id from least_recent) and revoked_at is null
                 returning id, token_hash, user_id, absolute_expires_at, true as active
             ), ",
            session_events!("'session_limit'"),
            queue!(),
            " union all (",
            earlier!("user_id = $3"),
            ")"
        ))
        .bind(micros(since.idle))
        .bind(since.pending_after)
        .bind(r.user_id)
        .bind(s.token_hash)
        .bind(r.created_at)
        .bind(r.absolute_expires_at)
        .bind(&r.ip_address)
        .bind(&r.user_agent)
        .bind(r.id)
        .bind((s.max_per_user - 1).max(0))
        .bind(i64::from(s.key_id))
        .bind(i16::from(r.aal));
        let rows = self.0.run(query.fetch_all(&mut *tx)).await?;
        self.signed_in(&mut tx, r.user_id, s.client, r.aal).await?;
        self.0.run(tx.commit()).await?;
        Ok(Ok((Revocation::from_rows(rows), email_verified_at)))
    }

    /// A correct password: the count of wrong ones starts over, the login is recorded, and the
    /// client is trusted for the account from now on (the most recent [`TRUSTED_PER_USER`] are
    /// kept), at the level of this sign-in (`aal`: see the second factor's migration).
    async fn signed_in(
        &self,
        tx: &mut sqlx::PgConnection,
        user_id: Uuid,
        client: Option<&[u8]>,
        aal: u8,
    ) -> Result<(), StoreError> {
        let reset = sqlx::query(
            "update users set failed_logins = 0, last_login_at = clock_timestamp() where id = $1",
        )
        .bind(user_id);
        self.0.run(reset.execute(&mut *tx)).await?;
        let Some(client) = client else {
            return Ok(());
        };
        let trust = sqlx::query(
            "with trusted as (
                 insert into trusted_clients (user_id, client_hash, last_success_at, aal)
                 values ($1, $2, clock_timestamp(), $4)
                 on conflict (user_id, client_hash)
                 do update set last_success_at = excluded.last_success_at, aal = excluded.aal
             )
             delete from trusted_clients where user_id = $1 and client_hash in (
                 select client_hash from trusted_clients where user_id = $1 and client_hash <> $2
                 order by last_success_at desc offset $3)",
        )
        .bind(user_id)
        .bind(client)
        .bind(TRUSTED_PER_USER - 1)
        .bind(i16::from(aal));
        self.0.run(trust.execute(&mut *tx)).await?;
        Ok(())
    }

    /// The user's active sessions, newest first.
    pub async fn list_active(
        &self,
        user_id: Uuid,
        idle: std::time::Duration,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let sql = format!(
            "select {COLUMNS} from sessions where user_id = $2 and {} \
             order by created_at desc, id desc",
            active!()
        );
        let query = sqlx::query_as::<_, StoredSession>(sqlx::AssertSqlSafe(sql))
            .bind(micros(idle))
            .bind(user_id);
        let rows = self.0.run(query.fetch_all(self.0.pool())).await?;
        Ok(rows.into_iter().map(|s| s.record).collect())
    }

    /// Revokes one of the user's sessions (`reason`: what the event stream says).
    pub async fn revoke_by_id(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        reason: Reason,
        since: Since,
    ) -> Result<Revocation, StoreError> {
        let query = sqlx::query_as::<_, super::outbox::QueuedRow>(revoke!(
            "user_id = $3 and id = $4",
            "user_id = $3",
            session_events!("$5")
        ))
        .bind(micros(since.idle))
        .bind(since.pending_after)
        .bind(user_id)
        .bind(session_id)
        .bind(reason.as_str());
        let rows = self.0.run(query.fetch_all(self.0.pool())).await?;
        Ok(Revocation::from_rows(rows))
    }

    /// Whether this session (in any state) belongs to this user.
    pub async fn belongs_to(&self, user_id: Uuid, session_id: Uuid) -> Result<bool, StoreError> {
        let query = sqlx::query_scalar::<_, bool>(
            "select exists (select 1 from sessions where id = $1 and user_id = $2)",
        )
        .bind(session_id)
        .bind(user_id);
        self.0.run(query.fetch_one(self.0.pool())).await
    }

    /// Revokes every session of the user not yet revoked, whatever its expiry (so that no later
    /// setting change or racing touch can bring one back), except `keep`.
    pub async fn revoke_all(
        &self,
        user_id: Uuid,
        keep: Option<Uuid>,
        reason: Reason,
        since: Since,
    ) -> Result<Revocation, StoreError> {
        self.0
            .retrying(|| async {
                let mut tx = self.0.run(self.0.pool().begin()).await?;
                self.0.users().lock_password(&mut tx, user_id).await?;
                let revoked = self
                    .revoke_all_in(&mut tx, user_id, keep, reason, since)
                    .await?;
                self.0.run(tx.commit()).await?;
                Ok(revoked)
            })
            .await
    }

    /// Revokes nothing: the user's invalidations logged since `since`, which a call that found
    /// its work done by an earlier attempt waits for as if it had made them.
    pub async fn pending_of_user(
        &self,
        user_id: Uuid,
        since: Since,
    ) -> Result<Revocation, StoreError> {
        let query = sqlx::query_as::<_, super::outbox::QueuedRow>(concat!(
            "select id, token_hash, user_id, expires_at, created_at, fresh, active from (",
            earlier!("user_id = $1"),
            ") as earlier (id, token_hash, user_id, expires_at, created_at, fresh, active)"
        ))
        .bind(user_id)
        .bind(since.pending_after);
        let rows = self.0.run(query.fetch_all(self.0.pool())).await?;
        Ok(Revocation::from_rows(rows))
    }

    /// [`SessionRepo::revoke_all`] inside a transaction that holds the user's row.
    pub(super) async fn revoke_all_in(
        &self,
        tx: &mut sqlx::PgConnection,
        user_id: Uuid,
        keep: Option<Uuid>,
        reason: Reason,
        since: Since,
    ) -> Result<Revocation, StoreError> {
        let query = sqlx::query_as::<_, super::outbox::QueuedRow>(revoke!(
            "user_id = $3 and id is distinct from $4",
            "user_id = $3",
            user_events!()
        ))
        .bind(micros(since.idle))
        .bind(since.pending_after)
        .bind(user_id)
        .bind(keep)
        .bind(reason.as_str());
        let rows = self.0.run(query.fetch_all(tx)).await?;
        Ok(Revocation::from_rows(rows))
    }

    pub async fn find_by_token_hash(
        &self,
        token_hash: &[u8],
    ) -> Result<Option<StoredSession>, StoreError> {
        let sql = format!("select {COLUMNS} from sessions where token_hash = $1");
        let query = sqlx::query_as::<_, StoredSession>(sqlx::AssertSqlSafe(sql)).bind(token_hash);
        self.0.run(query.fetch_optional(self.0.pool())).await
    }

    /// Records activity now (PostgreSQL's time when the row is locked) unless the session was
    /// revoked or has expired (an expired session is never revived, however long the statement
    /// waited for the row); `None` means the caller must not accept the session. With the
    /// account's email verification as it is now (a cached copy catches up at each touch).
    pub async fn touch(
        &self,
        id: Uuid,
        idle: std::time::Duration,
    ) -> Result<Option<Touched>, StoreError> {
        let sql = format!(
            "update sessions set last_seen_at = greatest(last_seen_at, clock_timestamp())
             where id = $2 and {}
             returning last_seen_at,
                       (select u.email_verified_at from users u where u.id = sessions.user_id),
                       aal",
            active!()
        );
        let query = sqlx::query_as::<_, Touched>(sqlx::AssertSqlSafe(sql))
            .bind(micros(idle))
            .bind(id);
        self.0.run(query.fetch_optional(self.0.pool())).await
    }

    /// Revokes the session of this token (if it is not already) and returns its invalidations
    /// logged since `since`, a fresh one included.
    pub async fn revoke_by_token_hash(
        &self,
        token_hash: &[u8],
        since: Since,
    ) -> Result<Revocation, StoreError> {
        let query = sqlx::query_as::<_, super::outbox::QueuedRow>(revoke!(
            "token_hash = $3",
            "token_hash = $3",
            session_events!("'logout'")
        ))
        .bind(micros(since.idle))
        .bind(since.pending_after)
        .bind(token_hash);
        let rows = self.0.run(query.fetch_all(self.0.pool())).await?;
        Ok(Revocation::from_rows(rows))
    }

    /// Sessions neither revoked nor expired (idle expiry judged with `idle`).
    pub async fn count_live(&self, idle: std::time::Duration) -> Result<i64, StoreError> {
        let sql = format!("select count(*) from sessions where {}", active!());
        let query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(micros(idle));
        self.0.run(query.fetch_one(self.0.pool())).await
    }

    /// Deletes sessions revoked or expired more than `retention` ago (idle expiry judged with
    /// `idle`), by PostgreSQL's clock. One short statement of at most `batch` rows that skips
    /// rows locked by requests.
    pub async fn purge(
        &self,
        retention: std::time::Duration,
        idle: std::time::Duration,
        batch: i64,
    ) -> Result<u64, StoreError> {
        let query = sqlx::query(
            "with doomed as (
                 select id from sessions
                 where revoked_at < clock_timestamp() - $1::bigint * interval '1 microsecond'
                    or absolute_expires_at < clock_timestamp() - $1::bigint * interval '1 microsecond'
                    or last_seen_at < clock_timestamp()
                         - ($1::bigint + $2::bigint) * interval '1 microsecond'
                 limit $3 for update skip locked
             )
             delete from sessions where id in (select id from doomed)",
        )
        .bind(micros(retention))
        .bind(micros(idle))
        .bind(batch);
        let done = self.0.run(query.execute(self.0.pool())).await?;
        Ok(done.rows_affected())
    }
}
