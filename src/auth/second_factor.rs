//! The second factor: TOTP (RFC 6238: SHA-1, 6 digits, 30-second steps, as every authenticator
//! app reads an `otpauth://` URI), with single-use recovery codes.
//!
//! - Enrolment (EnrollTotp) needs a session and its owner's proof (the current password, or a
//!   sign-in within `ACCOUNTS__SECOND_FACTOR_MAX_AUTH_AGE`); it answers a fresh secret, which
//!   counts only once a code of it comes back (ConfirmTotp), when the recovery codes are issued.
//! - A Login with the right password for an account with a confirmed second factor answers a
//!   challenge instead of a session: single-use, valid `ACCOUNTS__SECOND_FACTOR_CHALLENGE_TTL`,
//!   void after `ACCOUNTS__SECOND_FACTOR_ATTEMPTS` wrong codes. CompleteSecondFactor takes it with
//!   a TOTP code or a recovery code and opens a session of level 2 (`aal`).
//! - Every code is good once (`store::second_factor`): a TOTP code of the current step or either
//!   neighbour (±30 s of skew) is accepted only if its step is later than the last one accepted.
//! - Guessing costs what a password guess costs: the right password does not refill the
//!   account's guess bucket until the second factor is right too, every wrong code counts as a
//!   failed login (the account locks out clients it does not trust at
//!   `RATE_LIMIT__MAX_FAILED_LOGINS`), and the login's per-address bucket pays every completion.
//!   Codes presented with a session (confirmation, removal, new recovery codes) pay the account's
//!   second-factor bucket (`RATE_LIMIT__LOGIN_PER_EMAIL` per window).
//! - A session's level is fixed at its creation, like `authenticated_at`: a cached copy never
//!   needs to catch up with it, and a copy of an earlier release (without it) understates it.
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, TOTP};
use tracing::instrument;
use uuid::Uuid;

use super::{
    AuthError, AuthService, IssuedCode, IssuedSession, SessionView, recovery::new_code, security,
    session::ClientInfo,
};
use crate::{
    cache::Bucket,
    store::{Factor, Flow, Proof},
};

/// Recovery codes issued at a time.
pub const RECOVERY_CODES: usize = 10;
/// A recovery code's characters (lowercase RFC 4648 base32: 80 bits), shown in groups of four.
pub const RECOVERY_CODE_LEN: usize = 16;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// RFC 6238's time step, in seconds.
const STEP: i64 = 30;
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

/// The authenticator's view of `secret`: SHA-1, 6 digits, 30-second steps.
fn authenticator(secret: Vec<u8>, issuer: &str, account: &str) -> TOTP {
    // Neither may hold ':' in an otpauth label (the issuer is checked at start-up).
    TOTP::new_unchecked(
        Algorithm::SHA1,
        6,
        1,
        STEP.unsigned_abs(),
        secret,
        Some(issuer.to_owned()),
        account.replace(':', "_"),
    )
}

/// The latest step, among the current one and its neighbours, whose code is `code` and which
/// is later than `after` (a code is good once).
fn matching_step(secret: &[u8], code: &str, now: i64, after: i64) -> Option<i64> {
    let totp = authenticator(secret.to_vec(), "", "");
    let current = now.div_euclid(STEP);
    (current - 1..=current + 1).rev().find(|&step| {
        step > after
            && u64::try_from(step * STEP)
                .is_ok_and(|t| bool::from(totp.generate(t).as_bytes().ct_eq(code.as_bytes())))
    })
}

impl AuthService {
    /// Codes presented with a session (confirmation, removal, new recovery codes): the
    /// account's bucket for them, never refunded.
    fn factor_bucket(&self, user_id: Uuid) -> Bucket {
        let l = &self.limits;
        Bucket::new(
            "second_factor",
            &user_id.to_string(),
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

    /// The session of `token`, and what its owner's code `code` pays first.
    async fn with_code(&self, token: &str, action: &'static str) -> Result<SessionView, AuthError> {
        let current = self.validate(token).await?;
        let bucket = self.factor_bucket(current.record.user_id);
        if let Err(error) = self.limit(action, &[bucket]).await {
            self.factor_change(action, "refused", &current);
            return Err(error);
        }
        Ok(current)
    }

    /// What `code` is, checked against the account's confirmed second factor as far as it can
    /// be before the statement that uses it: a TOTP code's step, or a recovery code's hash.
    async fn factor<'a>(
        &self,
        user_id: Uuid,
        code: &'a FactorCode,
    ) -> Result<Option<Factor<'a>>, AuthError> {
        match code {
            FactorCode::Recovery(hash) => Ok(Some(Factor::RecoveryCode(hash))),
            FactorCode::Totp(digits) => {
                let stored = self.db.second_factor().find(user_id).await?;
                let now = self.clock.now().timestamp();
                Ok(stored.filter(|s| s.confirmed).and_then(|s| {
                    matching_step(&s.secret, digits, now, s.last_used_step).map(Factor::Totp)
                }))
            }
        }
    }

    /// Starts a TOTP enrolment for the session's account: a fresh secret (replacing one never
    /// confirmed). FAILED_PRECONDITION when the account has a confirmed one.
    #[instrument(skip_all)]
    pub async fn enroll_totp(
        &self,
        token: &str,
        password: Option<SecretString>,
    ) -> Result<Enrolment, AuthError> {
        let max_age = self.flows.second_factor_max_auth_age;
        let (current, _) = self
            .reauthenticated(token, password, max_age, "enroll_totp")
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
        let current = self.with_code(token, "confirm_totp").await?;
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

    /// Removes the account's second factor, once one of its codes is presented.
    #[instrument(skip_all)]
    pub async fn remove_totp(&self, token: &str, code: FactorCode) -> Result<(), AuthError> {
        let current = self.with_code(token, "remove_totp").await?;
        let user_id = current.record.user_id;
        let removed = match self.factor(user_id, &code).await? {
            Some(factor) => {
                self.db
                    .second_factor()
                    .remove(user_id, Some(factor))
                    .await?
            }
            None => false,
        };
        if !removed {
            self.factor_change("remove", "invalid_code", &current);
            return Err(AuthError::InvalidCode);
        }
        self.factor_change("remove", "done", &current);
        Ok(())
    }

    /// Replaces the account's recovery codes, once one of its codes is presented.
    #[instrument(skip_all)]
    pub async fn regenerate_recovery_codes(
        &self,
        token: &str,
        code: FactorCode,
    ) -> Result<Vec<SecretString>, AuthError> {
        let current = self.with_code(token, "regenerate_recovery_codes").await?;
        let user_id = current.record.user_id;
        let (codes, hashes) = new_recovery_codes();
        let replaced = match self.factor(user_id, &code).await? {
            Some(factor) => {
                self.db
                    .second_factor()
                    .regenerate(user_id, factor, &hashes)
                    .await?
            }
            None => false,
        };
        if !replaced {
            self.factor_change("regenerate", "invalid_code", &current);
            return Err(AuthError::InvalidCode);
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
        let removed = self.db.second_factor().remove(user_id, None).await?;
        let outcome = if removed { "done" } else { "refused" };
        self.metrics()
            .second_factor_changes
            .with_label_values(&["admin_remove", outcome])
            .inc();
        security::second_factor_changed("admin_remove", user_id, "", outcome);
        Ok(removed)
    }

    /// A Login's answer for an account with a confirmed second factor: a challenge, instead of a
    /// session. `trusted`: the client the account trusts, whose guess bucket the completion pays.
    pub(super) async fn challenge(
        &self,
        user_id: Uuid,
        trusted: Option<&[u8]>,
        ip: &str,
    ) -> AuthError {
        let ttl: Duration = self.flows.second_factor_challenge_ttl;
        let (code, hash) = new_code();
        let expires_at = self.clock.now() + ttl;
        let issued = self
            .db
            .second_factor()
            .issue_challenge(user_id, &hash, ttl, trusted)
            .await;
        if let Err(error) = issued {
            return error.into();
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
        let factors = self.db.second_factor();
        let Some(challenge) = factors.challenge(&login.challenge_hash).await? else {
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
            outcome("locked", Some(user_id));
            return Err(AuthError::Locked);
        }
        let client = self.client_hash(&login.client);
        let issued = match self.factor(user_id, &login.code).await? {
            Some(factor) => {
                let proof = Proof::SecondFactor {
                    challenge: &login.challenge_hash,
                    factor,
                };
                self.open_session(user_id, login.client, client, proof, AAL2)
                    .await?
            }
            None => None,
        };
        let Some(issued) = issued else {
            self.metrics().failed_logins.inc();
            let max = self.flows.second_factor_attempts;
            factors.challenge_failed(&login.challenge_hash, max).await?;
            if trusted.is_none() {
                self.count_failure(user_id, &ip).await?;
            }
            outcome("invalid_code", Some(user_id));
            return Err(AuthError::InvalidCode);
        };
        self.limiter.reset(&account).await;
        outcome("completed", Some(user_id));
        Ok(issued)
    }
}

/// Shown once: the codes as the caller passes them on.
pub fn exposed(codes: &[SecretString]) -> Vec<String> {
    codes.iter().map(|c| c.expose_secret().to_owned()).collect()
}
