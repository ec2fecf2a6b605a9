//! `EXT_AUTHZ__*`: Envoy's external authorization (`envoy.service.auth.v3.Authorization`) on
//! the gRPC port: where the session token is found in the proxied request, and the headers that
//! tell the upstream whom it serves.
use serde::Deserialize;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExtAuthzSettings {
    /// Whether `envoy.service.auth.v3.Authorization/Check` is served (off unless asked for:
    /// it takes larger messages than the other RPCs).
    pub enabled: bool,
    /// The token is taken from `authorization: Bearer <token>`.
    pub bearer: bool,
    /// The token is taken from this cookie (when no bearer token is given); none: cookies are
    /// not read.
    pub cookie: Option<String>,
    /// Set on an allowed request (overwriting what the client sent): the session's user id.
    pub user_id_header: String,
    /// Set on an allowed request (overwriting what the client sent): the session's id.
    pub session_id_header: String,
    /// The largest CheckRequest taken, in bytes (Envoy sends every header of the request:
    /// its own default limit on them is 60 KiB).
    pub max_request_size: usize,
}

impl Default for ExtAuthzSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            bearer: true,
            cookie: None,
            user_id_header: "x-authd-user-id".into(),
            session_id_header: "x-authd-session-id".into(),
            max_request_size: 64 * 1024,
        }
    }
}

/// Headers an identity header may not replace: the request's own framing and credentials.
const RESERVED: [&str; 6] = [
    "authorization",
    "cookie",
    "host",
    "content-length",
    "transfer-encoding",
    "te",
];

impl ExtAuthzSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled && !self.bearer && self.cookie.is_none() {
            return invalid(
                "EXT_AUTHZ__BEARER",
                "is false and EXT_AUTHZ__COOKIE is not set: a token could not be found anywhere",
            );
        }
        if let Some(name) = &self.cookie {
            // RFC 6265: a cookie name is an RFC 7230 token.
            let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if name.is_empty() || name.len() > 128 || !name.chars().all(token) {
                return invalid(
                    "EXT_AUTHZ__COOKIE",
                    "must be a cookie name (1 to 128 letters, digits or !#$%&'*+-.^_`|~)",
                );
            }
        }
        for (setting, name) in [
            ("EXT_AUTHZ__USER_ID_HEADER", &self.user_id_header),
            ("EXT_AUTHZ__SESSION_ID_HEADER", &self.session_id_header),
        ] {
            let valid = http::HeaderName::from_bytes(name.as_bytes()).is_ok()
                && name.bytes().all(|b| !b.is_ascii_uppercase())
                && !RESERVED.contains(&name.as_str());
            if !valid {
                return invalid(
                    setting,
                    "must be a lower-case header name other than authorization, cookie, host, \
                     content-length, transfer-encoding and te",
                );
            }
        }
        if self.user_id_header == self.session_id_header {
            return invalid(
                "EXT_AUTHZ__SESSION_ID_HEADER",
                "must differ from EXT_AUTHZ__USER_ID_HEADER",
            );
        }
        if !(1024..=256 * 1024).contains(&self.max_request_size) {
            return invalid(
                "EXT_AUTHZ__MAX_REQUEST_SIZE",
                "must be 1024 to 262144 (bytes)",
            );
        }
        Ok(())
    }
}
