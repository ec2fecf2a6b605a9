//! Session management for the owner of a session: list, revoke one, revoke all, change password.
//! Each call first validates the caller's token exactly as ValidateSession does.
use secrecy::SecretString;
use tracing::instrument;
use uuid::Uuid;

use super::{AuthError, AuthService, SessionView, password_policy::PasswordContext, security};
use crate::store::Reason;

/// The caller's own sessions, as ListSessions answers.
pub struct SessionList {
    pub sessions: Vec<SessionView>,
    pub current_session_id: Uuid,
}

impl AuthService {
    #[instrument(skip_all)]
    pub async fn list_sessions(&self, token: &str) -> Result<SessionList, AuthError> {
        let current = self.validate(token).await?;
        let records = self
            .db
            .sessions()
            .list_active(current.record.user_id, self.policy.idle_timeout)
            .await?;
        Ok(SessionList {
            sessions: records.into_iter().map(|r| self.view(r)).collect(),
            current_session_id: current.record.id,
        })
    }

    /// Revokes one of the caller's sessions. Another user's session, or an unknown id, is
    /// NOT_FOUND, so ids cannot be probed; the caller's own already-ended session is OK.
    #[instrument(skip_all)]
    pub async fn revoke_session(&self, token: &str, session_id: Uuid) -> Result<(), AuthError> {
        let current = self.validate(token).await?;
        let user_id = current.record.user_id;
        let sessions = self.db.sessions();
        let revocation = sessions
            .revoke_by_id(user_id, session_id, Reason::Revoked, self.since())
            .await?;
        // Whose session it is, read before the wait: nothing after the wait may outlast the
        // call's deadline (the wait ends just before it).
        let theirs = revocation.revoked > 0 || sessions.belongs_to(user_id, session_id).await?;
        // Whatever it found, what is still queued for the user is applied before answering.
        self.invalidate(Some("revoke"), &revocation).await?;
        if revocation.revoked > 0 {
            tracing::info!(%user_id, %session_id, "session revoked");
        }
        if theirs {
            Ok(())
        } else {
            Err(AuthError::SessionNotFound)
        }
    }

    /// "Log out everywhere": every session of the user not yet revoked, whatever its expiry;
    /// the number of those that were still active.
    #[instrument(skip_all)]
    pub async fn revoke_all_sessions(
        &self,
        token: &str,
        include_current: bool,
    ) -> Result<usize, AuthError> {
        let current = self.validate(token).await?;
        let keep = (!include_current).then_some(current.record.id);
        let revocation = self
            .db
            .sessions()
            .revoke_all(
                current.record.user_id,
                keep,
                Reason::RevokedAll,
                self.since(),
            )
            .await?;
        tracing::info!(user_id = %current.record.user_id, count = revocation.revoked, "sessions revoked");
        self.invalidate(Some("revoke_all"), &revocation).await?;
        Ok(revocation.active)
    }

    /// Requires the current password — a guess like a login's, paid by the account's bucket and
    /// counted toward its consecutive-failure cap —, sets the new one, revokes every other
    /// session and marks the calling one as freshly authenticated.
    #[instrument(skip_all)]
    pub async fn change_password(
        &self,
        token: &str,
        current_password: SecretString,
        new_password: SecretString,
    ) -> Result<usize, AuthError> {
        let token = self.keys.check(token).await?;
        let hash = token.hash;
        let current = self.validate_checked(token).await?;
        let user_id = current.record.user_id;
        let admitted = self.hasher.admit()?;
        let (stored, email, display_name) = self
            .db
            .users()
            .find_credentials_by_id(user_id)
            .await?
            .ok_or(AuthError::InvalidSession)?;
        let context = PasswordContext {
            email: &email,
            display_name: &display_name,
        };
        self.passwords
            .check("new_password", &new_password, &context)?;
        let account = self.account_bucket(&email, None);
        let changes = self.password_change_bucket(user_id);
        self.limit("change_password", &[changes, account.clone()])
            .await?;
        if self.locked(stored.failed_logins) {
            return Err(AuthError::Locked);
        }
        let (session_id, ip) = (current.record.id, current.record.ip_address.clone());
        if !admitted
            .verify(current_password, Some(stored.password_hash))
            .await?
        {
            security::password_change(user_id, session_id, &ip, "wrong_current_password", 0);
            self.count_failure(user_id, &ip).await?;
            return Err(AuthError::WrongPassword);
        }
        self.limiter.reset(&account).await;
        let new_hash = self.hasher.hash(new_password).await?;
        let now = self.clock.now();
        let revocation = self
            .db
            .users()
            .change_password(user_id, &new_hash, current.record.id, now, self.since())
            .await?
            .ok_or(AuthError::InvalidSession)?;
        security::password_change(user_id, session_id, &ip, "changed", revocation.active);
        // The caller's session goes on with a new `authenticated_at`: its Redis copy is replaced
        // first, then every in-process copy (the old one's included) is dropped with the others.
        let mut record = current.record;
        record.authenticated_at = now;
        self.refresh_copy(&hash, &record).await;
        self.invalidate_with(Some("password_change"), &revocation, Some(&hash))
            .await?;
        Ok(revocation.active)
    }
}
