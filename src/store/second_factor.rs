//! The second factor's rows: an account's TOTP secret (`totp_credentials`), its recovery codes
//! (`recovery_codes`, only their SHA-256), and the login challenges (`account_codes` of the
//! `second_factor` flow). See `auth::second_factor` for the rules.
//!
//! Every code is checked and used in a transaction that holds the account's row (as every
//! statement that changes its sessions or its password does): a TOTP code raises the account's
//! `last_used_step` to its own step (a code of that step or an earlier one is then wrong), a
//! recovery code sets its `used_at`, a challenge its `used_at`. A login's three (the challenge,
//! the code, the new session) are taken in one such transaction, so of two completions exactly
//! one wins, one that loses counts nothing, and the caps on wrong codes (per challenge, and per
//! factor since its last right code) are never overshot by concurrent guesses.
use std::time::Duration;

use uuid::Uuid;

use super::{Db, StoreError, micros};

/// An account's TOTP secret as stored.
#[derive(Debug, sqlx::FromRow)]
pub struct StoredTotp {
    pub secret: Vec<u8>,
    pub confirmed: bool,
}

/// An unused, unexpired login challenge with an attempt left, and what its completion checks of
/// the account before it pays for the attempt.
#[derive(Debug, sqlx::FromRow)]
pub struct Challenge {
    pub user_id: Uuid,
    pub email_normalized: String,
    /// The client the account trusted at the login (its guess bucket, and its exemption from
    /// the account's lockout), if any.
    pub trusted_client: Option<Vec<u8>>,
    /// That client signed in with the factor: it is spared the factor's own cap too.
    pub trusted_with_factor: bool,
    pub failed_logins: i32,
}

/// A code of the account's second factor, as presented.
#[derive(Debug, Clone, Copy)]
pub enum Code<'a> {
    /// Six digits, judged at `now` (Unix seconds; see `model::totp`).
    Totp { digits: &'a str, now: i64 },
    /// A recovery code's hash.
    Recovery(&'a [u8]),
}

/// A code to check under the account's lock, and after how many wrong ones since the last right
/// one the factor refuses checks (`None`: never, for a client the account trusts, or no cap).
#[derive(Debug, Clone, Copy)]
pub struct Check<'a> {
    pub code: Code<'a>,
    pub max_failures: Option<i32>,
}

/// A login's completion: its challenge (hash), which takes at most `max_attempts` wrong codes.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    pub challenge: &'a [u8],
    pub max_attempts: i32,
    pub check: Check<'a>,
}

/// Why a code was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Nothing to check it against any more: the challenge is used, expired or void, the
    /// account has no confirmed factor, or the password it was issued for is no longer the
    /// account's. Nothing is counted.
    Gone,
    /// A password-only login found a second factor confirmed while it checked the password:
    /// it must answer a challenge instead.
    FactorRequired,
    /// A wrong or used code: counted against the challenge and the factor.
    Wrong,
    /// The factor refuses checks: too many wrong codes since the last right one.
    Locked,
    /// The code was right and is used up, with the challenge, but the account must change its
    /// password before it gets a session.
    ChangeRequired,
}

pub struct SecondFactorRepo<'a>(pub(super) &'a Db);

impl Db {
    pub fn second_factor(&self) -> SecondFactorRepo<'_> {
        SecondFactorRepo(self)
    }
}

impl SecondFactorRepo<'_> {
    /// Stores a new, unconfirmed secret for the account (replacing an unconfirmed one); `false`
    /// when the account has a confirmed one already.
    pub async fn enroll(&self, user_id: Uuid, secret: &[u8]) -> Result<bool, StoreError> {
        let query = sqlx::query(
            "insert into totp_credentials (user_id, secret) values ($1, $2)
             on conflict (user_id) do update
                 set secret = excluded.secret, created_at = clock_timestamp(), last_used_step = 0
                 where totp_credentials.confirmed_at is null",
        )
        .bind(user_id)
        .bind(secret);
        let done = self.0.run(query.execute(self.0.pool())).await?;
        Ok(done.rows_affected() == 1)
    }

    /// The account's secret, confirmed or not.
    pub async fn find(&self, user_id: Uuid) -> Result<Option<StoredTotp>, StoreError> {
        let query = sqlx::query_as::<_, StoredTotp>(
            "select secret, confirmed_at is not null as confirmed
             from totp_credentials where user_id = $1",
        )
        .bind(user_id);
        self.0.run(query.fetch_optional(self.0.pool())).await
    }

    /// Confirms the unconfirmed `secret` with a code of `step`, and stores the recovery codes
    /// (their hashes), in one transaction; `false` when that secret is no longer the account's
    /// unconfirmed one (confirmed already, replaced, or removed).
    pub async fn confirm(
        &self,
        user_id: Uuid,
        secret: &[u8],
        step: i64,
        recovery: &[[u8; 32]],
    ) -> Result<bool, StoreError> {
        self.0
            .retrying(|| async {
                let mut tx = self.0.run(self.0.pool().begin()).await?;
                // The account first, as every change to its factor: a password-only login either
                // stored its session before, or sees the factor (`confirmed_in`).
                self.0.users().lock_for_login(&mut tx, user_id).await?;
                let confirm = sqlx::query(
                    "update totp_credentials
                     set confirmed_at = clock_timestamp(), last_used_step = $3
                     where user_id = $1 and secret = $2 and confirmed_at is null",
                )
                .bind(user_id)
                .bind(secret)
                .bind(step);
                if self.0.run(confirm.execute(&mut *tx)).await?.rows_affected() != 1 {
                    return Ok(false);
                }
                self.untrust_in(&mut tx, user_id).await?;
                self.replace_recovery_in(&mut tx, user_id, recovery).await?;
                self.0.run(tx.commit()).await?;
                Ok(true)
            })
            .await
    }

    /// Replaces the account's recovery codes once `check` passes, in one transaction that
    /// holds the account's row (a wrong code is counted).
    pub async fn regenerate(
        &self,
        user_id: Uuid,
        check: Check<'_>,
        recovery: &[[u8; 32]],
    ) -> Result<Result<(), Refusal>, StoreError> {
        self.0
            .retrying(|| async {
                let mut tx = self.0.run(self.0.pool().begin()).await?;
                self.0.users().lock_for_login(&mut tx, user_id).await?;
                let checked = self.check_in(&mut tx, user_id, check).await?;
                if checked.is_ok() {
                    self.replace_recovery_in(&mut tx, user_id, recovery).await?;
                }
                self.0.run(tx.commit()).await?;
                Ok(checked)
            })
            .await
    }

    /// Removes the account's second factor (its secret and recovery codes) and voids its open
    /// login challenges, in one transaction that holds the account's row — once `check` passes
    /// (a wrong code is counted), or unconditionally for `None` (an operator); whether there was
    /// a confirmed second factor to remove.
    pub async fn remove(
        &self,
        user_id: Uuid,
        check: Option<Check<'_>>,
    ) -> Result<Result<bool, Refusal>, StoreError> {
        self.0
            .retrying(|| async {
                let mut tx = self.0.run(self.0.pool().begin()).await?;
                self.0.users().lock_for_login(&mut tx, user_id).await?;
                if let Some(check) = check
                    && let Err(refusal) = self.check_in(&mut tx, user_id, check).await?
                {
                    self.0.run(tx.commit()).await?;
                    return Ok(Err(refusal));
                }
                let removed = sqlx::query_scalar::<_, bool>(
                    "with recovery as (delete from recovery_codes where user_id = $1),
                          challenges as (
                              update account_codes set used_at = clock_timestamp()
                              where user_id = $1 and flow = 'second_factor' and used_at is null)
                     delete from totp_credentials where user_id = $1
                     returning confirmed_at is not null",
                )
                .bind(user_id);
                let removed = self.0.run(removed.fetch_optional(&mut *tx)).await?;
                self.untrust_in(&mut tx, user_id).await?;
                self.0.run(tx.commit()).await?;
                Ok(Ok(removed.unwrap_or(false)))
            })
            .await
    }

    /// Stores a login challenge for the account, valid for `ttl` — only while `verified_hash`
    /// (the password the login checked) is still the account's and the account is enabled: the
    /// statement waits for a password change or a DisableUser holding the account's row, which
    /// otherwise voids the challenge (`codes::void_in`) once it is stored. `false`: not stored.
    pub async fn issue_challenge(
        &self,
        user_id: Uuid,
        code_hash: &[u8],
        (ttl, verified_hash): (Duration, &str),
        (trusted_client, with_factor): (Option<&[u8]>, bool),
    ) -> Result<bool, StoreError> {
        let query = sqlx::query(
            "insert into account_codes (code_hash, flow, user_id, expires_at, trusted_client,
                                        trusted_with_factor)
             select $1, 'second_factor', u.id,
                    clock_timestamp() + $3::bigint * interval '1 microsecond', $4, $6
             from users u
             where u.id = $2 and u.password_hash = $5 and u.disabled_at is null
             for share",
        )
        .bind(code_hash)
        .bind(user_id)
        .bind(micros(ttl))
        .bind(trusted_client)
        .bind(verified_hash)
        .bind(with_factor && trusted_client.is_some());
        let done = self.0.run(query.execute(self.0.pool())).await?;
        Ok(done.rows_affected() == 1)
    }

    /// The unused, unexpired challenge with this hash and an attempt left, of an enabled
    /// account.
    pub async fn challenge(
        &self,
        code_hash: &[u8],
        max_attempts: i32,
    ) -> Result<Option<Challenge>, StoreError> {
        let query = sqlx::query_as::<_, Challenge>(
            "select c.user_id, u.email_normalized, c.trusted_client, c.trusted_with_factor,
                    u.failed_logins
             from account_codes c join users u on u.id = c.user_id
             where c.code_hash = $1 and c.flow = 'second_factor' and c.used_at is null
               and c.expires_at > clock_timestamp() and c.failures < $2
               and u.disabled_at is null",
        )
        .bind(code_hash)
        .bind(max_attempts);
        self.0.run(query.fetch_optional(self.0.pool())).await
    }

    /// Inside the transaction that stores the login's session, holding the account's row: the
    /// challenge (unused, unexpired, with an attempt left) and the code, checked and used; a
    /// wrong code counted against both (the caller commits every outcome but `Gone`'s).
    pub(super) async fn complete_in(
        &self,
        tx: &mut sqlx::PgConnection,
        user_id: Uuid,
        attempt: Attempt<'_>,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let open = sqlx::query_scalar::<_, bool>(
            "select u.password_change_required
             from account_codes c join users u on u.id = c.user_id
             where c.code_hash = $1 and c.flow = 'second_factor' and c.user_id = $2
               and c.used_at is null and c.expires_at > clock_timestamp() and c.failures < $3
             for update of c",
        )
        .bind(attempt.challenge)
        .bind(user_id)
        .bind(attempt.max_attempts);
        let Some(change_required) = self.0.run(open.fetch_optional(&mut *tx)).await? else {
            return Ok(Err(Refusal::Gone));
        };
        let checked = self.check_in(tx, user_id, attempt.check).await?;
        let record = match checked {
            Ok(()) => sqlx::query(
                "update account_codes set used_at = clock_timestamp(),
                                          completed_at = clock_timestamp()
                 where code_hash = $1",
            )
            .bind(attempt.challenge),
            Err(Refusal::Wrong) => sqlx::query(
                "update account_codes
                 set failures = failures + 1,
                     used_at = case when failures + 1 >= $2 then clock_timestamp() end
                 where code_hash = $1",
            )
            .bind(attempt.challenge)
            .bind(attempt.max_attempts),
            Err(refusal) => return Ok(Err(refusal)),
        };
        self.0.run(record.execute(&mut *tx)).await?;
        Ok(match checked {
            Ok(()) if change_required => Err(Refusal::ChangeRequired),
            other => other,
        })
    }

    /// Checks a code of the account's confirmed second factor under the account's lock, and
    /// uses it: a TOTP code's step becomes the last accepted, a recovery code is spent, and the
    /// factor's count of wrong codes starts over; a wrong code adds to it.
    async fn check_in(
        &self,
        tx: &mut sqlx::PgConnection,
        user_id: Uuid,
        check: Check<'_>,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let stored = sqlx::query_as::<_, (Vec<u8>, i64, i32)>(
            "select secret, last_used_step, failures from totp_credentials
             where user_id = $1 and confirmed_at is not null
             for update",
        )
        .bind(user_id);
        let Some((secret, last_used_step, failures)) =
            self.0.run(stored.fetch_optional(&mut *tx)).await?
        else {
            return Ok(Err(Refusal::Gone));
        };
        if check.max_failures.is_some_and(|max| failures >= max) {
            return Ok(Err(Refusal::Locked));
        }
        let right = match check.code {
            Code::Totp { digits, now } => {
                match crate::model::totp::matching_step(&secret, digits, now, last_used_step) {
                    Some(step) => {
                        let used = sqlx::query(
                            "update totp_credentials set last_used_step = $2 where user_id = $1",
                        )
                        .bind(user_id)
                        .bind(step);
                        self.0.run(used.execute(&mut *tx)).await?;
                        true
                    }
                    None => false,
                }
            }
            Code::Recovery(hash) => {
                let spent = sqlx::query(
                    "update recovery_codes set used_at = clock_timestamp()
                     where user_id = $1 and code_hash = $2 and used_at is null",
                )
                .bind(user_id)
                .bind(hash);
                self.0.run(spent.execute(&mut *tx)).await?.rows_affected() == 1
            }
        };
        let count = sqlx::query(
            "update totp_credentials
             set failures = case when $2 then 0 else failures + 1 end
             where user_id = $1",
        )
        .bind(user_id)
        .bind(right);
        self.0.run(count.execute(&mut *tx)).await?;
        Ok(if right { Ok(()) } else { Err(Refusal::Wrong) })
    }

    /// A new or removed factor: no client is trusted with it any more (a device that signed in
    /// with a factor since removed, or lost with it, must earn that again with the new one).
    async fn untrust_in(
        &self,
        tx: &mut sqlx::PgConnection,
        user_id: Uuid,
    ) -> Result<(), StoreError> {
        let query =
            sqlx::query("update trusted_clients set aal = 1 where user_id = $1 and aal > 1")
                .bind(user_id);
        self.0.run(query.execute(tx)).await?;
        Ok(())
    }

    /// Inside a transaction that holds the account's row: whether it has a confirmed factor.
    pub(super) async fn confirmed_in(
        &self,
        tx: &mut sqlx::PgConnection,
        user_id: Uuid,
    ) -> Result<bool, StoreError> {
        let query = sqlx::query_scalar::<_, bool>(
            "select exists (select 1 from totp_credentials
                            where user_id = $1 and confirmed_at is not null)",
        )
        .bind(user_id);
        self.0.run(query.fetch_one(tx)).await
    }

    async fn replace_recovery_in(
        &self,
        tx: &mut sqlx::PgConnection,
        user_id: Uuid,
        recovery: &[[u8; 32]],
    ) -> Result<(), StoreError> {
        let hashes: Vec<&[u8]> = recovery.iter().map(|h| h.as_slice()).collect();
        let query = sqlx::query(
            "with gone as (delete from recovery_codes where user_id = $1)
             insert into recovery_codes (user_id, code_hash) select $1, unnest($2::bytea[])",
        )
        .bind(user_id)
        .bind(&hashes);
        self.0.run(query.execute(tx)).await?;
        Ok(())
    }
}
