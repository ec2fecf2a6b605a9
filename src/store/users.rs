//! Users and their profile rows.
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, Reason, Revocation, Since, StoreError};
use crate::model::SessionRecord;

/// The constraint that makes emails unique; its violation means "already registered".
pub const EMAIL_UNIQUE: &str = "users_email_normalized_key";

/// A user's credentials as a password check needs them.
#[derive(Debug, sqlx::FromRow)]
pub struct Credentials {
    pub id: Uuid,
    pub password_hash: String,
    pub failed_logins: i32,
    /// The client checking signed in to this account recently.
    pub trusted: bool,
    /// ... with its second factor: it is spared the factor's cap too.
    pub trusted_with_factor: bool,
    /// Disabled by an administrator: no login.
    pub disabled: bool,
    /// An administrator requires a new password before the next session.
    pub password_change_required: bool,
    /// The account has a confirmed second factor: a login needs it too.
    pub second_factor: bool,
}

pub struct NewUser<'a> {
    pub id: Uuid,
    pub email: &'a str,
    pub email_normalized: &'a str,
    pub password_hash: &'a str,
    pub display_name: &'a str,
}

#[derive(Clone, Copy)]
pub struct UserRepo<'a>(pub(super) &'a Db);

impl Db {
    pub fn users(&self) -> UserRepo<'_> {
        UserRepo(self)
    }
}

impl UserRepo<'_> {
    /// Creates the user, their profile and their first session in one statement, so a failure
    /// leaves nothing half-made.
    pub async fn create_with_session(
        &self,
        user: &NewUser<'_>,
        session: &SessionRecord,
        token_hash: &[u8],
        key_id: u32,
    ) -> Result<(), StoreError> {
        let query = sqlx::query(
            "with new_user as (
                 insert into users (id, email, email_normalized, password_hash, created_at, updated_at)
                 values ($1, $2, $3, $4, $6, $6)
                 returning id
             ), new_profile as (
                 insert into profiles (user_id, display_name, created_at, updated_at)
                 select id, $5, $6, $6 from new_user
             )
             insert into sessions (id, user_id, token_hash, created_at, last_seen_at,
                                   absolute_expires_at, authenticated_at, ip_address, user_agent,
                                   key_id)
             select $7, id, $8, $6, $6, $9, $6, $10, $11, $12 from new_user",
        )
        .bind(user.id)
        .bind(user.email)
        .bind(user.email_normalized)
        .bind(user.password_hash)
        .bind(user.display_name)
        .bind(session.created_at)
        .bind(session.id)
        .bind(token_hash)
        .bind(session.absolute_expires_at)
        .bind(&session.ip_address)
        .bind(&session.user_agent)
        .bind(i64::from(key_id));
        self.0.run(query.execute(self.0.pool())).await?;
        Ok(())
    }

    /// What a login needs of the user with this normalised email: id, PHC hash, wrong
    /// passwords since the last correct one, and whether `client` (a client hash) signed in to
    /// the account within `trust_for`.
    pub async fn find_credentials(
        &self,
        email_normalized: &str,
        client: Option<&[u8]>,
        trust_for: std::time::Duration,
    ) -> Result<Option<Credentials>, StoreError> {
        let query = sqlx::query_as::<_, Credentials>(
            "select u.id, u.password_hash, u.failed_logins,
                    t.user_id is not null as trusted,
                    coalesce(t.aal >= 2, false) as trusted_with_factor,
                    u.disabled_at is not null as disabled, u.password_change_required,
                    exists (select 1 from totp_credentials f
                            where f.user_id = u.id and f.confirmed_at is not null)
                    as second_factor
             from users u
             -- One row at most: (user_id, client_hash) is the table's key.
             left join trusted_clients t
                 on t.user_id = u.id and t.client_hash = $2
                and t.last_success_at > clock_timestamp() - $3::bigint * interval '1 microsecond'
             where u.email_normalized = $1",
        )
        .bind(email_normalized)
        .bind(client)
        .bind(super::micros(trust_for));
        self.0.run(query.fetch_optional(self.0.pool())).await
    }

    /// The same for the user with this id (ChangePassword), never trusted, with the email and
    /// the display name (words a new password must not be made of).
    pub async fn find_credentials_by_id(
        &self,
        user_id: Uuid,
    ) -> Result<Option<(Credentials, String, String)>, StoreError> {
        let query = sqlx::query_as::<_, (Uuid, String, i32, bool, String, Option<String>)>(
            "select u.id, u.password_hash, u.failed_logins, u.disabled_at is not null,
                    u.email_normalized, p.display_name
             from users u left join profiles p on p.user_id = u.id
             where u.id = $1",
        )
        .bind(user_id);
        let row = self.0.run(query.fetch_optional(self.0.pool())).await?;
        Ok(row.map(
            |(id, password_hash, failed_logins, disabled, email, name)| {
                let credentials = Credentials {
                    id,
                    password_hash,
                    failed_logins,
                    trusted: false,
                    trusted_with_factor: false,
                    disabled,
                    password_change_required: false,
                    second_factor: false,
                };
                (credentials, email, name.unwrap_or_default())
            },
        ))
    }

    /// Whether an account has this normalised email (checked before hashing a new password).
    pub async fn email_taken(&self, email_normalized: &str) -> Result<bool, StoreError> {
        let query = sqlx::query_scalar::<_, bool>(
            "select exists (select 1 from users where email_normalized = $1)",
        )
        .bind(email_normalized);
        self.0.run(query.fetch_one(self.0.pool())).await
    }

    /// One more wrong password for this user.
    /// Counts a wrong password; the account's consecutive failures now (none: no such user).
    pub async fn record_failure(&self, user_id: Uuid) -> Result<Option<i32>, StoreError> {
        let query = sqlx::query_scalar::<_, i32>(
            "update users set failed_logins = failed_logins + 1 where id = $1
             returning failed_logins",
        )
        .bind(user_id);
        self.0.run(query.fetch_optional(self.0.pool())).await
    }

    /// Forgets trusted clients that last signed in before `trust_for` ago.
    pub async fn purge_trusted(&self, trust_for: std::time::Duration) -> Result<u64, StoreError> {
        let query = sqlx::query(
            "delete from trusted_clients
             where last_success_at < clock_timestamp() - $1::bigint * interval '1 microsecond'",
        )
        .bind(super::micros(trust_for));
        Ok(self
            .0
            .run(query.execute(self.0.pool()))
            .await?
            .rows_affected())
    }

    /// Locks the user's row for the rest of the transaction (every statement that changes several
    /// of a user's sessions takes it first, so they serialise instead of deadlocking) and returns
    /// the password hash; `None` when there is no such user.
    pub(super) async fn lock_password(
        &self,
        tx: &mut sqlx::PgConnection,
        user_id: Uuid,
    ) -> Result<Option<String>, StoreError> {
        let query = sqlx::query_scalar::<_, String>(
            "select password_hash from users where id = $1 for update",
        )
        .bind(user_id);
        self.0.run(query.fetch_optional(tx)).await
    }

    /// [`UserRepo::lock_password`] for a login, with the account's email verification as it is
    /// under the lock (what the new session's copies carry): `None` as well when the account is
    /// disabled.
    pub(super) async fn lock_for_login(
        &self,
        tx: &mut sqlx::PgConnection,
        user_id: Uuid,
    ) -> Result<Option<(String, Option<DateTime<Utc>>)>, StoreError> {
        let query = sqlx::query_as::<_, (String, bool, Option<DateTime<Utc>>)>(
            "select password_hash, disabled_at is not null, email_verified_at
             from users where id = $1 for update",
        )
        .bind(user_id);
        let row = self.0.run(query.fetch_optional(tx)).await?;
        Ok(row.and_then(|(hash, disabled, verified)| (!disabled).then_some((hash, verified))))
    }

    /// Inside a transaction that holds the user's row: sets the new password hash (clearing the
    /// failed logins and any required change), revokes every session of the user but `keep`, and
    /// voids the account flows' codes issued before.
    pub(super) async fn replace_password_in(
        &self,
        tx: &mut sqlx::PgConnection,
        user_id: Uuid,
        (password_hash, now): (&str, DateTime<Utc>),
        keep: Option<Uuid>,
        reason: Reason,
        since: Since,
    ) -> Result<Revocation, StoreError> {
        let update = sqlx::query(
            "update users set password_hash = $1, updated_at = $2, failed_logins = 0,
                              password_change_required = false
             where id = $3",
        )
        .bind(password_hash)
        .bind(now)
        .bind(user_id);
        self.0.run(update.execute(&mut *tx)).await?;
        let revoked = self
            .0
            .sessions()
            .revoke_all_in(&mut *tx, user_id, keep, reason, since)
            .await?;
        self.0.codes().void_in(tx, user_id).await?;
        Ok(revoked)
    }

    /// Sets the new password hash, marks the calling session as freshly authenticated and
    /// revokes every other session of the user not yet revoked, in one transaction that locks the
    /// user's row first. `None` when the calling session was revoked meanwhile (then nothing
    /// changed).
    pub async fn change_password(
        &self,
        user_id: Uuid,
        password_hash: &str,
        current_session: Uuid,
        now: DateTime<Utc>,
        since: Since,
    ) -> Result<Option<Revocation>, StoreError> {
        self.0
            .retrying(|| async {
                let mut tx = self.0.run(self.0.pool().begin()).await?;
                self.lock_password(&mut tx, user_id).await?;
                let current = sqlx::query_scalar::<_, Uuid>(
                    "update sessions set authenticated_at = $1
                     where id = $2 and user_id = $3 and revoked_at is null
                     returning id",
                )
                .bind(now)
                .bind(current_session)
                .bind(user_id);
                if self
                    .0
                    .run(current.fetch_optional(&mut *tx))
                    .await?
                    .is_none()
                {
                    return Ok(None);
                }
                let revoked = self
                    .replace_password_in(
                        &mut tx,
                        user_id,
                        (password_hash, now),
                        Some(current_session),
                        Reason::PasswordChanged,
                        since,
                    )
                    .await?;
                self.0.run(tx.commit()).await?;
                Ok(Some(revoked))
            })
            .await
    }
}
