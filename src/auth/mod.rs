//! Authentication: accounts' credentials and sessions. No transport or SQL here, only the rules.
mod admin;
mod email;
mod erasure;
pub mod input;
mod invalidation;
pub mod jwt;
pub mod keys;
mod limits;
pub mod lookups;
mod maintenance;
mod manage;
pub mod password;
pub mod password_policy;
mod recovery;
pub mod second_factor;
pub mod security;
mod service;
pub mod session;

/// Session tokens and their hashes (they live in `model`, which the stores share).
pub use crate::model::token;

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;

pub use email::{EmailChangeStarted, EmailCode, EmailVerified};
pub use lookups::{Found, Paid, UnknownLookups};
pub use manage::SessionList;
pub use recovery::{FlowLimits, IssuedCode, PasswordReset};
pub use service::{AuthParts, AuthService, Credentials, IssuedSession, Registration, SessionView};

use crate::store::StoreError;

/// The fleet's clock (see [`crate::clock`]).
impl AuthService {
    pub fn clock(&self) -> &crate::clock::Clock {
        &self.clock
    }

    pub(super) fn metrics(&self) -> &crate::metrics::Metrics {
        self.cache.redis().metrics()
    }
}

/// See [`AuthService::set_fill_hook`]; called with the session id.
pub type FillHook = Arc<dyn Fn(uuid::Uuid) -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid request")]
    InvalidInput(Vec<input::FieldViolation>),
    /// Unknown email or wrong password: deliberately indistinguishable.
    #[error("invalid email or password")]
    InvalidCredentials,
    /// Missing, malformed, unknown, expired or revoked token: deliberately indistinguishable.
    #[error("invalid or expired session")]
    InvalidSession,
    #[error("an account with this email already exists")]
    EmailTaken,
    /// The current password given to ChangePassword is wrong.
    #[error("the current password is incorrect")]
    WrongPassword,
    /// An account flow's code that is unknown, expired, used, or of another flow or account:
    /// deliberately indistinguishable.
    #[error("invalid, expired or already used code")]
    InvalidCode,
    #[error("session not found")]
    SessionNotFound,
    #[error("too many attempts; retry later")]
    RateLimited { retry_after: Duration },
    /// Too many consecutive wrong passwords: only clients the account trusts may sign in.
    #[error(
        "too many failed attempts on this account; sign in from a device you used before, or ask \
         an administrator"
    )]
    Locked,
    #[error("too many requests; retry later")]
    Overloaded { retry_after: Duration },
    /// The right password for an account whose new password an administrator requires: the code
    /// that completes the change (CompletePasswordReset), instead of a session.
    #[error("a new password is required: complete the change with the code in the error details")]
    PasswordChangeRequired(recovery::IssuedCode),
    /// StartEmailVerification for an account whose address is verified already.
    #[error("the account's email address is verified already")]
    EmailAlreadyVerified,
    /// Deleting the account needs the current password, or a session authenticated recently.
    #[error("this needs a recent sign-in: send the current password, or sign in again and retry")]
    ReauthenticationRequired,
    /// ValidateSession with `max_auth_age`: the session's password was checked earlier (when).
    #[error("this needs a more recent sign-in than the session's: sign in again")]
    StaleAuthentication(chrono::DateTime<chrono::Utc>),
    /// The right password for an account with a second factor: the challenge that
    /// CompleteSecondFactor takes with a code of it, instead of a session.
    #[error(
        "a second factor is required: complete the login with the challenge in the error details"
    )]
    SecondFactorRequired(recovery::IssuedCode),
    /// ValidateSession with `min_assurance_level`: the session's level is lower (which).
    #[error("this needs a session signed in with a second factor: sign in again with it")]
    SecondFactorMissing(u8),
    /// EnrollTotp or ConfirmTotp for an account whose second factor is confirmed already.
    #[error("the account has a second factor already: remove it first")]
    SecondFactorEnrolled,
    /// ConfirmTotp without an enrolment to confirm.
    #[error("no TOTP enrolment to confirm: call EnrollTotp first")]
    SecondFactorNotEnrolled,
    /// The right password for an account an administrator disabled.
    #[error("this account is disabled; contact support")]
    Disabled,
    /// No such user (AdminService).
    #[error("user not found")]
    UserNotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A feature this server's settings leave off (its name).
    #[error("{0} are not enabled on this server")]
    NotEnabled(&'static str),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<password::HashError> for AuthError {
    fn from(error: password::HashError) -> Self {
        match error {
            password::HashError::Overloaded => AuthError::Overloaded {
                retry_after: Duration::from_millis(100),
            },
            password::HashError::Failed(e) => AuthError::Internal(e),
        }
    }
}
