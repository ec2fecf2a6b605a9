//! `envoy.service.auth.v3.Authorization` (Envoy's external authorization over gRPC; Istio's
//! `envoyExtAuthzGrpc`, Contour, Gloo): "may this proxied request pass, and as whom?" — answered
//! as `ValidateSession` answers, from the in-process cache when it is on.
//!
//! - The token is taken from `authorization: Bearer <token>` (`EXT_AUTHZ__BEARER`), else from
//!   the cookie `EXT_AUTHZ__COOKIE` names; nothing else is read.
//! - A valid session: OK, the upstream request gets `EXT_AUTHZ__USER_ID_HEADER` and
//!   `EXT_AUTHZ__SESSION_ID_HEADER` (overwriting what the client sent), loses the
//!   `authorization` header it was proven by, and Envoy's dynamic metadata
//!   (`envoy.filters.http.ext_authz`) gets `user_id`, `session_id` and `expires_at` for its
//!   RBAC filter.
//! - No token, or one that is not valid: a denied response of 401 with `WWW-Authenticate:
//!   Bearer` (RFC 6750), never Envoy's default 403.
//! - PostgreSQL or Redis trouble (the answer unknown): the call fails (UNAVAILABLE, as
//!   `ValidateSession` would), which Envoy with `failure_mode_allow: false` answers with its
//!   `status_on_error` — the request does not pass.
//!
//! Envoy sends every header of the proxied request: the request is read from its bytes
//! (`wire`), and only the headers named here are looked at, none copied (`server` serves the
//! method with that request type, over the same wire format as Envoy's).
use std::{borrow::Cow, collections::HashMap, sync::Arc};

use envoy_types::pb::{
    envoy::{
        config::core::v3::{
            HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
        },
        service::auth::v3::{
            CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response::HttpResponse,
        },
        r#type::v3::{HttpStatus, StatusCode as HttpStatusCode},
    },
    google::{
        protobuf::{Struct, Value, value::Kind},
        rpc,
    },
};
use tonic::{Code, Status};

use super::bearer_token;
use crate::{
    auth::{self, AuthError, SessionView},
    config::ExtAuthzSettings,
};

mod server;
mod wire;

pub use server::AuthorizationServer;
use wire::{CheckRequestView, Form, Header};

/// The gRPC path of Check (for the pool share and the metrics' label sets).
pub const SERVICE: &str = "envoy.service.auth.v3.Authorization";

pub struct ExtAuthzGrpc {
    service: Arc<auth::AuthService>,
    settings: ExtAuthzSettings,
}

impl ExtAuthzGrpc {
    pub fn new(service: Arc<auth::AuthService>, settings: ExtAuthzSettings) -> Self {
        Self { service, settings }
    }
}

/// Where a request's token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Bearer,
    Cookie,
}

/// Why a request is refused: RFC 6750's error codes of `WWW-Authenticate: Bearer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// No credential at all: the challenge alone.
    Missing,
    /// A credential in a form authd cannot read (two cookies that differ, a scheme that is
    /// not Bearer with no cookie to fall back on).
    Malformed,
    /// A token that is not (or no longer) a valid session's.
    Invalid,
    /// The request carries one of the identity headers (or a look-alike with `_` for `-`,
    /// which CGI-style frameworks read as the same): Envoy's overwrite replaces only the first
    /// of repeated headers and never a look-alike, so a forged identity could reach the
    /// upstream beside authd's.
    Forged,
}

/// A header of the proxied request, by its lower-case name (Envoy sends names in lower case),
/// whichever way Envoy sent it: `headers`, or `header_map` with `encode_raw_headers` (where a
/// repeated header is joined by `,`, as Envoy joins it in `headers`). Only the headers authd
/// reads are looked up: nothing is copied for the others.
fn header<'r>(headers: &[Header<'r>], name: &str) -> Option<Cow<'r, str>> {
    // In the map, the last entry of a key is the one (as protobuf decodes maps).
    let mapped = headers
        .iter()
        .rev()
        .find(|h| h.form == Form::Map && h.key == name.as_bytes());
    if let Some(h) = mapped {
        return Some(String::from_utf8_lossy(h.value));
    }
    let mut values = headers
        .iter()
        .filter(|h| h.form == Form::List && h.key.eq_ignore_ascii_case(name.as_bytes()))
        .map(|h| String::from_utf8_lossy(h.value));
    let first = values.next()?;
    // Repeated cookie headers are one list of cookies (RFC 6265 joins them with "; ").
    let separator = if name == "cookie" { "; " } else { "," };
    Some(values.fold(first, |mut joined, next| {
        let joined_mut = joined.to_mut();
        joined_mut.push_str(separator);
        joined_mut.push_str(&next);
        joined
    }))
}

/// The token the settings say to read, and where it was found.
fn credential<'h>(
    settings: &ExtAuthzSettings,
    authorization: Option<&'h str>,
    cookie: Option<&'h str>,
) -> Result<(&'h str, Source), Refusal> {
    let authorization = authorization.filter(|_| settings.bearer);
    if let Some(value) = authorization {
        if let Some(token) = bearer_token(value) {
            return Ok((token, Source::Bearer));
        }
        // A Bearer credential authd cannot read (a tab, two joined by a repeated header) is
        // refused, not passed on beside a cookie's identity.
        let scheme = value.trim_start().get(..6);
        if scheme.is_some_and(|s| s.eq_ignore_ascii_case("bearer")) {
            return Err(Refusal::Malformed);
        }
    }
    let cookies = settings
        .cookie
        .as_deref()
        .and_then(|name| Some((name, cookie?)));
    if let Some((name, header)) = cookies {
        let mut found = cookie::Cookie::split_parse(header)
            .filter_map(Result::ok)
            .filter(|c| c.name() == name)
            .filter_map(|c| c.value_raw())
            .map(|value| value.trim_matches('"'));
        if let Some(first) = found.next() {
            if found.any(|other| other != first) {
                return Err(Refusal::Malformed);
            }
            return Ok((first, Source::Cookie));
        }
    }
    match authorization {
        Some(_) => Err(Refusal::Malformed),
        None => Err(Refusal::Missing),
    }
}

fn string(value: String) -> Value {
    Value {
        kind: Some(Kind::StringValue(value)),
    }
}

fn set_header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn allowed(settings: &ExtAuthzSettings, view: SessionView, source: Source) -> CheckResponse {
    let user_id = view.record.user_id.to_string();
    let session_id = view.record.id.to_string();
    let expires_at = view
        .expires_at
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let metadata = Struct {
        fields: HashMap::from([
            ("user_id".to_owned(), string(user_id.clone())),
            ("session_id".to_owned(), string(session_id.clone())),
            ("expires_at".to_owned(), string(expires_at)),
        ]),
    };
    CheckResponse {
        status: Some(rpc::Status {
            code: Code::Ok as i32,
            ..Default::default()
        }),
        dynamic_metadata: Some(metadata),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![
                set_header(&settings.user_id_header, user_id),
                set_header(&settings.session_id_header, session_id),
            ],
            headers_to_remove: match source {
                Source::Bearer => vec!["authorization".to_owned()],
                Source::Cookie => Vec::new(),
            },
            ..Default::default()
        })),
    }
}

/// Whether the request carries a header named like `names` (case, and `_` for `-`, aside).
fn carries_any(headers: &[Header<'_>], names: [&str; 2]) -> bool {
    headers.iter().any(|h| like_any(h.key, names))
}

/// Whether `key` is one of `names` (case, and `_` for `-`, aside).
fn like_any(key: &[u8], names: [&str; 2]) -> bool {
    names.iter().any(|name| {
        key.len() == name.len()
            && key
                .iter()
                .zip(name.bytes())
                .all(|(&k, n)| k.to_ascii_lowercase() == n || (k == b'_' && n == b'-'))
    })
}

/// The headers a Check looks at: the token's, and the identity headers' look-alikes.
fn read_by_check(key: &[u8], identity: [&str; 2]) -> bool {
    key.eq_ignore_ascii_case(b"authorization")
        || key.eq_ignore_ascii_case(b"cookie")
        || like_any(key, identity)
}

fn denied(refusal: Refusal) -> CheckResponse {
    let (challenge, message) = match refusal {
        Refusal::Missing => (r#"Bearer realm="authd""#, "a session token is required"),
        Refusal::Malformed => (
            r#"Bearer realm="authd", error="invalid_request""#,
            "the credential is not a bearer session token",
        ),
        Refusal::Invalid => (
            r#"Bearer realm="authd", error="invalid_token""#,
            "invalid or expired session",
        ),
        Refusal::Forged => (
            r#"Bearer realm="authd", error="invalid_request""#,
            "the request carries an identity header only authd may set",
        ),
    };
    // RFC 6750: a request authd cannot read is a 400, a missing or invalid token a 401.
    let status = match refusal {
        Refusal::Malformed | Refusal::Forged => HttpStatusCode::BadRequest,
        Refusal::Missing | Refusal::Invalid => HttpStatusCode::Unauthorized,
    };
    let www_authenticate = set_header("www-authenticate", challenge.to_owned());
    CheckResponse {
        status: Some(rpc::Status {
            code: Code::Unauthenticated as i32,
            message: message.to_owned(),
            details: Vec::new(),
        }),
        dynamic_metadata: None,
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: status as i32,
            }),
            headers: vec![
                www_authenticate,
                set_header("content-type", "text/plain; charset=utf-8".to_owned()),
            ],
            body: format!("{message}\n"),
        })),
    }
}

impl ExtAuthzGrpc {
    /// The answer to a Check.
    async fn check(&self, request: &CheckRequestView) -> Result<CheckResponse, Status> {
        let identity = [
            self.settings.user_id_header.as_str(),
            self.settings.session_id_header.as_str(),
        ];
        let headers = request
            .headers(|key| read_by_check(key, identity))
            .map_err(|_| {
                Status::invalid_argument("attributes: the CheckRequest does not decode")
            })?;
        if carries_any(&headers, identity) {
            return Ok(denied(Refusal::Forged));
        }
        let authorization = header(&headers, "authorization");
        let cookie = match self.settings.cookie {
            Some(_) => header(&headers, "cookie"),
            None => None,
        };
        let (token, source) =
            match credential(&self.settings, authorization.as_deref(), cookie.as_deref()) {
                Ok(found) => found,
                Err(refusal) => return Ok(denied(refusal)),
            };
        match self.service.validate(token).await {
            Ok(view) => Ok(allowed(&self.settings, view, source)),
            Err(AuthError::InvalidSession) => Ok(denied(Refusal::Invalid)),
            // The answer is unknown (PostgreSQL or Redis trouble, a budget spent): the call
            // fails, and Envoy (failure_mode_allow: false) refuses the request.
            Err(error) => Err(error.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
    use prost::Message;

    use super::*;

    /// What authd reads of `request`, sent as Envoy sends it.
    fn view(request: &CheckRequest) -> CheckRequestView {
        CheckRequestView::decode(request.encode_to_vec().as_slice()).unwrap()
    }

    /// The credential of a request with these headers, sent as Envoy's `headers`.
    fn credential_of(
        settings: &ExtAuthzSettings,
        pairs: &[(&str, &str)],
    ) -> Result<(String, Source), Refusal> {
        use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
        let request = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(attribute_context::HttpRequest {
                        headers: pairs
                            .iter()
                            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                            .collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let view = view(&request);
        let headers = view.headers(|_| true).unwrap();
        let (authorization, cookie) = (
            header(&headers, "authorization"),
            header(&headers, "cookie"),
        );
        credential(settings, authorization.as_deref(), cookie.as_deref())
            .map(|(token, source)| (token.to_owned(), source))
    }

    #[test]
    fn the_token_comes_from_the_sources_the_settings_name_and_nowhere_else() {
        let bearer_only = ExtAuthzSettings::default();
        let both = ExtAuthzSettings {
            cookie: Some("sid".into()),
            ..ExtAuthzSettings::default()
        };
        let cookie_only = ExtAuthzSettings {
            bearer: false,
            ..both.clone()
        };
        let auth: &[(&str, &str)] = &[("authorization", "Bearer abc")];
        assert_eq!(
            credential_of(&bearer_only, auth),
            Ok(("abc".into(), Source::Bearer))
        );
        assert_eq!(credential_of(&cookie_only, auth), Err(Refusal::Missing));
        let jar: &[(&str, &str)] = &[("cookie", "theme=dark; sid=xyz; other=1")];
        assert_eq!(credential_of(&bearer_only, jar), Err(Refusal::Missing));
        assert_eq!(
            credential_of(&both, jar),
            Ok(("xyz".into(), Source::Cookie))
        );
        // The bearer token first; a scheme other than Bearer falls back to the cookie.
        let mixed: &[(&str, &str)] = &[("authorization", "Bearer abc"), ("cookie", "sid=xyz")];
        assert_eq!(
            credential_of(&both, mixed),
            Ok(("abc".into(), Source::Bearer))
        );
        let basic: &[(&str, &str)] = &[("authorization", "Basic dTpw"), ("cookie", "sid=xyz")];
        assert_eq!(
            credential_of(&both, basic),
            Ok(("xyz".into(), Source::Cookie))
        );
        assert_eq!(
            credential_of(&bearer_only, &[("authorization", "Basic dTpw")]),
            Err(Refusal::Malformed)
        );
        // A token in a header no setting names is no token.
        let elsewhere: &[(&str, &str)] = &[
            ("x-session-token", "abc"),
            ("x-authorization", "Bearer abc"),
        ];
        assert_eq!(credential_of(&both, elsewhere), Err(Refusal::Missing));
        // Two cookies of the name that differ: ambiguous, refused; the same twice is one.
        let two: &[(&str, &str)] = &[("cookie", "sid=a; sid=b")];
        assert_eq!(credential_of(&both, two), Err(Refusal::Malformed));
        let twice: &[(&str, &str)] = &[("cookie", "sid=a; x=1; sid=a")];
        assert_eq!(
            credential_of(&both, twice),
            Ok(("a".into(), Source::Cookie))
        );
        // A Bearer credential authd cannot read is refused, not passed over for the cookie.
        for unreadable in ["Bearer\tabc", "Bearer a,Bearer b", "bearer"] {
            let mixed: &[(&str, &str)] = &[("authorization", unreadable), ("cookie", "sid=xyz")];
            assert_eq!(
                credential_of(&both, mixed),
                Err(Refusal::Malformed),
                "{unreadable:?}"
            );
        }
        // A cookie whose name only ends like the one named is another cookie.
        let lookalike: &[(&str, &str)] = &[("cookie", "xsid=a")];
        assert_eq!(credential_of(&both, lookalike), Err(Refusal::Missing));
    }

    #[test]
    fn a_request_carrying_an_identity_header_or_a_look_alike_is_caught() {
        use envoy_types::pb::envoy::{
            config::core::v3::{HeaderMap, HeaderValue},
            service::auth::v3::{AttributeContext, attribute_context},
        };
        let names = ["x-authd-user-id", "x-authd-session-id"];
        let request = |headers: &[&str], raw: &[&str]| CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(attribute_context::HttpRequest {
                        headers: headers
                            .iter()
                            .map(|k| ((*k).to_owned(), "v".to_owned()))
                            .collect(),
                        header_map: Some(HeaderMap {
                            headers: raw
                                .iter()
                                .map(|k| HeaderValue {
                                    key: (*k).to_owned(),
                                    raw_value: b"v".to_vec(),
                                    ..Default::default()
                                })
                                .collect(),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        for forged in [
            "x-authd-user-id",
            "x_authd_user_id",
            "X-Authd-Session-Id",
            "x-authd_session-id",
        ] {
            let carries = |request: CheckRequest| {
                let view = view(&request);
                carries_any(&view.headers(|_| true).unwrap(), names)
            };
            assert!(carries(request(&[forged], &[])), "{forged}");
            assert!(carries(request(&[], &[forged])), "{forged} (header_map)");
        }
        for innocent in [
            "x-authd-user",
            "x-authd-user-ids",
            "authorization",
            "xauthd-user-id",
        ] {
            let view = view(&request(&[innocent], &[innocent]));
            assert!(
                !carries_any(&view.headers(|_| true).unwrap(), names),
                "{innocent}"
            );
        }
    }

    #[test]
    fn repeated_cookie_headers_are_one_list_of_cookies() {
        use envoy_types::pb::envoy::{
            config::core::v3::{HeaderMap, HeaderValue},
            service::auth::v3::{AttributeContext, attribute_context},
        };
        let raw = |key: &str, value: &str| HeaderValue {
            key: key.to_owned(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        };
        let request = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(attribute_context::HttpRequest {
                        header_map: Some(HeaderMap {
                            headers: vec![raw("cookie", "a=1"), raw("cookie", "sid=T")],
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let view = view(&request);
        let headers = view.headers(|_| true).unwrap();
        let cookie = header(&headers, "cookie");
        assert_eq!(cookie.as_deref(), Some("a=1; sid=T"));
        let settings = ExtAuthzSettings {
            cookie: Some("sid".into()),
            ..ExtAuthzSettings::default()
        };
        assert_eq!(
            credential(&settings, None, cookie.as_deref()),
            Ok(("T", Source::Cookie))
        );
    }
}
