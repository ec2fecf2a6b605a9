//! Password reset: a trusted caller (the notifier, admitted by `grpc::account`) starts the flow
//! for an email and receives the single-use code to deliver; whoever holds the code completes it
//! with a new password, and every session of the account is revoked through the revocation path
//! (the call returns when no instance accepts any of them).
//!
//! - Codes are 144 random bits, stored only as their SHA-256, bound to the flow and the account,
//!   valid for `ACCOUNTS__RESET_CODE_TTL`, used once: the statement that uses a code is the one
//!   that checks it, so of concurrent completions exactly one wins.
//! - A start for an email that matches no account (or a disabled one) answers exactly as for a
//!   known one: a code of the same form and lifetime (stored without an account, so it completes
//!   nothing), after the same work (the same buckets, the same statement writing one row).
//! - A completion whose answer was lost can be retried with the same code and password (also a
//!   duplicate that raced it, and for a grace past the code's expiry): it answers as the first
//!   did, after waiting for the same revocations (a state, not a call: `docs/guarantees.md`) —
//!   only while the password it set is still the account's; the check is a guess paid by the
//!   account's guess bucket, so a leaked used code is no better than a login.
//! - A password change, another completion, or the account disabled voids the codes issued
//!   before.
use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use tracing::instrument;
use uuid::Uuid;

use super::{
    AuthError, AuthService,
    input::{CODE_LEN, Email},
    password_policy::PasswordContext,
    security,
    session::ClientInfo,
};
use crate::{
    cache::Bucket,
    store::{Flow, StoredCode},
};

const FLOW: &str = "password_reset";

/// What the account flows may cost, and how long their codes live (`ACCOUNTS__*`).
#[derive(Debug, Clone)]
pub struct FlowLimits {
    pub reset_code_ttl: Duration,
    pub starts_per_account: u32,
    pub attempts_per_address: u32,
    pub window: Duration,
    /// A user deleting their account without their password must have signed in this recently.
    pub delete_max_auth_age: Duration,
    pub verify_code_ttl: Duration,
    /// A user changing their email address without their password must have signed in this
    /// recently.
    pub email_change_max_auth_age: Duration,
    pub totp_issuer: String,
    pub second_factor_max_auth_age: Duration,
    pub second_factor_challenge_ttl: Duration,
    pub second_factor_attempts: u32,
}

impl From<&crate::config::AccountsSettings> for FlowLimits {
    fn from(s: &crate::config::AccountsSettings) -> Self {
        Self {
            reset_code_ttl: s.reset_code_ttl,
            starts_per_account: s.starts_per_account,
            attempts_per_address: s.attempts_per_address,
            window: s.window,
            delete_max_auth_age: s.delete_max_auth_age,
            verify_code_ttl: s.verify_code_ttl,
            email_change_max_auth_age: s.email_change_max_auth_age,
            totp_issuer: s.totp_issuer.clone(),
            second_factor_max_auth_age: s.second_factor_max_auth_age,
            second_factor_challenge_ttl: s.second_factor_challenge_ttl,
            second_factor_attempts: s.second_factor_attempts,
        }
    }
}

/// A code to deliver: shown once, to the notifier (or the operator, or the user who must change
/// their password).
#[derive(Debug)]
pub struct IssuedCode {
    pub code: SecretString,
    pub expires_at: DateTime<Utc>,
}

/// A completion: the code's hash (see `input::code`), the new password, and the end user's
/// client (its address pays).
pub struct PasswordReset {
    pub code_hash: [u8; 32],
    pub new_password: SecretString,
    pub client: ClientInfo,
}

/// A fresh code and its hash.
pub(super) fn new_code() -> (SecretString, [u8; 32]) {
    let mut bytes = [0u8; CODE_LEN / 4 * 3];
    getrandom::fill(&mut bytes).expect("the OS random number generator failed");
    let code = URL_SAFE_NO_PAD.encode(bytes);
    let hash = Sha256::digest(code.as_bytes()).into();
    (SecretString::from(code), hash)
}

impl AuthService {
    /// The address bucket of every flow call (starts and completions alike).
    pub(super) fn flow_address_bucket(&self, client: &ClientInfo) -> Bucket {
        let f = &self.flows;
        Bucket::new(
            "flow_address",
            &self.address(client),
            f.attempts_per_address,
            f.window,
        )
    }

    /// The account's bucket of starts: keyed by the email, known or not, so that an unknown
    /// email is refused exactly when a known one would be.
    pub(super) fn flow_account_bucket(&self, email_normalized: &str) -> Bucket {
        let f = &self.flows;
        let subject = hex::encode(Sha256::digest(email_normalized.as_bytes()));
        Bucket::new("flow_account", &subject, f.starts_per_account, f.window)
    }

    /// How a flow call ended: counted (`authd_account_flows_total`) and logged as a security
    /// event, with the account when one is known and the end user's address.
    pub(super) fn flow_outcome(
        &self,
        flow: Flow,
        (step, outcome): (&'static str, &'static str),
        user_id: Option<Uuid>,
        ip: &str,
    ) {
        self.metrics()
            .account_flows
            .with_label_values(&[flow.as_str(), step, outcome])
            .inc();
        security::account_flow(flow.as_str(), step, user_id, ip, outcome);
    }

    /// Starts a password reset for `email`: the code to deliver to it.
    #[instrument(skip_all)]
    pub async fn start_password_reset(
        &self,
        email: &Email,
        client: &ClientInfo,
    ) -> Result<IssuedCode, AuthError> {
        let buckets = [
            self.flow_address_bucket(client),
            self.flow_account_bucket(&email.normalized),
        ];
        if let Err(error) = self.limit(FLOW, &buckets).await {
            let outcome = ("start", "rate_limited");
            self.flow_outcome(Flow::PasswordReset, outcome, None, &client.ip_address);
            return Err(error);
        }
        let ttl = self.flows.reset_code_ttl;
        let (code, hash) = new_code();
        let expires_at = self.clock.now() + ttl;
        let user_id = self
            .db
            .codes()
            .issue(&email.normalized, Flow::PasswordReset, &hash, ttl)
            .await?;
        let outcome = if user_id.is_some() {
            "issued"
        } else {
            "unknown"
        };
        let outcome = ("start", outcome);
        self.flow_outcome(Flow::PasswordReset, outcome, user_id, &client.ip_address);
        Ok(IssuedCode { code, expires_at })
    }

    /// A reset code for this account, issued without a start (an operator's reset, a login that
    /// must change its password); NOT_FOUND for an unknown or disabled account.
    pub(super) async fn reset_code_for(&self, user_id: Uuid) -> Result<IssuedCode, AuthError> {
        let ttl = self.flows.reset_code_ttl;
        let (code, hash) = new_code();
        let expires_at = self.clock.now() + ttl;
        let issued = self
            .db
            .codes()
            .issue_for(user_id, Flow::PasswordReset, &hash, ttl)
            .await?;
        if !issued {
            return Err(AuthError::UserNotFound);
        }
        Ok(IssuedCode { code, expires_at })
    }

    /// A login with the right password whose account must change it: refused with a reset code
    /// instead of a session (only a caller who knows the password learns it, and gets the code).
    pub(super) async fn unless_change_required(
        &self,
        stored: &crate::store::Credentials,
        ip: &str,
    ) -> Result<(), AuthError> {
        if !stored.password_change_required {
            return Ok(());
        }
        security::login_failed(Some(stored.id), ip, "password_change_required");
        let code = self.reset_code_for(stored.id).await?;
        Err(AuthError::PasswordChangeRequired(code))
    }

    /// Completes a password reset: the sessions it revoked (all of the account's), once no
    /// instance accepts any of them.
    #[instrument(skip_all)]
    pub async fn complete_password_reset(&self, reset: PasswordReset) -> Result<usize, AuthError> {
        let ip = reset.client.ip_address.as_str();
        if let Err(error) = self
            .limit(FLOW, &[self.flow_address_bucket(&reset.client)])
            .await
        {
            return Err(self.refused(None, ip, "rate_limited", error));
        }
        let codes = self.db.codes();
        let Some(found) = codes.find(&reset.code_hash, Flow::PasswordReset).await? else {
            return Err(self.refused(None, ip, "invalid_code", AuthError::InvalidCode));
        };
        let user_id = found.user_id;
        if found.used {
            return self.retried_reset(found, reset.new_password, ip).await;
        }
        let context = PasswordContext {
            email: &found.email,
            display_name: &found.display_name,
        };
        if let Err(error) = self
            .passwords
            .check("new_password", &reset.new_password, &context)
        {
            return Err(self.refused(Some(user_id), ip, "weak_password", error));
        }
        let changes = self.password_change_bucket(user_id);
        if let Err(error) = self.limit(FLOW, std::slice::from_ref(&changes)).await {
            return Err(self.refused(Some(user_id), ip, "rate_limited", error));
        }
        let new_hash = self.hasher.hash(reset.new_password.clone()).await?;
        let Some(done) = codes
            .reset_password(&reset.code_hash, &new_hash, self.clock.now(), self.since())
            .await?
        else {
            // Another completion used it first (or it expired meanwhile): a duplicate of that
            // one — the same password — is answered as its retry.
            return match codes.find(&reset.code_hash, Flow::PasswordReset).await? {
                Some(found) if found.used => {
                    self.retried_reset(found, reset.new_password, ip).await
                }
                _ => Err(self.refused(Some(user_id), ip, "invalid_code", AuthError::InvalidCode)),
            };
        };
        let outcome = ("complete", "completed");
        self.flow_outcome(Flow::PasswordReset, outcome, Some(user_id), ip);
        // The owner may sign in at once, whatever guesses were made before.
        self.limiter
            .reset(&self.account_bucket(&found.email, None))
            .await;
        self.invalidate(Some(FLOW), &done.revocation).await?;
        Ok(done.revocation.active)
    }

    /// A completion of a used code: the one that used it, retried (the same password, still the
    /// account's), answers as it did once the revocations it made are applied everywhere;
    /// anything else is an invalid code. The password check is a guess at the account's
    /// password, paid by the account's guess bucket like a login's.
    async fn retried_reset(
        &self,
        found: StoredCode,
        password: SecretString,
        ip: &str,
    ) -> Result<usize, AuthError> {
        let user_id = found.user_id;
        let invalid = || self.refused(Some(user_id), ip, "invalid_code", AuthError::InvalidCode);
        if !(found.completed && found.still_current) {
            return Err(invalid());
        }
        let guesses = self.account_bucket(&found.email, None);
        if let Err(error) = self.limit(FLOW, std::slice::from_ref(&guesses)).await {
            return Err(self.refused(Some(user_id), ip, "rate_limited", error));
        }
        if !self
            .hasher
            .verify(password, Some(found.password_hash))
            .await?
        {
            return Err(invalid());
        }
        let pending = self
            .db
            .sessions()
            .pending_of_user(user_id, self.since())
            .await?;
        self.invalidate(None, &pending).await?;
        let outcome = ("complete", "retried");
        self.flow_outcome(Flow::PasswordReset, outcome, Some(user_id), ip);
        Ok(usize::try_from(found.revoked).unwrap_or(0))
    }

    /// A refused completion, counted and logged.
    fn refused(
        &self,
        user_id: Option<Uuid>,
        ip: &str,
        outcome: &'static str,
        error: AuthError,
    ) -> AuthError {
        self.flow_outcome(Flow::PasswordReset, ("complete", outcome), user_id, ip);
        error
    }
}
