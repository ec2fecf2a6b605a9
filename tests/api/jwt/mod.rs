//! Short-lived JWTs minted from a session (`IssueJwt`), verified as an independent service
//! would: PyJWT, with the keys fetched from the JWKS the metrics listener publishes.
use std::time::Duration;

use serde_json::{Value, json};
use tonic::{Code, Request};

use crate::{
    events::{SUBSCRIBER_KEY, Watcher, sql, subscribed_settings},
    helpers::*,
};
use authd::{config::JwtAlgorithm, proto::authd::v1 as pb};

mod keys;

pub const AUDIENCE: &str = "orders";
const ISSUER: &str = "https://authd.test";

/// Test settings with JWTs on, for `orders` and `billing`.
fn minting(mode: Mode) -> authd::config::Settings {
    enable(test_settings(mode))
}

pub fn enable(mut settings: authd::config::Settings) -> authd::config::Settings {
    settings.jwt.enabled = true;
    settings.jwt.issuer = ISSUER.into();
    settings.jwt.audiences = vec![AUDIENCE.into(), "billing".into()];
    settings
}

pub async fn issue(
    app: &TestApp,
    token: &str,
    audience: &str,
    ttl: Option<Duration>,
) -> Result<pb::IssueJwtResponse, tonic::Status> {
    app.auth
        .clone()
        .issue_jwt(pb::IssueJwtRequest {
            session_token: token.into(),
            audience: audience.into(),
            ttl: ttl.map(|t| prost_types::Duration::try_from(t).unwrap()),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// What PyJWT makes of `jwt` for `audience`, with the keys of `app`'s JWKS URL:
/// `Ok((claims, header))`, or the name of PyJWT's exception. The header's `kid` must be the
/// thumbprint of the key that verified the JWT, computed by the verifier from the JWKS.
async fn verify(app: &TestApp, jwt: &str, audience: &str) -> Result<(Value, Value), String> {
    let url = format!(
        "http://{}/.well-known/jwks.json",
        app.metrics_addr.expect("the metrics listener")
    );
    let request = json!({"jwt": jwt, "jwks_url": url, "audience": audience, "issuer": ISSUER});
    let mut verifier = tokio::process::Command::new("python3");
    verifier.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/verify_jwt.py"
    ));
    let input = request.to_string();
    let out = run_with_input(verifier, input.as_bytes(), "python3 is on PATH").await;
    assert!(
        out.status.success(),
        "the verifier failed (pip install 'pyjwt[crypto]'; see docs/development.md): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    match printed.get("error") {
        Some(error) => Err(error.as_str().unwrap().to_owned()),
        None => {
            let (claims, header) = (printed["claims"].clone(), printed["header"].clone());
            assert_eq!(
                header["kid"], printed["thumbprint"],
                "the kid is the key's RFC 7638 thumbprint"
            );
            Ok((claims, header))
        }
    }
}

/// The published keys, as `GET /.well-known/jwks.json` serves them.
async fn jwks_document(app: &TestApp) -> (reqwest_like::Response, Value) {
    let response = reqwest_like::get(app.metrics_addr.unwrap(), "/.well-known/jwks.json").await;
    let body = serde_json::from_str(&response.body).unwrap_or(Value::Null);
    (response, body)
}

/// The key ids of the published keys.
async fn published(app: &TestApp) -> Vec<String> {
    let (_, document) = jwks_document(app).await;
    document["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// A plain HTTP/1.1 GET, as a verifier's JWKS fetch makes it.
mod reqwest_like {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub struct Response {
        pub status: u16,
        pub headers: String,
        pub body: String,
    }

    pub async fn get(addr: SocketAddr, path: &str) -> Response {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        Response {
            status,
            headers: head.to_ascii_lowercase(),
            body: body.to_owned(),
        }
    }
}

/// A minted JWT verifies with PyJWT against the published keys, for either algorithm, and says
/// whose session it is; the gRPC JWKS is the HTTP one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minted_jwt_verifies_with_an_independent_library_against_the_jwks() {
    for algorithm in [JwtAlgorithm::EdDSA, JwtAlgorithm::ES256] {
        let mut settings = minting(Mode::Redis);
        settings.jwt.algorithm = algorithm;
        let app = spawn_with(settings).await;
        let (_, reg) = app.register().await;
        let ttl = Duration::from_secs(120);
        let minted = issue(&app, &reg.session_token, AUDIENCE, Some(ttl))
            .await
            .unwrap();
        let (claims, header) = verify(&app, &minted.jwt, AUDIENCE)
            .await
            .unwrap_or_else(|e| panic!("{algorithm:?}: {e}"));
        let session = reg.session.as_ref().unwrap();
        assert_eq!(header["alg"], algorithm.name());
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], published(&app).await[0].as_str());
        assert_eq!(claims["sub"], reg.user_id.as_str());
        assert_eq!(claims["sid"], session.session_id.as_str());
        assert_eq!(claims["aud"], AUDIENCE);
        assert_eq!(claims["iss"], ISSUER);
        assert_eq!(claims["amr"], serde_json::json!(["pwd"]));
        let created = session.created_at.unwrap();
        assert_eq!(
            claims["sid_created_us"].as_i64().unwrap(),
            created.seconds * 1_000_000 + i64::from(created.nanos / 1000)
        );
        let (iat, exp) = (
            claims["iat"].as_i64().unwrap(),
            claims["exp"].as_i64().unwrap(),
        );
        assert_eq!(exp - iat, 120);
        assert_eq!(minted.expires_at.unwrap().seconds, exp);
        assert!(!claims["jti"].as_str().unwrap().is_empty());
        let again = issue(&app, &reg.session_token, AUDIENCE, None)
            .await
            .unwrap();
        let (claims_again, _) = verify(&app, &again.jwt, AUDIENCE).await.unwrap();
        assert_ne!(claims_again["jti"], claims["jti"], "every JWT its own id");
        assert_eq!(
            claims_again["exp"].as_i64().unwrap() - claims_again["iat"].as_i64().unwrap(),
            300,
            "JWT__MAX_TTL when the caller asks for no lifetime"
        );

        let (response, document) = jwks_document(&app).await;
        assert_eq!(response.status, 200);
        assert!(response.headers.contains("content-type: application/json"));
        assert!(
            response
                .headers
                .contains("cache-control: private, max-age=300")
        );
        let grpc = app
            .auth
            .clone()
            .get_jwks(pb::GetJwksRequest {})
            .await
            .unwrap()
            .into_inner();
        let as_json: Vec<Value> = grpc
            .keys
            .iter()
            .map(|k| {
                let mut member = serde_json::Map::new();
                for (name, value) in [
                    ("kty", &k.kty),
                    ("crv", &k.crv),
                    ("x", &k.x),
                    ("y", &k.y),
                    ("kid", &k.kid),
                    ("alg", &k.alg),
                    ("use", &k.r#use),
                ] {
                    if !value.is_empty() {
                        member.insert(name.into(), json!(value));
                    }
                }
                Value::Object(member)
            })
            .collect();
        assert_eq!(json!(as_json), document["keys"], "{algorithm:?}");
    }
}

/// The verifier refuses a JWT for another audience, and one past its `exp`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verifier_refuses_another_audience_and_an_expired_jwt() {
    let app = spawn_with(minting(Mode::Redis)).await;
    let (_, reg) = app.register().await;
    let billing = issue(&app, &reg.session_token, "billing", None)
        .await
        .unwrap();
    assert_eq!(
        verify(&app, &billing.jwt, AUDIENCE).await.unwrap_err(),
        "InvalidAudienceError"
    );
    verify(&app, &billing.jwt, "billing").await.unwrap();

    let short = issue(
        &app,
        &reg.session_token,
        AUDIENCE,
        Some(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let expires = short.expires_at.unwrap().seconds;
    // PyJWT refuses from `exp` on (no leeway): wait until that second has come.
    while chrono::Utc::now().timestamp() < expires + 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        verify(&app, &short.jwt, AUDIENCE).await.unwrap_err(),
        "ExpiredSignatureError"
    );
}

/// A JWT never outlives its session's deadline, whatever lifetime the caller asks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_never_outlives_its_session() {
    let mut settings = minting(Mode::Redis);
    settings.session.idle_timeout = Duration::from_secs(30);
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    let minted = issue(
        &app,
        &reg.session_token,
        AUDIENCE,
        Some(Duration::from_secs(300)),
    )
    .await
    .unwrap();
    let session = app.validate_full(&reg.session_token).await.unwrap();
    let deadline = session.session.unwrap().expires_at.unwrap().seconds;
    let exp = minted.expires_at.unwrap().seconds;
    assert!(
        exp <= deadline,
        "exp {exp}, the session's deadline {deadline}"
    );
    let (claims, _) = verify(&app, &minted.jwt, AUDIENCE).await.unwrap();
    assert_eq!(claims["exp"].as_i64().unwrap(), exp);
}

/// A revoked session mints nothing, on the instance that revoked it and on every other at once
/// (the revocation guarantee of ValidateSession); an unknown token neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_mints_nothing_on_any_instance() {
    let a = spawn_with(minting(Mode::Redis)).await;
    let b = spawn_sharing(&a, |_| {}).await;
    let (_, reg) = a.register().await;
    let token = &reg.session_token;
    // B holds the session in memory before the revocation.
    issue(&b, token, AUDIENCE, None).await.unwrap();
    a.logout(token).await.unwrap();
    for app in [&a, &b] {
        assert_code(
            issue(app, token, AUDIENCE, None).await,
            Code::Unauthenticated,
        );
    }
    let made_up = format!("{token}x");
    assert_code(
        issue(&a, &made_up, AUDIENCE, None).await,
        Code::Unauthenticated,
    );
}

/// Bad requests name the field; a server with JWTs off says UNIMPLEMENTED and publishes no
/// JWKS; the token may come in `authorization: Bearer` metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field_and_jwts_are_off_by_default() {
    let app = spawn_with(minting(Mode::Redis)).await;
    let (_, reg) = app.register().await;
    let token = &reg.session_token;
    for (audience, ttl, field) in [
        ("", None, "audience"),
        ("payroll", None, "audience"),
        (
            AUDIENCE,
            Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }),
            "ttl",
        ),
        (
            AUDIENCE,
            Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
            "ttl",
        ),
        (
            AUDIENCE,
            Some(prost_types::Duration {
                seconds: 301,
                nanos: 0,
            }),
            "ttl",
        ),
    ] {
        let status = assert_code(
            app.auth
                .clone()
                .issue_jwt(pb::IssueJwtRequest {
                    session_token: token.clone(),
                    audience: audience.into(),
                    ttl,
                })
                .await,
            Code::InvalidArgument,
        );
        assert_eq!(violation_fields(&status), [field], "{audience:?} {ttl:?}");
    }
    // Without a valid session, nothing is said of the audiences.
    assert_code(
        issue(&app, &format!("{token}x"), "payroll", None).await,
        Code::Unauthenticated,
    );
    // The token in metadata; both, disagreeing.
    let mut request = Request::new(pb::IssueJwtRequest {
        audience: AUDIENCE.into(),
        ..Default::default()
    });
    let bearer = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", bearer);
    let minted = app
        .auth
        .clone()
        .issue_jwt(request)
        .await
        .unwrap()
        .into_inner();
    verify(&app, &minted.jwt, AUDIENCE).await.unwrap();
    let (_, other) = app.register().await;
    let mut request = Request::new(pb::IssueJwtRequest {
        session_token: other.session_token.clone(),
        audience: AUDIENCE.into(),
        ..Default::default()
    });
    let bearer = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", bearer);
    let status = assert_code(
        app.auth.clone().issue_jwt(request).await,
        Code::InvalidArgument,
    );
    assert_eq!(violation_fields(&status), ["session_token"]);

    let off = spawn_sharing(&app, |s| s.jwt.enabled = false).await;
    assert_code(
        issue(&off, token, AUDIENCE, None).await,
        Code::Unimplemented,
    );
    assert_code(
        off.auth.clone().get_jwks(pb::GetJwksRequest {}).await,
        Code::Unimplemented,
    );
    let (response, _) = jwks_document(&off).await;
    assert_eq!(response.status, 404);
}

/// The `sid` of a minted JWT is what the event stream names when its session is revoked, and
/// `sid_created_us` says exactly whether a revocation of every session of its user covers it:
/// a verifier that follows the stream denies the JWT from then on, not from its `exp`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_names_the_sid_of_a_revoked_sessions_jwts() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with(enable(subscribed_settings(Mode::Redis, dir.path()))).await;
    let (email, reg) = app.register().await;
    let mut watcher = Watcher::open(&app, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, "")
        .await
        .unwrap();
    watcher.next().await.unwrap();
    let claims_of = |token: String| {
        let app = &app;
        async move {
            let minted = issue(app, &token, AUDIENCE, None).await.unwrap();
            verify(app, &minted.jwt, AUDIENCE).await.unwrap().0
        }
    };

    let first = claims_of(reg.session_token.clone()).await;
    app.logout(&reg.session_token).await.unwrap();
    let (events, _) = watcher.events(1).await;
    match events[0].kind.as_ref().unwrap() {
        pb::event::Kind::SessionRevoked(revoked) => {
            assert_eq!(revoked.session_id, first["sid"].as_str().unwrap());
            assert_eq!(revoked.user_id, first["sub"].as_str().unwrap());
        }
        other => panic!("{other:?}"),
    }

    // "Log out everywhere else": the caller's session is kept, the older one is covered.
    let older = app.login(&email, PASSWORD).await.unwrap();
    let kept = app.login(&email, PASSWORD).await.unwrap();
    let older = claims_of(older.session_token).await;
    let kept_claims = claims_of(kept.session_token.clone()).await;
    app.revoke_all(&kept.session_token, false).await.unwrap();
    let newer = claims_of(app.login(&email, PASSWORD).await.unwrap().session_token).await;
    let (events, _) = watcher.events(1).await;
    let pb::event::Kind::SessionsRevoked(revoked) = events[0].kind.as_ref().unwrap() else {
        panic!("{events:?}");
    };
    let cutoff = revoked.cutoff.unwrap();
    let cutoff_us = cutoff.seconds * 1_000_000 + i64::from(cutoff.nanos / 1000);
    let covered = |claims: &Value| {
        claims["sub"].as_str() == Some(revoked.user_id.as_str())
            && claims["sid_created_us"].as_i64().unwrap() <= cutoff_us
            && claims["sid"].as_str() != Some(revoked.kept_session_id.as_str())
    };
    assert!(covered(&older), "the older session's JWT is denied");
    assert!(!covered(&kept_claims), "the kept session's JWT is not");
    assert!(
        !covered(&newer),
        "a session created after the cutoff is not, even within the same second"
    );
    app.validate(&kept.session_token).await.unwrap();
}
