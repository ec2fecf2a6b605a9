//! Authentication: accounts' credentials and sessions. No transport or SQL here, only the rules.
pub mod input;
pub mod password;
mod service;
pub mod session;
pub mod token;

use std::time::Duration;

pub use service::{AuthService, Credentials, IssuedSession, Registration, SessionView};

use crate::store::StoreError;

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
    #[error("too many requests; retry later")]
    Overloaded { retry_after: Duration },
    #[error(transparent)]
    Store(#[from] StoreError),
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
