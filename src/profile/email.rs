//! Email verification and change, the profiles' part: the new version that shows the
//! verification is written to Redis inside `AuthService::complete_email`'s one wait (see
//! `auth::email`).
use tracing::instrument;

use super::{ProfileError, ProfileService};
use crate::{
    auth::{EmailCode, EmailVerified},
    store::Flow,
};

impl ProfileService {
    /// VerifyEmail: the account's address verified, once no instance serves a copy of its
    /// sessions or profile that says otherwise.
    #[instrument(skip_all)]
    pub async fn verify_email(&self, code: EmailCode) -> Result<EmailVerified, ProfileError> {
        self.complete_email(Flow::EmailVerification, code).await
    }

    /// ConfirmEmailChange: the new address the account's, verified, with the same wait.
    #[instrument(skip_all)]
    pub async fn confirm_email_change(
        &self,
        code: EmailCode,
    ) -> Result<EmailVerified, ProfileError> {
        self.complete_email(Flow::EmailChange, code).await
    }

    async fn complete_email(
        &self,
        flow: Flow,
        code: EmailCode,
    ) -> Result<EmailVerified, ProfileError> {
        let publish = |profile, logged| self.publish(profile, logged);
        Ok(self.auth.complete_email(flow, code, publish).await?)
    }
}
