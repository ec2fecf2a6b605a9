//! The second factor's rows: an account's TOTP secret (`totp_credentials`), its recovery codes
//! (`recovery_codes`, only their SHA-256), and the login challenges (`account_codes` of the
//! `second_factor` flow). See `auth::second_factor` for the rules.
//!
//! Every code is good once, by the statement that accepts it: a TOTP code raises the account's
//! `last_used_step` past its own step (a code of that step or an earlier one then finds nothing),
//! a recovery code sets its `used_at`, a challenge its `used_at`. A login's three (the challenge,
//! the code, the new session) are taken in one transaction that holds the account's row, so of
//! two completions exactly one wins, and one that loses changes nothing.
use std::time::Duration;

use uuid::Uuid;

use super::{Db, StoreError, micros};

/// An account's TOTP secret as stored.
#[derive(Debug, sqlx::FromRow)]
pub struct StoredTotp {
    pub secret: Vec<u8>,
    pub confirmed: bool,
    pub last_used_step: i64,
}

/// An unused, unexpired login challenge, with what its completion checks of the account.
#[derive(Debug, sqlx::FromRow)]
pub struct Challenge {
    pub user_id: Uuid,
    pub email_normalized: String,
    /// The client the account trusted at the login (its guess bucket), if any.
    pub trusted_client: Option<Vec<u8>>,
    pub failed_logins: i32,
}

/// The second factor a completion presents, as checked against the account's secret.
#[derive(Debug, Clone, Copy)]
pub enum Factor<'a> {
    /// A TOTP code, of this time step.
    Totp(i64),
    /// A recovery code's hash.
    RecoveryCode(&'a [u8]),
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
            "select secret, confirmed_at is not null as confirmed, last_used_step
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
                self.replace_recovery_in(&mut tx, user_id, recovery).await?;
                self.0.run(tx.commit()).await?;
                Ok(true)
            })
            .await
    }

    /// Replaces the account's recovery codes, once `factor` (a code of its confirmed second
    /// factor) is accepted, in one transaction; `false` when it is not.
    pub async fn regenerate(
        &self,
        user_id: Uuid,
        factor: Factor<'_>,
        recovery: &[[u8; 32]],
    ) -> Result<bool, StoreError> {
        self.0
            .retrying(|| async {
                let mut tx = self.0.run(self.0.pool().begin()).await?;
                if !self.accept_in(&mut tx, user_id, factor).await? {
                    return Ok(false);
                }
                self.replace_recovery_in(&mut tx, user_id, recovery).await?;
                self.0.run(tx.commit()).await?;
                Ok(true)
            })
            .await
    }

    /// Removes the account's second factor (its secret and recovery codes) and voids its open
    /// login challenges — once `factor` is accepted, or unconditionally for `None` (an operator);
    /// whether there was a confirmed second factor to remove.
    pub async fn remove(
        &self,
        user_id: Uuid,
        factor: Option<Factor<'_>>,
    ) -> Result<bool, StoreError> {
        self.0
            .retrying(|| async {
                let mut tx = self.0.run(self.0.pool().begin()).await?;
                if let Some(factor) = factor
                    && !self.accept_in(&mut tx, user_id, factor).await?
                {
                    return Ok(false);
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
                self.0.run(tx.commit()).await?;
                Ok(removed.unwrap_or(false))
            })
            .await
    }

    /// Stores a login challenge for the account, valid for `ttl`.
    pub async fn issue_challenge(
        &self,
        user_id: Uuid,
        code_hash: &[u8],
        ttl: Duration,
        trusted_client: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let query = sqlx::query(
            "insert into account_codes (code_hash, flow, user_id, expires_at, trusted_client)
             values ($1, 'second_factor', $2,
                     clock_timestamp() + $3::bigint * interval '1 microsecond', $4)",
        )
        .bind(code_hash)
        .bind(user_id)
        .bind(micros(ttl))
        .bind(trusted_client);
        self.0.run(query.execute(self.0.pool())).await?;
        Ok(())
    }

    /// The unused, unexpired challenge with this hash, of an enabled account.
    pub async fn challenge(&self, code_hash: &[u8]) -> Result<Option<Challenge>, StoreError> {
        let query = sqlx::query_as::<_, Challenge>(
            "select c.user_id, u.email_normalized, c.trusted_client, u.failed_logins
             from account_codes c join users u on u.id = c.user_id
             where c.code_hash = $1 and c.flow = 'second_factor' and c.used_at is null
               and c.expires_at > clock_timestamp() and u.disabled_at is null",
        )
        .bind(code_hash);
        self.0.run(query.fetch_optional(self.0.pool())).await
    }

    /// Counts a wrong code against the challenge: at `max` of them it is void.
    pub async fn challenge_failed(&self, code_hash: &[u8], max: u32) -> Result<(), StoreError> {
        let query = sqlx::query(
            "update account_codes
             set failures = failures + 1,
                 used_at = case when failures + 1 >= $2 then clock_timestamp() end
             where code_hash = $1 and flow = 'second_factor' and used_at is null",
        )
        .bind(code_hash)
        .bind(i32::try_from(max).unwrap_or(i32::MAX));
        self.0.run(query.execute(self.0.pool())).await?;
        Ok(())
    }

    /// Inside the transaction that stores the login's session (holding the account's row): uses
    /// the challenge and the factor; `false` (and the caller rolls back) when either was used, or
    /// the challenge expired, or the account must change its password first.
    pub(super) async fn complete_in(
        &self,
        tx: &mut sqlx::PgConnection,
        user_id: Uuid,
        challenge: &[u8],
        factor: Factor<'_>,
    ) -> Result<bool, StoreError> {
        let used = sqlx::query(
            "update account_codes set used_at = clock_timestamp(), completed_at = clock_timestamp()
             where code_hash = $1 and flow = 'second_factor' and user_id = $2 and used_at is null
               and expires_at > clock_timestamp()
               and exists (select 1 from users u
                           where u.id = $2 and not u.password_change_required)",
        )
        .bind(challenge)
        .bind(user_id);
        if self.0.run(used.execute(&mut *tx)).await?.rows_affected() != 1 {
            return Ok(false);
        }
        self.accept_in(tx, user_id, factor).await
    }

    /// Accepts a code of the account's confirmed second factor, once.
    async fn accept_in(
        &self,
        tx: &mut sqlx::PgConnection,
        user_id: Uuid,
        factor: Factor<'_>,
    ) -> Result<bool, StoreError> {
        let query = match factor {
            Factor::Totp(step) => sqlx::query(
                "update totp_credentials set last_used_step = $2
                 where user_id = $1 and confirmed_at is not null and last_used_step < $2",
            )
            .bind(user_id)
            .bind(step),
            Factor::RecoveryCode(hash) => sqlx::query(
                "update recovery_codes set used_at = clock_timestamp()
                 where user_id = $1 and code_hash = $2 and used_at is null
                   and exists (select 1 from totp_credentials t
                               where t.user_id = $1 and t.confirmed_at is not null)",
            )
            .bind(user_id)
            .bind(hash),
        };
        Ok(self.0.run(query.execute(tx)).await?.rows_affected() == 1)
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
