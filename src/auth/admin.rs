//! What AdminService does to an account, without its user's token. Every revocation takes the
//! same path as the user's own (PostgreSQL, the outbox log, tombstones before the answer), so it
//! is as instant and as durable.
use tracing::instrument;
use uuid::Uuid;

use super::{AuthError, AuthService, IssuedCode, SessionView};
use crate::store::{AdminUser, Reason, SessionCursor, UserLookup};

impl AuthService {
    /// The account; NOT_FOUND when there is none.
    pub async fn admin_user(&self, lookup: UserLookup<'_>) -> Result<AdminUser, AuthError> {
        self.db
            .admin()
            .user(lookup, self.policy.idle_timeout)
            .await?
            .ok_or(AuthError::UserNotFound)
    }

    /// Up to `limit` of the user's live sessions after `after`, newest first; NOT_FOUND for an
    /// unknown user.
    pub async fn admin_sessions(
        &self,
        user_id: Uuid,
        after: Option<SessionCursor>,
        limit: i64,
    ) -> Result<Vec<SessionView>, AuthError> {
        let admin = self.db.admin();
        let page = admin
            .sessions_page(user_id, self.policy.idle_timeout, after, limit)
            .await?;
        if page.is_empty() && after.is_none() && !admin.exists(user_id).await? {
            return Err(AuthError::UserNotFound);
        }
        Ok(page.into_iter().map(|r| self.view(r)).collect())
    }

    /// Revokes one session of the user: OK when it is theirs (already revoked included),
    /// NOT_FOUND otherwise.
    #[instrument(skip_all)]
    pub async fn admin_revoke_session(
        &self,
        user_id: Uuid,
        session_id: Uuid,
    ) -> Result<(), AuthError> {
        let sessions = self.db.sessions();
        let revocation = sessions
            .revoke_by_id(user_id, session_id, Reason::Admin, self.since())
            .await?;
        // Read before the wait: nothing after it may outlast the call's deadline.
        let theirs = revocation.revoked > 0 || sessions.belongs_to(user_id, session_id).await?;
        self.invalidate(Some("admin"), &revocation).await?;
        if theirs {
            tracing::info!(%user_id, %session_id, "session revoked by an administrator");
            Ok(())
        } else {
            Err(AuthError::SessionNotFound)
        }
    }

    /// Revokes every session of the user; the number that were still active.
    #[instrument(skip_all)]
    pub async fn admin_revoke_sessions(&self, user_id: Uuid) -> Result<usize, AuthError> {
        if !self.db.admin().exists(user_id).await? {
            return Err(AuthError::UserNotFound);
        }
        let revocation = self
            .db
            .sessions()
            .revoke_all(user_id, None, Reason::Admin, self.since())
            .await?;
        tracing::info!(%user_id, count = revocation.revoked, "sessions revoked by an administrator");
        self.invalidate(Some("admin"), &revocation).await?;
        Ok(revocation.active)
    }

    /// Disables the account and revokes its sessions in one transaction (no racing login can
    /// keep one); the number of sessions that were still active.
    #[instrument(skip_all)]
    pub async fn disable_user(&self, user_id: Uuid, reason: &str) -> Result<usize, AuthError> {
        let revocation = self
            .db
            .admin()
            .disable(user_id, reason, self.since())
            .await?
            .ok_or(AuthError::UserNotFound)?;
        tracing::info!(%user_id, count = revocation.revoked, "user disabled");
        self.invalidate(Some("admin"), &revocation).await?;
        Ok(revocation.active)
    }

    /// A password reset code for the account, for the operator to deliver (the completion
    /// revokes every session); NOT_FOUND for an unknown or disabled account.
    #[instrument(skip_all)]
    pub async fn admin_reset_password(&self, user_id: Uuid) -> Result<IssuedCode, AuthError> {
        let issued = self.reset_code_for(user_id).await?;
        tracing::info!(%user_id, "password reset started by an administrator");
        Ok(issued)
    }

    /// Requires a new password at the account's next login (idempotent).
    #[instrument(skip_all)]
    pub async fn require_password_change(&self, user_id: Uuid) -> Result<(), AuthError> {
        if !self.db.admin().require_password_change(user_id).await? {
            return Err(AuthError::UserNotFound);
        }
        tracing::info!(%user_id, "new password required at the next login");
        Ok(())
    }

    /// Enables the account (no session comes back) and clears its failed-login count.
    #[instrument(skip_all)]
    pub async fn enable_user(&self, user_id: Uuid) -> Result<(), AuthError> {
        if !self.db.admin().enable(user_id).await? {
            return Err(AuthError::UserNotFound);
        }
        tracing::info!(%user_id, "user enabled");
        Ok(())
    }
}
