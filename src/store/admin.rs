//! What AdminService reads and writes: accounts as operators see them, their sessions page by
//! page, disabling and enabling, the audit trail, and the secrets every instance shares.
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, Reason, Revocation, Since, StoreError, StoredSession, micros};
use crate::model::SessionRecord;

/// An account as operators see it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AdminUser {
    pub id: Uuid,
    pub email: String,
    pub display_name: String,
    pub created_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: String,
    pub active_sessions: i64,
    pub last_login_at: Option<DateTime<Utc>>,
    pub password_change_required: bool,
    pub email_verified_at: Option<DateTime<Utc>>,
    pub second_factor: bool,
    pub recovery_codes_left: i64,
}

/// How to find an account.
pub enum UserLookup<'a> {
    Id(Uuid),
    Email(&'a str),
}

/// Where a page of sessions starts: after this (created_at, id), newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

/// One row of the audit trail.
pub struct AuditEntry<'a> {
    pub caller: &'a str,
    pub method: &'a str,
    pub target: &'a str,
    pub outcome: &'a str,
    pub request_id: &'a str,
    /// Calls this row stands for (1, or the refusals summed up over the audit's rate).
    pub count: i32,
}

#[derive(Clone, Copy)]
pub struct AdminRepo<'a>(&'a Db);

impl Db {
    pub fn admin(&self) -> AdminRepo<'_> {
        AdminRepo(self)
    }
}

impl AdminRepo<'_> {
    /// The account, with its count of live sessions under the idle timeout `idle`.
    pub async fn user(
        &self,
        lookup: UserLookup<'_>,
        idle: std::time::Duration,
    ) -> Result<Option<AdminUser>, StoreError> {
        let (by, id, email) = match lookup {
            UserLookup::Id(id) => ("u.id = $2", Some(id), None),
            UserLookup::Email(email) => ("u.email_normalized = $3", None, Some(email)),
        };
        let sql = format!(
            "select u.id, u.email, coalesce(p.display_name, '') as display_name, u.created_at,
                    u.disabled_at, u.disabled_reason, u.last_login_at, u.password_change_required,
                    u.email_verified_at,
                    exists (select 1 from totp_credentials f
                            where f.user_id = u.id and f.confirmed_at is not null)
                        as second_factor,
                    (select count(*) from recovery_codes r
                     where r.user_id = u.id and r.used_at is null) as recovery_codes_left,
                    (select count(*) from sessions s where s.user_id = u.id and {}) as active_sessions
             from users u left join profiles p on p.user_id = u.id
             where {by}",
            super::sessions::ACTIVE
        );
        let query = sqlx::query_as::<_, AdminUser>(sqlx::AssertSqlSafe(sql))
            .bind(micros(idle))
            .bind(id)
            .bind(email);
        self.0.run(query.fetch_optional(self.0.pool())).await
    }

    /// Up to `limit` live sessions of the user, newest first, after `after`.
    pub async fn sessions_page(
        &self,
        user_id: Uuid,
        idle: std::time::Duration,
        after: Option<SessionCursor>,
        limit: i64,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let sql = format!(
            "select {} from sessions where user_id = $2 and {}
               and ($3::timestamptz is null or (created_at, id) < ($3, $4))
             order by created_at desc, id desc limit $5",
            super::sessions::COLUMNS,
            super::sessions::ACTIVE
        );
        let query = sqlx::query_as::<_, StoredSession>(sqlx::AssertSqlSafe(sql))
            .bind(micros(idle))
            .bind(user_id)
            .bind(after.map(|c| c.created_at))
            .bind(after.map(|c| c.id))
            .bind(limit);
        let rows = self.0.run(query.fetch_all(self.0.pool())).await?;
        Ok(rows.into_iter().map(|s| s.record).collect())
    }

    /// Disables the account and revokes every session of it not yet revoked, in one transaction
    /// that locks the user's row first (so a login racing it either committed its session
    /// before — and it is revoked here — or finds the account disabled). `None`: no such user.
    /// Disabling a disabled account keeps its first time and takes the new reason.
    pub async fn disable(
        &self,
        user_id: Uuid,
        reason: &str,
        since: Since,
    ) -> Result<Option<Revocation>, StoreError> {
        self.0
            .retrying(|| async {
                let mut tx = self.0.run(self.0.pool().begin()).await?;
                if self
                    .0
                    .users()
                    .lock_password(&mut tx, user_id)
                    .await?
                    .is_none()
                {
                    return Ok(None);
                }
                let update = sqlx::query(
                    "with disabled as (
                         update users set disabled_at = coalesce(disabled_at, clock_timestamp()),
                                          disabled_reason = $2, updated_at = clock_timestamp()
                         where id = $1
                         returning id
                     )
                     insert into change_events (kind, user_id, reason)
                     select 'user_disabled', id, $2 from disabled",
                )
                .bind(user_id)
                .bind(reason);
                self.0.run(update.execute(&mut *tx)).await?;
                let revoked = self
                    .0
                    .sessions()
                    .revoke_all_in(&mut tx, user_id, None, Reason::UserDisabled, since)
                    .await?;
                self.0.codes().void_in(&mut tx, user_id).await?;
                self.0.run(tx.commit()).await?;
                Ok(Some(revoked))
            })
            .await
    }

    /// Enables the account and clears its count of consecutive failed logins. `false`: no such
    /// user.
    pub async fn enable(&self, user_id: Uuid) -> Result<bool, StoreError> {
        let query = sqlx::query(
            "with enabled as (
                 update users set disabled_at = null, disabled_reason = '', failed_logins = 0,
                                  updated_at = clock_timestamp()
                 where id = $1
                 returning id
             )
             insert into change_events (kind, user_id) select 'user_enabled', id from enabled",
        )
        .bind(user_id);
        let done = self.0.run(query.execute(self.0.pool())).await?;
        Ok(done.rows_affected() == 1)
    }

    /// Requires a new password at the account's next login. `false`: no such user.
    pub async fn require_password_change(&self, user_id: Uuid) -> Result<bool, StoreError> {
        let query = sqlx::query(
            "update users set password_change_required = true, updated_at = clock_timestamp()
             where id = $1",
        )
        .bind(user_id);
        let done = self.0.run(query.execute(self.0.pool())).await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether the user exists.
    pub async fn exists(&self, user_id: Uuid) -> Result<bool, StoreError> {
        let query =
            sqlx::query_scalar::<_, bool>("select exists (select 1 from users where id = $1)")
                .bind(user_id);
        self.0.run(query.fetch_one(self.0.pool())).await
    }

    pub async fn audit(&self, entry: &AuditEntry<'_>) -> Result<(), StoreError> {
        let query = sqlx::query(
            "insert into admin_audit (caller, method, target, outcome, request_id, count)
             values ($1, $2, $3, $4, $5, $6)",
        )
        .bind(entry.caller)
        .bind(entry.method)
        .bind(entry.target)
        .bind(entry.outcome)
        .bind(entry.request_id)
        .bind(entry.count);
        self.0.run(query.execute(self.0.pool())).await?;
        Ok(())
    }

    /// Deletes audit rows older than `retention` (a day at least), at most `batch` of them,
    /// through `purge_admin_audit`: the role the service runs as cannot delete audit rows
    /// itself.
    pub async fn purge_audit(
        &self,
        retention: std::time::Duration,
        batch: i64,
    ) -> Result<u64, StoreError> {
        let query = sqlx::query_scalar::<_, i64>("select purge_admin_audit($1, $2)")
            .bind(micros(retention))
            .bind(batch);
        let purged = self.0.run(query.fetch_one(self.0.pool())).await?;
        Ok(purged.max(0).unsigned_abs())
    }

    /// The secret called `name`, shared by every instance: `fresh` is stored if there is none
    /// yet, and whatever is stored is returned.
    pub async fn secret(&self, name: &str, fresh: &[u8]) -> Result<Vec<u8>, StoreError> {
        let insert = sqlx::query(
            "insert into service_secrets (name, secret) values ($1, $2)
             on conflict (name) do nothing",
        )
        .bind(name)
        .bind(fresh);
        self.0.run(insert.execute(self.0.pool())).await?;
        let select =
            sqlx::query_scalar::<_, Vec<u8>>("select secret from service_secrets where name = $1")
                .bind(name);
        self.0.run(select.fetch_one(self.0.pool())).await
    }
}
