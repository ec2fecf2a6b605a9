//! The second factor: TOTP (RFC 6238: SHA-1, 6 digits, 30-second steps, as every authenticator
//! app reads an `otpauth://` URI), with single-use recovery codes.
//!
//! - Enrolment (EnrollTotp) needs a session and the current password (a fresh session alone is
//!   not enough: its thief must not put their authenticator on the account); it answers a fresh
//!   secret, which counts only once a code of it comes back (ConfirmTotp), when the recovery
//!   codes are issued. Removing the factor and new recovery codes need a session of level 2 and
//!   a code of the factor.
//! - A Login with the right password for an account with a confirmed second factor answers a
//!   challenge instead of a session: single-use, valid `ACCOUNTS__SECOND_FACTOR_CHALLENGE_TTL`,
//!   void after `ACCOUNTS__SECOND_FACTOR_ATTEMPTS` wrong codes. CompleteSecondFactor takes it with
//!   a TOTP code or a recovery code and opens a session of level 2 (`aal`).
//! - Every code is good once (`store::second_factor`): a TOTP code of the current step or either
//!   neighbour (±30 s of skew) is accepted only if its step is later than the last one accepted.
//! - Guessing costs what a password guess costs: the right password does not refill the
//!   account's guess bucket until the second factor is right too, every wrong code of a login
//!   counts as a failed login (the account locks out clients it does not trust at
//!   `RATE_LIMIT__MAX_FAILED_LOGINS`), and the login's per-address bucket pays every completion.
//!   Codes presented with a session (confirmation, removal, new recovery codes) pay that
//!   session's bucket (`RATE_LIMIT__LOGIN_PER_EMAIL` per window). Every wrong code, however
//!   presented, counts against the factor itself: after `RATE_LIMIT__MAX_FAILED_LOGINS` of them
//!   since its last right code it refuses checks but from clients the account trusts — a hard
//!   bound that no new password, reset or bucket refill lifts. The counts are taken under the
//!   account's lock, so concurrent guesses cannot overshoot them.
//! - A session's level is fixed at its creation, like `authenticated_at`: a cached copy never
//!   needs to catch up with it, and a copy of an earlier release (without it) understates it.
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tracing::instrument;
use uuid::Uuid;

use super::{
    AuthError, AuthService, IssuedCode, IssuedSession, SessionView, recovery::new_code, security,
    session::ClientInfo,
};
use crate::{
    cache::Bucket,
    model::totp::{authenticator, matching_step},
    store::{Attempt, Check, Code, Flow, Proof, Refusal},
};

/// The `operation` of `authd_rate_limited_total` for the second factor's own calls.
const LIMITED: &str = "second_factor";

/// Recovery codes issued at a time.
pub const RECOVERY_CODES: usize = 10;
/// A recovery code's characters (lowercase RFC 4648 base32: 80 bits), shown in groups of four.
pub const RECOVERY_CODE_LEN: usize = 16;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// The level of a session opened with a second factor (NIST SP 800-63B AAL2).
pub const AAL2: u8 = 2;

/// A TOTP secret to enrol in an authenticator app.
pub struct Enrolment {
    /// The secret, base32 (for typing in).
    pub secret: SecretString,
    /// `otpauth://totp/...`: what a QR code carries.
    pub uri: SecretString,
}

/// A second factor presented with a session or a challenge.
pub enum FactorCode {
    /// Six digits.
    Totp(String),
    /// A recovery code's hash (see `input::recovery_code`).
    Recovery([u8; 32]),
}

/// CompleteSecondFactor: the challenge's hash, the code, and the end user's client.
pub struct SecondFactorLogin {
    pub challenge_hash: [u8; 32],
    pub code: FactorCode,
    pub client: ClientInfo,
}

/// Fresh recovery codes (shown once) and their hashes.
fn new_recovery_codes() -> (Vec<SecretString>, Vec<[u8; 32]>) {
    (0..RECOVERY_CODES)
        .map(|_| {
            let mut bytes = [0u8; RECOVERY_CODE_LEN];
            getrandom::fill(&mut bytes).expect("the OS random number generator failed");
            // 256 is a multiple of 32: each character is uniform.
            let plain: String = bytes
                .iter()
                .map(|b| char::from(BASE32[usize::from(b & 31)]))
                .collect();
            let hash = recovery_hash(&plain);
            let shown = plain
                .as_bytes()
                .chunks(4)
                .map(|group| std::str::from_utf8(group).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("-");
            (SecretString::from(shown), hash)
        })
        .unzip()
}

/// The stored form of a recovery code (its 16 characters, lowercase, without separators).
pub fn recovery_hash(normalized: &str) -> [u8; 32] {
    Sha256::digest(normalized.as_bytes()).into()
}

impl AuthService {
    /// Codes presented with a session (confirmation, removal, new recovery codes): the
    /// session's bucket for them, never refunded (another session, a thief's, cannot empty it).
    fn factor_bucket(&self, session_id: Uuid) -> Bucket {
        let l = &self.limits;
        Bucket::new(
            "second_factor",
            &session_id.to_string(),
            l.login_per_email,
            l.login_window,
        )
    }

    /// Counts and logs a change to an account's second factor.
    fn factor_change(&self, action: &'static str, outcome: &'static str, view: &SessionView) {
        self.metrics()
            .second_factor_changes
            .with_label_values(&[action, outcome])
            .inc();
        let r = &view.record;
        security::second_factor_changed(action, r.user_id, &r.ip_address, outcome);
    }

    /// The session of `token`, once its owner's code has paid the session's bucket.
    async fn with_bucket(
        &self,
        token: &str,
        action: &'static str,
    ) -> Result<SessionView, AuthError> {
        let current = self.validate(token).await?;
        self.pay_code(current, action).await
    }

    /// A code presented with the session `current` pays the session's bucket.
    async fn pay_code(
        &self,
        current: SessionView,
        action: &'static str,
    ) -> Result<SessionView, AuthError> {
        let bucket = self.factor_bucket(current.record.id);
        if let Err(error) = self.limit(LIMITED, &[bucket]).await {
            self.factor_change(action, "refused", &current);
            return Err(error);
        }
        Ok(current)
    }

    /// `code` as the storage layer checks it under the account's lock, now; `trusted`: the
    /// client is one the account trusts (no cap on the factor's wrong codes for it).
    fn check<'a>(&self, code: &'a FactorCode, trusted: bool) -> Check<'a> {
        let code = match code {
            FactorCode::Totp(digits) => Code::Totp {
                digits,
                now: self.clock.now().timestamp(),
            },
            FactorCode::Recovery(hash) => Code::Recovery(hash),
        };
        let max = self.limits.max_failed_logins;
        let max_failures = (!trusted && max > 0).then(|| i32::try_from(max).unwrap_or(i32::MAX));
        Check { code, max_failures }
    }

    /// The session of `token`, of level 2 and signed in at most
    /// `ACCOUNTS__SECOND_FACTOR_MAX_AUTH_AGE` ago (a second factor's changes need one: a stolen
    /// session has minutes, not hours, to guess codes), whose code pays its bucket.
    async fn with_code(&self, token: &str, action: &'static str) -> Result<SessionView, AuthError> {
        let current = self.validate(token).await?;
        // When the factor was proven: the session's creation (ChangePassword renews
        // `authenticated_at` with the password alone, not this).
        let (aal, at) = (current.record.aal, current.record.created_at);
        let max_age = self.flows.second_factor_max_auth_age;
        let recent = (self.clock.now() - at)
            .to_std()
            .is_ok_and(|age| age <= max_age);
        let refused = match (aal >= AAL2, recent) {
            (false, _) => AuthError::SecondFactorMissing(aal),
            (true, false) => AuthError::ReauthenticationRequired,
            (true, true) => return self.pay_code(current, action).await,
        };
        self.factor_change(action, "refused", &current);
        Err(refused)
    }

    /// A refused code presented with a session: a wrong one (counted), or too many of them.
    fn refused_code(
        &self,
        action: &'static str,
        refusal: Refusal,
        view: &SessionView,
    ) -> AuthError {
        match refusal {
            Refusal::Locked => {
                self.factor_change(action, "refused", view);
                AuthError::Locked
            }
            Refusal::Wrong => {
                self.factor_change(action, "invalid_code", view);
                AuthError::InvalidCode
            }
            // No confirmed factor to check the code against.
            _ => {
                self.factor_change(action, "refused", view);
                AuthError::InvalidCode
            }
        }
    }

    /// Starts a TOTP enrolment for the session's account, with its current password (a guess
    /// paid like ChangePassword's): a fresh secret (replacing one never confirmed).
    /// FAILED_PRECONDITION when the account has a confirmed one.
    #[instrument(skip_all)]
    pub async fn enroll_totp(
        &self,
        token: &str,
        password: SecretString,
    ) -> Result<Enrolment, AuthError> {
        // The password always: a session alone (however fresh: a token stolen a minute after
        // its sign-in) must not be able to put its holder's authenticator on the account.
        let (current, _) = self
            .reauthenticated(token, Some(password), std::time::Duration::ZERO, LIMITED)
            .await?;
        let user_id = current.record.user_id;
        let (_, email, _) = self
            .db
            .users()
            .find_credentials_by_id(user_id)
            .await?
            .ok_or(AuthError::InvalidSession)?;
        let mut secret = [0u8; 20];
        getrandom::fill(&mut secret).expect("the OS random number generator failed");
        if !self.db.second_factor().enroll(user_id, &secret).await? {
            self.factor_change("enroll", "refused", &current);
            return Err(AuthError::SecondFactorEnrolled);
        }
        self.factor_change("enroll", "done", &current);
        let totp = authenticator(secret.to_vec(), &self.flows.totp_issuer, &email);
        Ok(Enrolment {
            secret: SecretString::from(totp.get_secret_base32()),
            uri: SecretString::from(totp.get_url()),
        })
    }

    /// Confirms the enrolment with a code of its secret: from now on Login asks for the second
    /// factor. The recovery codes, shown once.
    #[instrument(skip_all)]
    pub async fn confirm_totp(
        &self,
        token: &str,
        code: &str,
    ) -> Result<Vec<SecretString>, AuthError> {
        let current = self.with_bucket(token, "confirm").await?;
        let user_id = current.record.user_id;
        let stored = match self.db.second_factor().find(user_id).await? {
            None => {
                self.factor_change("confirm", "refused", &current);
                return Err(AuthError::SecondFactorNotEnrolled);
            }
            Some(stored) if stored.confirmed => {
                self.factor_change("confirm", "refused", &current);
                return Err(AuthError::SecondFactorEnrolled);
            }
            Some(stored) => stored,
        };
        let now = self.clock.now().timestamp();
        let (codes, hashes) = new_recovery_codes();
        let confirmed = match matching_step(&stored.secret, code, now, 0) {
            Some(step) => {
                self.db
                    .second_factor()
                    .confirm(user_id, &stored.secret, step, &hashes)
                    .await?
            }
            None => false,
        };
        if !confirmed {
            self.factor_change("confirm", "invalid_code", &current);
            return Err(AuthError::InvalidCode);
        }
        self.factor_change("confirm", "done", &current);
        Ok(codes)
    }

    /// Removes the account's second factor, from a session of level 2, once one of its codes is
    /// presented.
    #[instrument(skip_all)]
    pub async fn remove_totp(&self, token: &str, code: FactorCode) -> Result<(), AuthError> {
        let current = self.with_code(token, "remove").await?;
        let user_id = current.record.user_id;
        let check = self.check(&code, false);
        if let Err(refusal) = self.db.second_factor().remove(user_id, Some(check)).await? {
            return Err(self.refused_code("remove", refusal, &current));
        }
        self.factor_change("remove", "done", &current);
        Ok(())
    }

    /// Replaces the account's recovery codes, from a session of level 2, once one of its codes
    /// is presented.
    #[instrument(skip_all)]
    pub async fn regenerate_recovery_codes(
        &self,
        token: &str,
        code: FactorCode,
    ) -> Result<Vec<SecretString>, AuthError> {
        let current = self.with_code(token, "regenerate").await?;
        let user_id = current.record.user_id;
        let (codes, hashes) = new_recovery_codes();
        let check = self.check(&code, false);
        let replaced = self
            .db
            .second_factor()
            .regenerate(user_id, check, &hashes)
            .await?;
        if let Err(refusal) = replaced {
            return Err(self.refused_code("regenerate", refusal, &current));
        }
        self.factor_change("regenerate", "done", &current);
        Ok(codes)
    }

    /// An operator's removal (a lost authenticator and lost recovery codes); whether the account
    /// had a confirmed second factor. NOT_FOUND for an unknown account.
    pub async fn remove_second_factor_for(&self, user_id: Uuid) -> Result<bool, AuthError> {
        if self
            .db
            .users()
            .find_credentials_by_id(user_id)
            .await?
            .is_none()
        {
            return Err(AuthError::UserNotFound);
        }
        let removed = matches!(
            self.db.second_factor().remove(user_id, None).await?,
            Ok(true)
        );
        let outcome = if removed { "done" } else { "refused" };
        self.metrics()
            .second_factor_changes
            .with_label_values(&["admin_remove", outcome])
            .inc();
        security::second_factor_changed("admin_remove", user_id, "", outcome);
        Ok(removed)
    }

    /// A Login's answer for an account with a confirmed second factor: a challenge, instead of a
    /// session. `trusted`: the client the account trusts (whose guess bucket the completion pays,
    /// spared the account's lockout), and whether it is trusted with the factor (spared its cap).
    /// `verified_hash`: the password the login checked; the challenge is stored only while it
    /// is still the account's (UNAUTHENTICATED otherwise, as a wrong password).
    pub(super) async fn challenge(
        &self,
        user_id: Uuid,
        (verified_hash, trusted): (&str, (Option<&[u8]>, bool)),
        ip: &str,
    ) -> AuthError {
        let ttl: Duration = self.flows.second_factor_challenge_ttl;
        let (code, hash) = new_code();
        let expires_at = self.clock.now() + ttl;
        let issued = self
            .db
            .second_factor()
            .issue_challenge(user_id, &hash, (ttl, verified_hash), trusted)
            .await;
        match issued {
            Ok(true) => {}
            Ok(false) => return AuthError::InvalidCredentials,
            Err(error) => return error.into(),
        }
        self.flow_outcome(Flow::SecondFactor, ("start", "issued"), Some(user_id), ip);
        AuthError::SecondFactorRequired(IssuedCode { code, expires_at })
    }

    /// Completes a login's challenge with a TOTP code or a recovery code: a session of level 2.
    /// UNAUTHENTICATED for a challenge that is unknown, expired, used or void, or a wrong or
    /// used code (each a failed login).
    #[instrument(skip_all)]
    pub async fn complete_second_factor(
        &self,
        login: SecondFactorLogin,
    ) -> Result<IssuedSession, AuthError> {
        let ip = login.client.ip_address.clone();
        let outcome = |step_outcome, user| {
            self.flow_outcome(Flow::SecondFactor, ("complete", step_outcome), user, &ip);
        };
        let address = self.address_bucket("login", &login.client);
        if let Err(error) = self.limit("login", &[address]).await {
            outcome("rate_limited", None);
            return Err(error);
        }
        let max_attempts = i32::try_from(self.flows.second_factor_attempts).unwrap_or(i32::MAX);
        let factors = self.db.second_factor();
        let found = factors
            .challenge(&login.challenge_hash, max_attempts)
            .await?;
        let Some(challenge) = found else {
            outcome("invalid_code", None);
            return Err(AuthError::InvalidCode);
        };
        let user_id = challenge.user_id;
        let trusted = challenge.trusted_client.as_deref();
        let account = self.account_bucket(&challenge.email_normalized, trusted);
        if let Err(error) = self.limit("login", std::slice::from_ref(&account)).await {
            outcome("rate_limited", Some(user_id));
            return Err(error);
        }
        if trusted.is_none() && self.locked(challenge.failed_logins) {
            self.metrics()
                .rate_limited
                .with_label_values(&["login"])
                .inc();
            outcome("locked", Some(user_id));
            return Err(AuthError::Locked);
        }
        let client = self.client_hash(&login.client);
        let attempt = Attempt {
            challenge: &login.challenge_hash,
            max_attempts,
            check: self.check(&login.code, challenge.trusted_with_factor),
        };
        let proof = Proof::SecondFactor(attempt);
        match self
            .open_session(user_id, login.client, client, proof, AAL2)
            .await?
        {
            Ok(issued) => {
                self.limiter.reset(&account).await;
                outcome("completed", Some(user_id));
                Ok(issued)
            }
            Err(Refusal::Wrong) => {
                self.metrics().failed_logins.inc();
                if trusted.is_none() {
                    self.count_failure(user_id, &ip).await?;
                }
                outcome("invalid_code", Some(user_id));
                Err(AuthError::InvalidCode)
            }
            Err(Refusal::Locked) => {
                self.metrics()
                    .rate_limited
                    .with_label_values(&["login"])
                    .inc();
                outcome("locked", Some(user_id));
                Err(AuthError::Locked)
            }
            // The code was right, and is used: the account must change its password first.
            Err(Refusal::ChangeRequired) => {
                outcome("change_required", Some(user_id));
                security::login_failed(Some(user_id), &ip, "password_change_required");
                Err(AuthError::PasswordChangeRequired(
                    self.reset_code_for(user_id).await?,
                ))
            }
            // Completed by a concurrent call, void meanwhile, or the password changed: nothing
            // was checked, no failure is counted.
            Err(Refusal::Gone | Refusal::FactorRequired) => {
                outcome("invalid_code", Some(user_id));
                Err(AuthError::InvalidCode)
            }
        }
    }
}

/// Shown once: the codes as the caller passes them on.
pub fn exposed(codes: &[SecretString]) -> Vec<String> {
    codes.iter().map(|c| c.expose_secret().to_owned()).collect()
}
