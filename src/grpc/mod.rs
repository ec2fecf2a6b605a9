//! Transport: proto <-> domain conversion, input validation and error mapping. One file per gRPC
//! service; health and reflection are registered by `app`.
pub mod account;
pub mod admin;
pub mod auth;
pub mod disabled;
pub mod events;
pub mod ext_authz;
pub mod limits;
pub mod observe;
pub mod profile;
pub mod status;
pub mod tls;

use chrono::{DateTime, Utc};

use crate::{
    admin::{Access, Admission},
    auth::{AuthError, input::FieldViolation},
};

/// How `access` admits the caller of `request`: by its client certificate (the leaf) or its
/// `authorization` header (AdminService and EventService alike, each with its own lists).
pub(crate) fn admission<T>(access: &Access, request: &tonic::Request<T>) -> Admission {
    let certificate = request
        .extensions()
        .get::<limits::PeerInfo>()
        .and_then(|peer| peer.certificates.as_deref())
        .and_then(|chain| chain.first());
    let authorization = request
        .metadata()
        .get("authorization")
        .map(tonic::metadata::MetadataValue::as_bytes);
    access.admit(certificate, authorization)
}

/// A protobuf timestamp for a point in time.
pub(crate) fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// The token of `authorization: Bearer <token>` (the scheme in any case, RFC 7235), or `None`
/// when the value is not of that form.
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim_start();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
}

/// The session token of a call that acts for a session: `session_token` in its body, or
/// `authorization: Bearer <token>` in its metadata (what standard interceptors send). Given
/// both, they must be the same token: INVALID_ARGUMENT names `session_token` otherwise, and
/// `authorization` when its value is not a bearer token.
pub(crate) fn session_token<'a, T>(
    request: &'a tonic::Request<T>,
    body: &'a str,
) -> Result<&'a str, AuthError> {
    let Some(value) = request.metadata().get("authorization") else {
        return Ok(body);
    };
    let violation = |field: &str, description: &str| {
        AuthError::InvalidInput(vec![FieldViolation {
            field: field.to_owned(),
            description: description.to_owned(),
        }])
    };
    let Some(token) = value.to_str().ok().and_then(bearer_token) else {
        return Err(violation(
            "authorization",
            "must be \"Bearer <session token>\" (metadata)",
        ));
    };
    if !body.is_empty() && body != token {
        return Err(violation(
            "session_token",
            "differs from the token in the authorization metadata (send one, or the same)",
        ));
    }
    Ok(token)
}
