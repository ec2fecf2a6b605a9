//! The one mapping from domain errors to gRPC statuses. Internal causes are logged here, once,
//! with their chain; callers get a fixed message, never SQL or Redis text.
use secrecy::ExposeSecret;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    auth::{AuthError, input::FieldViolation},
    events::EventsError,
    profile::ProfileError,
    store::StoreError,
};

/// The message of an INVALID_ARGUMENT stays under this many bytes (it travels in a header).
const MAX_MESSAGE: usize = 1024;

pub fn invalid_argument(violations: &[FieldViolation]) -> Status {
    let mut details = ErrorDetails::new();
    for v in violations {
        details.add_bad_request_violation(v.field.clone(), v.description.clone());
    }
    let mut summary = violations
        .iter()
        .map(|v| format!("{} {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    if summary.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !summary.is_char_boundary(end) {
            end -= 1;
        }
        summary.truncate(end);
        summary.push_str("...");
    }
    Status::with_error_details(Code::InvalidArgument, summary, details)
}

fn store_status(error: &StoreError) -> Status {
    match error {
        StoreError::Unavailable(_) => {
            tracing::warn!(error = %chain(error), "database unavailable");
            Status::unavailable("the database is unavailable; retry later")
        }
        // Conflicting writes to one account that outlasted the retries: retrying succeeds.
        StoreError::Contention(_) => {
            tracing::warn!(error = %chain(error), "database contention");
            Status::unavailable("the database is busy; retry")
        }
        // Logged where it happened (`store`), naming the privilege or object.
        StoreError::Schema(_) => Status::unavailable(
            "the database is not usable by this service (privileges or migrations); retry later",
        ),
        StoreError::Conflict { .. } | StoreError::Other(_) => internal(error),
    }
}

/// The error and its sources, outermost first.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn internal(error: &dyn std::error::Error) -> Status {
    tracing::error!(error = %chain(error), "internal error");
    Status::internal("internal error")
}

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Self {
        match &error {
            AuthError::InvalidInput(violations) => invalid_argument(violations),
            AuthError::InvalidCredentials
            | AuthError::InvalidSession
            | AuthError::WrongPassword
            | AuthError::InvalidCode => Status::unauthenticated(error.to_string()),
            AuthError::EmailTaken => Status::already_exists(error.to_string()),
            AuthError::SessionNotFound => Status::not_found(error.to_string()),
            AuthError::Overloaded { retry_after } | AuthError::RateLimited { retry_after } => {
                Status::with_error_details(
                    Code::ResourceExhausted,
                    error.to_string(),
                    ErrorDetails::with_retry_info(Some(*retry_after)),
                )
            }
            AuthError::Locked => Status::resource_exhausted(error.to_string()),
            AuthError::Disabled => Status::permission_denied(error.to_string()),
            AuthError::EmailAlreadyVerified => {
                let details = ErrorDetails::with_error_info("EMAIL_ALREADY_VERIFIED", "authd", []);
                Status::with_error_details(Code::FailedPrecondition, error.to_string(), details)
            }
            AuthError::StaleAuthentication(at) => {
                let metadata = [("authenticated_at".to_owned(), at.to_rfc3339())];
                let details =
                    ErrorDetails::with_error_info("REAUTHENTICATION_REQUIRED", "authd", metadata);
                Status::with_error_details(Code::FailedPrecondition, error.to_string(), details)
            }
            AuthError::ReauthenticationRequired => {
                let details =
                    ErrorDetails::with_error_info("REAUTHENTICATION_REQUIRED", "authd", []);
                Status::with_error_details(Code::FailedPrecondition, error.to_string(), details)
            }
            AuthError::PasswordChangeRequired(code) => {
                let metadata = [
                    ("code".to_owned(), code.code.expose_secret().to_owned()),
                    ("expires_at".to_owned(), code.expires_at.to_rfc3339()),
                ];
                let details =
                    ErrorDetails::with_error_info("PASSWORD_CHANGE_REQUIRED", "authd", metadata);
                Status::with_error_details(Code::FailedPrecondition, error.to_string(), details)
            }
            AuthError::SecondFactorRequired(challenge) => {
                let metadata = [
                    (
                        "challenge".to_owned(),
                        challenge.code.expose_secret().to_owned(),
                    ),
                    ("expires_at".to_owned(), challenge.expires_at.to_rfc3339()),
                    ("methods".to_owned(), "totp,recovery_code".to_owned()),
                ];
                let details =
                    ErrorDetails::with_error_info("SECOND_FACTOR_REQUIRED", "authd", metadata);
                Status::with_error_details(Code::FailedPrecondition, error.to_string(), details)
            }
            AuthError::SecondFactorMissing(level) => {
                let level = format!("ASSURANCE_LEVEL_AAL{level}");
                let metadata = [("assurance_level".to_owned(), level)];
                let details =
                    ErrorDetails::with_error_info("SECOND_FACTOR_REQUIRED", "authd", metadata);
                Status::with_error_details(Code::FailedPrecondition, error.to_string(), details)
            }
            AuthError::SecondFactorEnrolled => {
                let details = ErrorDetails::with_error_info("SECOND_FACTOR_ENROLLED", "authd", []);
                Status::with_error_details(Code::FailedPrecondition, error.to_string(), details)
            }
            AuthError::SecondFactorNotEnrolled => {
                let details =
                    ErrorDetails::with_error_info("SECOND_FACTOR_NOT_ENROLLED", "authd", []);
                Status::with_error_details(Code::FailedPrecondition, error.to_string(), details)
            }
            AuthError::UserNotFound => Status::not_found(error.to_string()),
            AuthError::NotEnabled(_) => Status::unimplemented(error.to_string()),
            AuthError::Store(store) => store_status(store),
            AuthError::Internal(_) => internal(&error),
        }
    }
}

impl From<ProfileError> for Status {
    fn from(error: ProfileError) -> Self {
        match error {
            ProfileError::InvalidInput(violations) => invalid_argument(&violations),
            ProfileError::NotFound => Status::not_found(error.to_string()),
            ProfileError::VersionMismatch => Status::aborted(error.to_string()),
            ProfileError::Auth(auth) => auth.into(),
            ProfileError::Store(store) => store_status(&store),
        }
    }
}

impl From<EventsError> for Status {
    fn from(error: EventsError) -> Self {
        let with_reason = |code, reason: &str| {
            let details = ErrorDetails::with_error_info(reason, "authd", []);
            Status::with_error_details(code, error.to_string(), details)
        };
        match &error {
            EventsError::Invalid { field, reason } => invalid_argument(&[FieldViolation {
                field: (*field).to_owned(),
                description: reason.clone(),
            }]),
            EventsError::Expired => with_reason(Code::OutOfRange, "POSITION_EXPIRED"),
            EventsError::LeaseLost => with_reason(Code::FailedPrecondition, "LEASE_ENDED"),
            EventsError::StrictOff => with_reason(Code::FailedPrecondition, "STRICT_MODE_OFF"),
            EventsError::Full { .. } => Status::with_error_details(
                Code::ResourceExhausted,
                error.to_string(),
                ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(1))),
            ),
            EventsError::ShuttingDown => Status::unavailable(error.to_string()),
            EventsError::Store(store) => store_status(store),
        }
    }
}
