//! Account deletion, the sessions' part: who may delete (the account's owner with their current
//! password, or with a session authenticated within `ACCOUNTS__DELETE_MAX_AUTH_AGE`; an operator,
//! admitted by `grpc::admin`), the PostgreSQL transaction (`store::erasure`), and the wait until
//! no instance accepts any of the account's sessions. The profile caches' part is
//! `profile::ProfileService::delete_account`'s.
use secrecy::SecretString;
use tracing::instrument;
use uuid::Uuid;

use super::{AuthError, AuthService, security};
use crate::{
    cache::Announcement,
    local::Keys,
    store::{DeletedBy, Erased, Erasure, Guard},
};

impl AuthService {
    /// The account the caller of `token` may delete, and what the deletion checks again under
    /// the account's lock (see [`Self::reauthenticated`]).
    #[instrument(skip_all)]
    pub async fn deletion_allowed(
        &self,
        token: &str,
        password: Option<SecretString>,
    ) -> Result<(Uuid, Guard), AuthError> {
        let max_age = self.flows.delete_max_auth_age;
        let (current, password_hash) = self
            .reauthenticated(token, password, max_age, "delete_account")
            .await?;
        let guard = Guard {
            session_id: current.record.id,
            password_hash,
        };
        Ok((current.record.user_id, guard))
    }

    /// The session of `token`, whose owner proved it again: with `password` when given (a guess
    /// like ChangePassword's current password, paid by `action`'s account bucket; the account's
    /// password hash then comes back), else only if the session's password check is at most
    /// `max_age` old (REAUTHENTICATION_REQUIRED otherwise).
    pub(super) async fn reauthenticated(
        &self,
        token: &str,
        password: Option<SecretString>,
        max_age: std::time::Duration,
        action: &'static str,
    ) -> Result<(super::SessionView, Option<String>), AuthError> {
        let current = self.validate(token).await?;
        let user_id = current.record.user_id;
        let Some(password) = password else {
            let age = self.clock.now() - current.record.authenticated_at;
            let fresh = age.to_std().is_ok_and(|age| age <= max_age);
            return if fresh {
                Ok((current, None))
            } else {
                Err(AuthError::ReauthenticationRequired)
            };
        };
        let admitted = self.hasher.admit()?;
        let (stored, email, _) = self
            .db
            .users()
            .find_credentials_by_id(user_id)
            .await?
            .ok_or(AuthError::InvalidSession)?;
        self.limit(action, &[self.account_bucket(&email, None)])
            .await?;
        if self.locked(stored.failed_logins) {
            return Err(AuthError::Locked);
        }
        if !admitted
            .verify(password, Some(stored.password_hash.clone()))
            .await?
        {
            self.count_failure(user_id, &current.record.ip_address)
                .await?;
            return Err(AuthError::WrongPassword);
        }
        Ok((current, Some(stored.password_hash)))
    }

    /// Deletes the account in PostgreSQL and returns once no instance accepts any of its
    /// sessions nor serves its profile (`floor` writes the profile's floor to Redis, after the
    /// sessions' tombstones: one wait covers both); a deletion made before (a retry) waits the
    /// same. NOT_FOUND for an account that never was; UNAUTHENTICATED when `guard` (the owner's
    /// proof) no longer holds.
    #[instrument(skip_all)]
    pub async fn erase_account<F, Fut>(
        &self,
        user_id: Uuid,
        by: DeletedBy,
        guard: Option<&Guard>,
        floor: F,
    ) -> Result<Erased, AuthError>
    where
        F: FnOnce(i64, Option<(i64, chrono::DateTime<chrono::Utc>)>) -> Fut,
        Fut: Future<Output = Announcement>,
    {
        let erased = match self.db.erase_user(user_id, by, guard, self.since()).await? {
            Erasure::Erased(erased) => erased,
            Erasure::NoSuchAccount => return Err(AuthError::UserNotFound),
            Erasure::Refused => return Err(AuthError::InvalidSession),
        };
        if erased.now {
            let by = match by {
                DeletedBy::User => "user",
                DeletedBy::Operator => "operator",
            };
            security::account_deleted(user_id, by, erased.revocation.active);
            self.metrics()
                .accounts_deleted
                .with_label_values(&[by])
                .inc();
        }
        let reason = erased.now.then_some("user_deleted");
        let revocation = &erased.revocation;
        let hashes = revocation.pending.iter().map(|i| i.token_hash.as_slice());
        let mut keys = Keys::sessions(hashes);
        keys.partial = revocation.truncated;
        keys.profiles.push(user_id);
        let also = floor(erased.profile_version, erased.logged);
        self.invalidate_keys_and(reason, revocation, keys, also)
            .await?;
        Ok(erased)
    }
}
