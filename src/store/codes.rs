//! `account_codes`: the single-use codes of the account flows (see `auth::recovery`). A code is
//! stored only as its SHA-256, bound to its flow and its account, and used at most once: the
//! statement that uses it is the one that checks it, so of two completions of one code exactly
//! one finds it unused.
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, Reason, Revocation, Since, StoreError, micros};

/// How long past its expiry a code that completed its flow still answers a retry of that
/// completion (a retry after a lost answer comes within seconds; a deadline is at most minutes).
pub const RETRY_GRACE: Duration = Duration::from_secs(600);

/// The flows whose codes are stored here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    PasswordReset,
    EmailVerification,
    EmailChange,
    /// A login's second-factor challenge (see `second_factor`).
    SecondFactor,
}

impl Flow {
    pub fn as_str(self) -> &'static str {
        match self {
            Flow::PasswordReset => "password_reset",
            Flow::EmailVerification => "email_verification",
            Flow::EmailChange => "email_change",
            Flow::SecondFactor => "second_factor",
        }
    }
}

/// What a code's lookup finds: its account, and whether (and how) it was used.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredCode {
    pub user_id: Uuid,
    pub used: bool,
    /// It completed its flow (it was not merely voided by another code's completion).
    pub completed: bool,
    /// Sessions its completion revoked.
    pub revoked: i32,
    /// The password its completion set is still the account's.
    pub still_current: bool,
    /// The account's current PHC hash, its email (normalised) and display name.
    pub password_hash: String,
    pub email: String,
    pub display_name: String,
}

/// What completing a password reset did.
pub struct Reset {
    pub user_id: Uuid,
    pub revocation: Revocation,
}

pub struct CodeRepo<'a>(pub(super) &'a Db);

impl Db {
    pub fn codes(&self) -> CodeRepo<'_> {
        CodeRepo(self)
    }
}

impl CodeRepo<'_> {
    /// Stores a code of `flow` for the enabled account with this normalised email, valid for
    /// `ttl`; the account, or `None` (no such account, or a disabled one). The same statement
    /// whichever it is, writing the same row (without an account when there is none: it
    /// completes nothing, and goes with the expired codes), so that both take the same time.
    pub async fn issue(
        &self,
        email_normalized: &str,
        flow: Flow,
        code_hash: &[u8],
        ttl: Duration,
    ) -> Result<Option<Uuid>, StoreError> {
        let query = sqlx::query_scalar::<_, Option<Uuid>>(
            "insert into account_codes (code_hash, flow, user_id, expires_at, email_normalized)
             select $1, $2, u.id, clock_timestamp() + $3::bigint * interval '1 microsecond',
                    u.email_normalized
             from (select 1) as one
             left join users u on u.email_normalized = $4 and u.disabled_at is null
             returning user_id",
        )
        .bind(code_hash)
        .bind(flow.as_str())
        .bind(micros(ttl))
        .bind(email_normalized);
        self.0.run(query.fetch_one(self.0.pool())).await
    }

    /// Stores a code of `flow` for this enabled account (an operator's reset, a login that must
    /// change its password); `false`: no such account, or a disabled one.
    pub async fn issue_for(
        &self,
        user_id: Uuid,
        flow: Flow,
        code_hash: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let query = sqlx::query(
            "insert into account_codes (code_hash, flow, user_id, expires_at)
             select $1, $2, id, clock_timestamp() + $3::bigint * interval '1 microsecond'
             from users where id = $4 and disabled_at is null",
        )
        .bind(code_hash)
        .bind(flow.as_str())
        .bind(micros(ttl))
        .bind(user_id);
        Ok(self
            .0
            .run(query.execute(self.0.pool()))
            .await?
            .rows_affected()
            == 1)
    }

    /// The unexpired code of `flow` with this hash, used or not (one that completed its flow
    /// also for [`RETRY_GRACE`] past its expiry), with what a completion checks of its account.
    pub async fn find(
        &self,
        code_hash: &[u8],
        flow: Flow,
    ) -> Result<Option<StoredCode>, StoreError> {
        let query = sqlx::query_as::<_, StoredCode>(
            "select c.user_id, c.used_at is not null as used,
                    c.completed_at is not null as completed, c.revoked,
                    c.completed_with is not distinct from
                        sha256(convert_to(u.password_hash, 'UTF8')) as still_current,
                    u.password_hash, u.email_normalized as email,
                    coalesce(p.display_name, '') as display_name
             from account_codes c
             join users u on u.id = c.user_id
             left join profiles p on p.user_id = c.user_id
             where c.code_hash = $1 and c.flow = $2 and u.disabled_at is null
               and (c.expires_at > clock_timestamp()
                    or c.completed_at > clock_timestamp() - $3::bigint * interval '1 microsecond')",
        )
        .bind(code_hash)
        .bind(flow.as_str())
        .bind(micros(RETRY_GRACE));
        self.0.run(query.fetch_optional(self.0.pool())).await
    }

    /// Completes a password reset in one transaction: uses the code (unexpired and unused, else
    /// `None` and nothing changes), sets the new password hash, clears the failed logins,
    /// revokes every session of the account, and voids the account's other reset codes.
    pub async fn reset_password(
        &self,
        code_hash: &[u8],
        password_hash: &str,
        now: DateTime<Utc>,
        since: Since,
    ) -> Result<Option<Reset>, StoreError> {
        self.0
            .retrying(|| async {
                let mut tx = self.0.run(self.0.pool().begin()).await?;
                // The account first, as every statement that changes several of its sessions.
                let owner = sqlx::query_scalar::<_, Uuid>(
                    "select u.id from account_codes c join users u on u.id = c.user_id
                     where c.code_hash = $1 and c.flow = $2
                     for update of u",
                )
                .bind(code_hash)
                .bind(Flow::PasswordReset.as_str());
                let Some(user_id) = self.0.run(owner.fetch_optional(&mut *tx)).await? else {
                    return Ok(None);
                };
                let used = sqlx::query_scalar::<_, Uuid>(
                    "update account_codes set used_at = clock_timestamp(),
                                              completed_at = clock_timestamp(),
                                              completed_with = sha256(convert_to($4, 'UTF8'))
                     where code_hash = $1 and flow = $2 and used_at is null
                       and expires_at > clock_timestamp()
                       and exists (select 1 from users u
                                   where u.id = $3 and u.disabled_at is null
                                     and (account_codes.email_normalized is null
                                          or account_codes.email_normalized = u.email_normalized))
                     returning user_id",
                )
                .bind(code_hash)
                .bind(Flow::PasswordReset.as_str())
                .bind(user_id)
                .bind(password_hash);
                if self.0.run(used.fetch_optional(&mut *tx)).await?.is_none() {
                    return Ok(None);
                }
                let revocation = self
                    .0
                    .users()
                    .replace_password_in(
                        &mut tx,
                        user_id,
                        (password_hash, now),
                        None,
                        Reason::PasswordReset,
                        since,
                    )
                    .await?;
                let record =
                    sqlx::query("update account_codes set revoked = $2 where code_hash = $1")
                        .bind(code_hash)
                        .bind(i32::try_from(revocation.active).unwrap_or(i32::MAX));
                self.0.run(record.execute(&mut *tx)).await?;
                self.0.run(tx.commit()).await?;
                Ok(Some(Reset {
                    user_id,
                    revocation,
                }))
            })
            .await
    }

    /// Voids every unused code of the account, inside a transaction that holds its row (a
    /// password change, a completed reset, the account disabled: a code issued before must not
    /// outlive them).
    pub(super) async fn void_in(
        &self,
        tx: &mut sqlx::PgConnection,
        user_id: Uuid,
    ) -> Result<(), StoreError> {
        let void = sqlx::query(
            "update account_codes set used_at = clock_timestamp()
             where user_id = $1 and used_at is null",
        )
        .bind(user_id);
        self.0.run(void.execute(tx)).await?;
        Ok(())
    }

    /// Deletes codes that expired (those that completed, [`RETRY_GRACE`] later), skipping rows
    /// a completion holds; how many.
    pub async fn purge(&self, batch: i64) -> Result<u64, StoreError> {
        let query = sqlx::query(
            "delete from account_codes where code_hash in (
                 select code_hash from account_codes
                 where expires_at < clock_timestamp()
                   and (completed_at is null
                        or completed_at < clock_timestamp() - $2::bigint * interval '1 microsecond')
                 limit $1
                 for update skip locked)",
        )
        .bind(batch)
        .bind(micros(RETRY_GRACE));
        Ok(self
            .0
            .run(query.execute(self.0.pool()))
            .await?
            .rows_affected())
    }
}
