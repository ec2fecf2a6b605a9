//! Account deletion: one transaction that revokes every session (queued like any revocation),
//! floors the profile's cached copies at a version above every copy, erases the account's rows,
//! rewrites the audit rows that name it by email (its last address, and those it moved away from
//! before they were looked up), and keeps a pseudonymous record
//! (`account_deletions`; see the migration for what stays and why).
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, Reason, Revocation, Since, StoreError};

/// Who deleted the account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletedBy {
    User,
    Operator,
}

impl DeletedBy {
    fn as_str(self) -> &'static str {
        match self {
            DeletedBy::User => "user",
            DeletedBy::Operator => "operator",
        }
    }
}

/// What a deletion did, or what an earlier one did (a retry): the sessions it revoked (with the
/// invalidations a caller waits for) and the profile version every cached copy is below, with
/// its row of the profile log (none for a retry: the log row was written by the first).
pub struct Erased {
    pub revocation: Revocation,
    pub profile_version: i64,
    pub logged: Option<(i64, DateTime<Utc>)>,
    /// Deleted by this call (not an earlier one).
    pub now: bool,
}

/// What the owner proved, checked again under the account's lock: their session is still live
/// and, when they gave it, the password they gave is still the account's (a revocation or a new
/// password that committed meanwhile wins).
pub struct Guard {
    pub session_id: Uuid,
    pub password_hash: Option<String>,
}

/// What a deletion found.
pub enum Erasure {
    Erased(Erased),
    /// No such account, and none deleted before.
    NoSuchAccount,
    /// The guard's session was revoked, or the password changed, meanwhile: nothing done.
    Refused,
}

#[derive(sqlx::FromRow)]
struct Floor {
    id: i64,
    created_at: DateTime<Utc>,
    version: i64,
}

impl Db {
    /// Deletes the account (see the module), when `guard` (the owner's proof) still holds; an
    /// account deleted before answers what remains to wait for.
    pub async fn erase_user(
        &self,
        user_id: Uuid,
        by: DeletedBy,
        guard: Option<&Guard>,
        since: Since,
    ) -> Result<Erasure, StoreError> {
        self.retrying(|| async {
            let mut tx = self.run(self.pool().begin()).await?;
            // With when it got its address: audit rows about the address before that are about
            // whoever had it then.
            let locked = sqlx::query_as::<_, (String, String, DateTime<Utc>)>(
                "select email_normalized, password_hash,
                        coalesce((select max(p.replaced_at) from previous_emails p
                                  where p.user_id = u.id), u.created_at)
                 from users u where id = $1 for update",
            )
            .bind(user_id);
            let Some((normalized, hash, acquired)) =
                self.run(locked.fetch_optional(&mut *tx)).await?
            else {
                drop(tx);
                return self.erased_before(user_id, since).await;
            };
            if let Some(guard) = guard {
                let live = sqlx::query_scalar::<_, bool>(
                    "select exists (select 1 from sessions
                                    where id = $1 and user_id = $2 and revoked_at is null)",
                )
                .bind(guard.session_id)
                .bind(user_id);
                let live = self.run(live.fetch_one(&mut *tx)).await?;
                if !live || guard.password_hash.as_ref().is_some_and(|h| *h != hash) {
                    return Ok(Erasure::Refused);
                }
            }
            let revocation = self
                .sessions()
                .revoke_all_in(&mut tx, user_id, None, Reason::UserDeleted, since)
                .await?;
            // The profile's row first: an UpdateProfile either committed before (and the floor
            // is above its version) or finds no profile.
            let profile =
                sqlx::query("select 1 from profiles where user_id = $1 for update").bind(user_id);
            self.run(profile.execute(&mut *tx)).await?;
            let floor = sqlx::query_as::<_, Floor>(
                "with floored as (
                     select $1::uuid as user_id,
                            coalesce((select version from profiles where user_id = $1), 0) + 1
                                as version
                 ), evented as (
                     insert into change_events (kind, user_id, version)
                     select 'profile_updated', user_id, version from floored
                     union all
                     select 'user_deleted', user_id, null from floored
                 )
                 insert into profile_invalidations (user_id, version, evented)
                 select user_id, version, true from floored
                 returning id, created_at, version",
            )
            .bind(user_id);
            let floor = self.run(floor.fetch_one(&mut *tx)).await?;
            let erase = sqlx::query(
                "with codes as (delete from account_codes where user_id = $1),
                      recorded as (
                          insert into account_deletions (user_id, deleted_by, profile_version)
                          values ($1, $2, $3))
                 delete from users where id = $1",
            )
            .bind(user_id)
            .bind(by.as_str())
            .bind(floor.version);
            self.run(erase.execute(&mut *tx)).await?;
            let audit = sqlx::query("select pseudonymize_admin_audit($1, $2, $3)")
                .bind(user_id)
                .bind(&normalized)
                .bind(acquired);
            self.run(audit.execute(&mut *tx)).await?;
            // And the rows that found it by an address it moved away from, while it had it (then
            // the record of those addresses goes too).
            let previous = sqlx::query("select pseudonymize_previous_emails($1)").bind(user_id);
            self.run(previous.execute(&mut *tx)).await?;
            let gone = sqlx::query("delete from previous_emails where user_id = $1").bind(user_id);
            self.run(gone.execute(&mut *tx)).await?;
            self.run(tx.commit()).await?;
            Ok(Erasure::Erased(Erased {
                revocation,
                profile_version: floor.version,
                logged: Some((floor.id, floor.created_at)),
                now: true,
            }))
        })
        .await
    }

    /// An account deleted before: what is left to wait for.
    async fn erased_before(&self, user_id: Uuid, since: Since) -> Result<Erasure, StoreError> {
        let query = sqlx::query_scalar::<_, i64>(
            "select profile_version from account_deletions where user_id = $1",
        )
        .bind(user_id);
        let Some(profile_version) = self.run(query.fetch_optional(self.pool())).await? else {
            return Ok(Erasure::NoSuchAccount);
        };
        let revocation = self.sessions().pending_of_user(user_id, since).await?;
        Ok(Erasure::Erased(Erased {
            revocation,
            profile_version,
            logged: None,
            now: false,
        }))
    }
}
