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
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use envoy_types::pb::{
    envoy::{
        config::core::v3::{
            HeaderValue, HeaderValueOption, address, header_value_option::HeaderAppendAction,
        },
        service::auth::v3::{
            CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
            authorization_server::Authorization, check_response::HttpResponse,
        },
        r#type::v3::{HttpStatus, StatusCode as HttpStatusCode},
    },
    google::{
        protobuf::{Struct, Value, value::Kind},
        rpc,
    },
};
use tonic::{Code, Request, Response, Status};

use super::bearer_token;
use crate::{
    auth::{self, AuthError, SessionView},
    config::ExtAuthzSettings,
    store::{Work, as_work, current_work},
};

pub use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;

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
}

/// The request's headers, keyed by lower-case name, whichever way Envoy sent them (`headers`,
/// or `header_map` with `encode_raw_headers`); repeated headers joined by `,` as Envoy does.
fn headers(request: &CheckRequest) -> HashMap<String, String> {
    let Some(http) = request
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
    else {
        return HashMap::new();
    };
    let mut headers: HashMap<String, String> = http
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    for header in http.header_map.iter().flat_map(|m| &m.headers) {
        let value = match header.raw_value.is_empty() {
            true => header.value.clone(),
            false => String::from_utf8_lossy(&header.raw_value).into_owned(),
        };
        headers
            .entry(header.key.to_ascii_lowercase())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    headers
}

/// The token the settings say to read, and where it was found.
fn credential<'h>(
    settings: &ExtAuthzSettings,
    headers: &'h HashMap<String, String>,
) -> Result<(&'h str, Source), Refusal> {
    let authorization = headers.get("authorization").filter(|_| settings.bearer);
    if let Some(token) = authorization.and_then(|v| bearer_token(v)) {
        return Ok((token, Source::Bearer));
    }
    let cookies = settings
        .cookie
        .as_deref()
        .and_then(|name| Some((name, headers.get("cookie")?)));
    if let Some((name, header)) = cookies {
        let mut found = cookie::Cookie::split_parse(header.as_str())
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

/// The downstream client's address as Envoy saw it: the budget of unknown lookups is kept by it,
/// not by the proxy's.
fn downstream(request: &CheckRequest) -> Option<IpAddr> {
    let address = request
        .attributes
        .as_ref()?
        .source
        .as_ref()?
        .address
        .as_ref()?;
    match address.address.as_ref()? {
        address::Address::SocketAddress(socket) => socket.address.parse().ok(),
        _ => None,
    }
}

fn string(value: String) -> Value {
    Value {
        kind: Some(Kind::StringValue(value)),
    }
}

fn header(key: &str, value: String) -> HeaderValueOption {
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
                header(&settings.user_id_header, user_id),
                header(&settings.session_id_header, session_id),
            ],
            headers_to_remove: match source {
                Source::Bearer => vec!["authorization".to_owned()],
                Source::Cookie => Vec::new(),
            },
            ..Default::default()
        })),
    }
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
    };
    let mut www_authenticate = header("www-authenticate", challenge.to_owned());
    www_authenticate.append_action = HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
    CheckResponse {
        status: Some(rpc::Status {
            code: Code::Unauthenticated as i32,
            message: message.to_owned(),
            details: Vec::new(),
        }),
        dynamic_metadata: None,
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: HttpStatusCode::Unauthorized as i32,
            }),
            headers: vec![
                www_authenticate,
                header("content-type", "text/plain; charset=utf-8".to_owned()),
            ],
            body: format!("{message}\n"),
        })),
    }
}

impl ExtAuthzGrpc {
    async fn decide(&self, request: &CheckRequest) -> Result<CheckResponse, Status> {
        let headers = headers(request);
        let (token, source) = match credential(&self.settings, &headers) {
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

#[tonic::async_trait]
impl Authorization for ExtAuthzGrpc {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let request = request.into_inner();
        let call = current_work();
        let work = Work {
            peer: downstream(&request).or(call.peer),
            ..call
        };
        let decided = as_work(work, self.decide(&request)).await?;
        Ok(Response::new(decided))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
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
        let auth = with(&[("authorization", "Bearer abc")]);
        assert_eq!(credential(&bearer_only, &auth), Ok(("abc", Source::Bearer)));
        assert_eq!(credential(&cookie_only, &auth), Err(Refusal::Missing));
        let jar = with(&[("cookie", "theme=dark; sid=xyz; other=1")]);
        assert_eq!(credential(&bearer_only, &jar), Err(Refusal::Missing));
        assert_eq!(credential(&both, &jar), Ok(("xyz", Source::Cookie)));
        // The bearer token first; a scheme other than Bearer falls back to the cookie.
        let mixed = with(&[("authorization", "Bearer abc"), ("cookie", "sid=xyz")]);
        assert_eq!(credential(&both, &mixed), Ok(("abc", Source::Bearer)));
        let basic = with(&[("authorization", "Basic dTpw"), ("cookie", "sid=xyz")]);
        assert_eq!(credential(&both, &basic), Ok(("xyz", Source::Cookie)));
        assert_eq!(
            credential(&bearer_only, &with(&[("authorization", "Basic dTpw")])),
            Err(Refusal::Malformed)
        );
        // A token in a header no setting names is no token.
        let elsewhere = with(&[
            ("x-session-token", "abc"),
            ("x-authorization", "Bearer abc"),
        ]);
        assert_eq!(credential(&both, &elsewhere), Err(Refusal::Missing));
        // Two cookies of the name that differ: ambiguous, refused; the same twice is one.
        let two = with(&[("cookie", "sid=a; sid=b")]);
        assert_eq!(credential(&both, &two), Err(Refusal::Malformed));
        let twice = with(&[("cookie", "sid=a; x=1; sid=a")]);
        assert_eq!(credential(&both, &twice), Ok(("a", Source::Cookie)));
        // A cookie whose name only ends like the one named is another cookie.
        let lookalike = with(&[("cookie", "xsid=a")]);
        assert_eq!(credential(&both, &lookalike), Err(Refusal::Missing));
    }
}
