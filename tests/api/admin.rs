//! AdminService: who is admitted (client certificate SAN, bearer key, rotation), the audit of
//! every call, what each call does, DisableUser against racing logins, pagination; and TLS on
//! the gRPC port (rotation without a restart, the plaintext health port, `authd healthcheck`).
use std::{path::Path, process::Command, time::Duration};

use authd::proto::authd::v1::{self as pb, admin_service_client::AdminServiceClient};
use futures::future::join_all;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    helpers::{
        Hooks, Mode, PASSWORD, TestApp, assert_code, eventually, spawn_sharing, spawn_with,
        spawn_with_hooks, test_settings, violation_fields,
    },
    proxy::{Link, Proxy},
    topology::Certs,
};

const KEY: &str = "ops-key-0123456789abcdef";

/// A keys file holding `(name, key)` pairs (as their hashes).
fn write_keys(path: &Path, keys: &[(&str, &str)]) {
    let text: String = keys
        .iter()
        .map(|(name, key)| {
            format!(
                "[[key]]\nname = \"{name}\"\nsha256 = \"{}\"\n",
                hex::encode(Sha256::digest(key))
            )
        })
        .collect();
    // Written whole and renamed, as a Secret update is: never half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A plaintext app with AdminService admitted by [`KEY`] (keys file in `dir`).
async fn keyed_app(mode: Mode, dir: &Path) -> TestApp {
    spawn_with(keyed_settings(mode, dir)).await
}

/// The settings of [`keyed_app`].
fn keyed_settings(mode: Mode, dir: &Path) -> authd::config::Settings {
    let keys = dir.join("keys.toml");
    write_keys(&keys, &[("ops", KEY)]);
    let mut settings = test_settings(mode);
    settings.admin.api_keys_file = Some(keys);
    settings.admin.reload_interval = Duration::from_millis(100);
    settings.rate_limit.login_per_email = 0;
    settings
}

fn with_key<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

fn admin(app: &TestApp) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(app.channel.clone())
}

async fn get_user(app: &TestApp, key: &str, user_id: &str) -> Result<pb::User, tonic::Status> {
    let lookup = pb::get_user_request::Lookup::UserId(user_id.to_owned());
    admin(app)
        .get_user(with_key(
            key,
            pb::GetUserRequest {
                lookup: Some(lookup),
            },
        ))
        .await
        .map(|r| r.into_inner().user.unwrap())
}

/// The audit rows, oldest first: (caller, method, target, outcome).
async fn audit(app: &TestApp) -> Vec<(String, String, String, String)> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(
        app.settings.database.url.expose_secret(),
    )
    .await
    .unwrap();
    sqlx::query_as("select caller, method, target, outcome from admin_audit order by id")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_service_is_not_served_unless_configured() {
    let app = spawn_with(test_settings(Mode::NoRedis)).await;
    let (_, reg) = app.register().await;
    assert_code(get_user(&app, KEY, &reg.user_id).await, Code::Unimplemented);
}

/// Bearer keys: no credential is UNAUTHENTICATED, a wrong key PERMISSION_DENIED, the right one
/// admitted; rewriting the file rotates keys while the server runs; every call is audited
/// (caller, method, target, outcome) without the key, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_admit_rotate_and_every_call_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let app = keyed_app(Mode::NoRedis, dir.path()).await;
    let (email, reg) = app.register().await;
    let lookup = pb::get_user_request::Lookup::UserId(reg.user_id.clone());
    let anonymous = admin(&app)
        .get_user(pb::GetUserRequest {
            lookup: Some(lookup),
        })
        .await;
    assert_code(anonymous, Code::Unauthenticated);
    assert_code(
        get_user(&app, "not-the-key", &reg.user_id).await,
        Code::PermissionDenied,
    );
    let user = get_user(&app, KEY, &reg.user_id).await.unwrap();
    assert_eq!(user.email, email);
    assert_eq!(user.active_session_count, 1);
    assert!(!user.disabled);

    write_keys(
        &dir.path().join("keys.toml"),
        &[("ops-2", "rotated-key-fedcba9876543210")],
    );
    eventually(
        Duration::from_secs(5),
        "the rotated key is admitted",
        || async {
            get_user(&app, "rotated-key-fedcba9876543210", &reg.user_id)
                .await
                .is_ok()
        },
    )
    .await;
    assert_code(
        get_user(&app, KEY, &reg.user_id).await,
        Code::PermissionDenied,
    );

    let rows = audit(&app).await;
    let expect = [
        ("anonymous", "Unauthenticated"),
        ("key:unknown", "PermissionDenied"),
        ("key:ops", "Ok"),
    ];
    for (i, (caller, outcome)) in expect.iter().enumerate() {
        assert_eq!(
            (rows[i].0.as_str(), rows[i].1.as_str(), rows[i].3.as_str()),
            (*caller, "GetUser", *outcome),
            "{rows:?}"
        );
        assert_eq!(rows[i].2, reg.user_id);
    }
    assert!(rows.iter().any(|r| r.0 == "key:ops-2" && r.3 == "Ok"));
    assert_eq!(
        rows.last().unwrap().0,
        "key:unknown",
        "the old key is refused"
    );
    let all = format!("{rows:?}");
    assert!(
        !all.contains(KEY) && !all.contains("rotated-key"),
        "no key in the audit"
    );
    let denied = app
        .metric("authd_admin_calls_total{method=\"GetUser\",outcome=\"PermissionDenied\"}")
        .await;
    assert!(denied >= 2.0, "{denied}");
}

/// GetUser (by id, by email in any case), the sessions of another user, revocations that every
/// instance sees at once, unknown users and bad input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_act_on_accounts_and_every_instance_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = keyed_app(Mode::Redis, dir.path()).await;
    let b = spawn_sharing(&a, |_| {}).await;
    let (email, reg) = a.register().await;
    let second = a.login(&email, PASSWORD).await.unwrap();
    for app in [&a, &b] {
        assert!(app.served_from_redis(&second.session_token).await);
    }
    let by_email = admin(&a)
        .get_user(with_key(
            KEY,
            pb::GetUserRequest {
                lookup: Some(pb::get_user_request::Lookup::Email(email.to_uppercase())),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(by_email.user_id, reg.user_id);
    assert_eq!(by_email.active_session_count, 2);
    assert!(by_email.last_login_at.is_some());

    // One session, then the rest.
    let second_id = second.session.unwrap().session_id;
    admin(&a)
        .revoke_user_session(with_key(
            KEY,
            pb::RevokeUserSessionRequest {
                user_id: reg.user_id.clone(),
                session_id: second_id.clone(),
            },
        ))
        .await
        .unwrap();
    for app in [&a, &b] {
        assert_code(
            app.validate(&second.session_token).await,
            Code::Unauthenticated,
        );
        app.validate(&reg.session_token).await.unwrap();
    }
    let (_, other) = a.register().await;
    let foreign = admin(&a)
        .revoke_user_session(with_key(
            KEY,
            pb::RevokeUserSessionRequest {
                user_id: other.user_id.clone(),
                session_id: second_id.clone(),
            },
        ))
        .await;
    assert_code(foreign, Code::NotFound);
    let revoked = admin(&a)
        .revoke_user_sessions(with_key(
            KEY,
            pb::RevokeUserSessionsRequest {
                user_id: reg.user_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .revoked_count;
    assert_eq!(revoked, 1);
    for app in [&a, &b] {
        assert_code(
            app.validate(&reg.session_token).await,
            Code::Unauthenticated,
        );
        app.validate(&other.session_token).await.unwrap();
    }

    let unknown = uuid::Uuid::now_v7().to_string();
    assert_code(get_user(&a, KEY, &unknown).await, Code::NotFound);
    let status = assert_code(get_user(&a, KEY, "not-a-uuid").await, Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["user_id"]);
    let status = assert_code(
        admin(&a)
            .get_user(with_key(KEY, pb::GetUserRequest { lookup: None }))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violation_fields(&status), ["lookup"]);
    let status = assert_code(
        admin(&a)
            .disable_user(with_key(
                KEY,
                pb::DisableUserRequest {
                    user_id: reg.user_id.clone(),
                    reason: "x".repeat(501),
                },
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violation_fields(&status), ["reason"]);
    for call in [
        admin(&a)
            .revoke_user_sessions(with_key(
                KEY,
                pb::RevokeUserSessionsRequest {
                    user_id: unknown.clone(),
                },
            ))
            .await
            .map(|_| ()),
        admin(&a)
            .enable_user(with_key(
                KEY,
                pb::EnableUserRequest {
                    user_id: unknown.clone(),
                },
            ))
            .await
            .map(|_| ()),
        admin(&a)
            .disable_user(with_key(
                KEY,
                pb::DisableUserRequest {
                    user_id: unknown.clone(),
                    reason: String::new(),
                },
            ))
            .await
            .map(|_| ()),
    ] {
        assert_code(call, Code::NotFound);
    }
}

/// DisableUser racing 50 logins with the right password, on two instances: whatever each login
/// answered, no session of the user is valid anywhere once DisableUser returned. Then Login
/// tells only a caller with the right password that the account is disabled; EnableUser lets
/// it in again without bringing any session back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_an_account_leaves_no_session_whatever_races_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = keyed_app(Mode::Redis, dir.path()).await;
    let b = spawn_sharing(&a, |s| s.rate_limit.login_per_email = 0).await;
    let (email, reg) = a.register().await;
    let logins = (0..50).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        let email = email.clone();
        async move { app.login(&email, PASSWORD).await }
    });
    let disable = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        admin(&a)
            .disable_user(with_key(
                KEY,
                pb::DisableUserRequest {
                    user_id: reg.user_id.clone(),
                    reason: "compromised".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    };
    let (results, disabled) = tokio::join!(join_all(logins), disable);
    assert!(
        disabled.revoked_count >= 1,
        "the registration's session at least"
    );
    let tokens: Vec<String> = std::iter::once(reg.session_token.clone())
        .chain(
            results
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .map(|r| r.session_token.clone()),
        )
        .collect();
    for result in &results {
        if let Err(status) = result {
            assert!(
                matches!(
                    status.code(),
                    Code::PermissionDenied | Code::Unauthenticated | Code::ResourceExhausted
                ),
                "{status:?}"
            );
        }
    }
    for app in [&a, &b] {
        for token in &tokens {
            assert_code(app.validate(token).await, Code::Unauthenticated);
        }
    }
    let user = get_user(&a, KEY, &reg.user_id).await.unwrap();
    assert!(user.disabled && user.disabled_at.is_some());
    assert_eq!(
        (user.disabled_reason.as_str(), user.active_session_count),
        ("compromised", 0)
    );
    let status = assert_code(a.login(&email, PASSWORD).await, Code::PermissionDenied);
    assert!(status.message().contains("disabled"), "{status:?}");
    let status = assert_code(
        a.login(&email, "a wrong password").await,
        Code::Unauthenticated,
    );
    assert!(!status.message().contains("disabled"), "{status:?}");

    admin(&a)
        .enable_user(with_key(
            KEY,
            pb::EnableUserRequest {
                user_id: reg.user_id.clone(),
            },
        ))
        .await
        .unwrap();
    let fresh = b.login(&email, PASSWORD).await.unwrap();
    a.validate(&fresh.session_token).await.unwrap();
    for token in &tokens {
        assert_code(a.validate(token).await, Code::Unauthenticated);
    }
    assert!(!get_user(&a, KEY, &reg.user_id).await.unwrap().disabled);
}

/// Sessions written straight to the store: `count` of `user_id`, one millisecond apart.
async fn seed_sessions(app: &TestApp, user_id: &str, count: i32) {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(
        app.settings.database.url.expose_secret(),
    )
    .await
    .unwrap();
    sqlx::query(
        "insert into sessions (id, user_id, token_hash, created_at, last_seen_at,
                               absolute_expires_at, authenticated_at)
         select gen_random_uuid(), $1::uuid, sha256(gen_random_uuid()::text::bytea),
                now() - (i || ' milliseconds')::interval, now(), now() + interval '1 day', now()
         from generate_series(1, $2) as i",
    )
    .bind(user_id)
    .bind(count)
    .execute(&mut conn)
    .await
    .unwrap();
}

/// 120 sessions in pages of 50 while more are being created: every one exactly once, newest
/// first; page tokens that were tampered with or belong to another listing are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_page_without_gaps_or_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(Mode::NoRedis);
    let keys = dir.path().join("keys.toml");
    write_keys(&keys, &[("ops", KEY)]);
    settings.admin.api_keys_file = Some(keys);
    settings.session.max_per_user = 1000;
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    seed_sessions(&app, &reg.user_id, 119).await;
    let list = |token: String, size: i32| {
        let mut client = admin(&app);
        let user_id = reg.user_id.clone();
        async move {
            client
                .list_user_sessions(with_key(
                    KEY,
                    pb::ListUserSessionsRequest {
                        user_id,
                        page_size: size,
                        page_token: token,
                    },
                ))
                .await
                .map(|r| r.into_inner())
        }
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(token.clone(), 50).await.unwrap();
        pages += 1;
        seen.extend(page.sessions.iter().map(|s| {
            let at = s.created_at.as_ref().unwrap();
            ((at.seconds, at.nanos), s.session_id.clone())
        }));
        // Sessions created meanwhile are newer than the cursor: they never shift a page.
        seed_sessions(&app, &reg.user_id, 3).await;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 120);
    let mut distinct = seen.iter().map(|s| s.1.clone()).collect::<Vec<_>>();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 120, "no session twice");
    assert!(seen.windows(2).all(|w| w[0].0 >= w[1].0), "newest first");

    let first = list(String::new(), 2).await.unwrap();
    let good = first.next_page_token;
    let mut tampered = good.clone().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for bad in [tampered, "garbage".to_owned()] {
        let status = assert_code(list(bad, 2).await, Code::InvalidArgument);
        assert_eq!(violation_fields(&status), ["page_token"]);
    }
    let (_, other) = app.register().await;
    let foreign = admin(&app)
        .list_user_sessions(with_key(
            KEY,
            pb::ListUserSessionsRequest {
                user_id: other.user_id,
                page_size: 2,
                page_token: good,
            },
        ))
        .await;
    assert_eq!(
        violation_fields(&assert_code(foreign, Code::InvalidArgument)),
        ["page_token"]
    );
    let status = assert_code(list(String::new(), 101).await, Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["page_size"]);
}

/// Client TLS towards an app whose server certificate is signed by `ca`, with an optional
/// client certificate.
fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    tls
}

async fn tls_channel(
    app: &TestApp,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    let addr = app.addr;
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// Mutual TLS: a client certificate whose SAN is listed is admitted; another SAN is
/// PERMISSION_DENIED even with a valid certificate; without a certificate the bearer key still
/// admits; the other services take TLS without a client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_admitted_by_their_san() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    write_keys(&keys, &[("ops", KEY)]);
    let mut settings = test_settings(Mode::NoRedis);
    settings.grpc.tls.cert_file = Some(certs.server_cert.clone());
    settings.grpc.tls.key_file = Some(certs.server_key.clone());
    settings.grpc.tls.client_ca_file = Some(certs.ca_file.clone());
    settings.admin.allowed_clients = format!(
        "spiffe://example.org/ns/ops/sa/admin, {}",
        Certs::CLIENT_URI
    );
    settings.admin.api_keys_file = Some(keys);
    let app = spawn_with_hooks(
        settings,
        Hooks {
            client_tls: Some(client_tls(&certs.ca_file, None)),
            ..Hooks::default()
        },
    )
    .await;
    let (_, reg) = app.register().await;
    let get = |channel: Channel, key: Option<&'static str>| {
        let user_id = reg.user_id.clone();
        async move {
            let message = pb::GetUserRequest {
                lookup: Some(pb::get_user_request::Lookup::UserId(user_id)),
            };
            let request = match key {
                Some(key) => with_key(key, message),
                None => Request::new(message),
            };
            AdminServiceClient::new(channel).get_user(request).await
        }
    };
    let allowed = tls_channel(
        &app,
        client_tls(
            &certs.ca_file,
            Some((&certs.client_cert, &certs.client_key)),
        ),
    )
    .await
    .unwrap();
    get(allowed, None).await.unwrap();
    let (cert, key) = certs.client(
        &["intruder.example.org"],
        &["spiffe://example.org/ns/x/sa/y"],
    );
    let other = tls_channel(&app, client_tls(&certs.ca_file, Some((&cert, &key))))
        .await
        .unwrap();
    assert_code(get(other.clone(), None).await, Code::PermissionDenied);
    // A certificate signed by another CA does not get through the handshake at all.
    let (cert, key) = certs.other_client(&[Certs::CLIENT_DNS], &[Certs::CLIENT_URI]);
    let forged = tls_channel(&app, client_tls(&certs.ca_file, Some((&cert, &key)))).await;
    let forged_call = match forged {
        Ok(channel) => get(channel, None).await.map(|_| ()),
        Err(error) => Err(tonic::Status::unavailable(error.to_string())),
    };
    assert!(
        forged_call.is_err(),
        "a certificate of another CA is refused"
    );
    // No certificate: the key admits; nothing at all is UNAUTHENTICATED.
    get(app.channel.clone(), Some(KEY)).await.unwrap();
    assert_code(get(app.channel.clone(), None).await, Code::Unauthenticated);
    // The rest of the API over TLS, without a client certificate.
    app.validate(&reg.session_token).await.unwrap();

    let rows = audit(&app).await;
    let callers: Vec<(&str, &str)> = rows.iter().map(|r| (r.0.as_str(), r.3.as_str())).collect();
    assert!(
        callers.contains(&(&format!("uri:{}", Certs::CLIENT_URI), "Ok")),
        "{callers:?}"
    );
    assert!(
        callers
            .iter()
            .any(|(c, o)| (c.starts_with("uri:") || c.starts_with("dns:"))
                && *o == "PermissionDenied"),
        "{callers:?}"
    );
    assert!(callers.contains(&("key:ops", "Ok")), "{callers:?}");
    assert!(
        callers.contains(&("anonymous", "Unauthenticated")),
        "{callers:?}"
    );
}

/// cert-manager rotates the files: new connections get the new certificate without a restart,
/// and a connection opened before keeps working. Health is served in plain text on
/// HEALTH__ADDR for probes, and `authd healthcheck` speaks TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_a_restart_and_probes_have_a_plaintext_port() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&certs.server_cert, &cert).unwrap();
    std::fs::copy(&certs.server_key, &key).unwrap();
    let health_port = crate::redis_server::free_port();
    let mut settings = test_settings(Mode::NoRedis);
    settings.grpc.tls.cert_file = Some(cert.clone());
    settings.grpc.tls.key_file = Some(key.clone());
    settings.grpc.tls.reload_interval = Duration::from_millis(100);
    settings.health.addr = Some(([127, 0, 0, 1], health_port).into());
    let app = spawn_with_hooks(
        settings,
        Hooks {
            client_tls: Some(client_tls(&certs.ca_file, None)),
            ..Hooks::default()
        },
    )
    .await;
    let (_, reg) = app.register().await;
    let bin = env!("CARGO_BIN_EXE_authd");
    let healthcheck = |args: &[&str]| {
        Command::new(bin)
            .env_clear()
            .arg("healthcheck")
            .args(args)
            .output()
            .unwrap()
    };
    let addr = app.addr.to_string();
    let ca = certs.ca_file.to_str().unwrap();
    let ok = healthcheck(&[
        "--addr",
        &addr,
        "--ca-file",
        ca,
        "--server-name",
        "localhost",
    ]);
    assert!(ok.status.success(), "{ok:?}");
    let plain = healthcheck(&["--addr", &addr]);
    assert!(!plain.status.success(), "plain text to the TLS port fails");
    let probe = healthcheck(&["--addr", &format!("127.0.0.1:{health_port}")]);
    assert!(probe.status.success(), "{probe:?}");
    let probe_channel = Channel::from_shared(format!("http://127.0.0.1:{health_port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(probe_channel);
    let serving = health
        .check(HealthCheckRequest {
            service: "authd.v1.AuthService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status(), ServingStatus::Serving);

    // Rotate to a certificate of another CA (as a CA rotation would).
    let (new_cert, new_key) = certs.other_server();
    std::fs::copy(&new_key, dir.path().join("tls.key.new")).unwrap();
    std::fs::copy(&new_cert, dir.path().join("tls.crt.new")).unwrap();
    std::fs::rename(dir.path().join("tls.key.new"), &key).unwrap();
    std::fs::rename(dir.path().join("tls.crt.new"), &cert).unwrap();
    eventually(
        Duration::from_secs(5),
        "new connections get the new certificate",
        || async {
            tls_channel(&app, client_tls(&certs.other_ca_file, None))
                .await
                .is_ok()
        },
    )
    .await;
    assert!(
        tls_channel(&app, client_tls(&certs.ca_file, None))
            .await
            .is_err()
    );
    // The connection opened before the rotation still works.
    app.validate(&reg.session_token).await.unwrap();
}

/// (caller, method, outcome, count) of every audit row, oldest first.
async fn audit_counts(url: &str) -> Vec<(String, String, String, i32)> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url)
        .await
        .unwrap();
    sqlx::query_as("select caller, method, outcome, count from admin_audit order by id")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

/// Before: every refused call wrote a row, so anyone who reaches the port could make the
/// instance write to PostgreSQL as fast as it could send. Now refused calls get a row each only
/// within a budget (`REFUSED_ROWS_PER_SECOND`, a burst of twice that); the rest are summed up,
/// per method and outcome, into rows with their count — written every few seconds and when the
/// server stops — so the audit still accounts for every call. Admitted calls always get a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_calls_is_audited_in_bounded_rows() {
    const FLOOD: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let mut app = keyed_app(Mode::NoRedis, dir.path()).await;
    let (_, reg) = app.register().await;
    let started = std::time::Instant::now();
    for chunk in 0..FLOOD / 50 {
        join_all((0..50).map(|i| {
            let key = if (chunk + i) % 2 == 0 {
                "not-the-key"
            } else {
                "another-bad-key"
            };
            get_user(&app, key, &reg.user_id)
        }))
        .await
        .into_iter()
        .for_each(|r| {
            assert_code(r, Code::PermissionDenied);
        });
    }
    let elapsed = started.elapsed().as_secs_f64();
    get_user(&app, KEY, &reg.user_id).await.unwrap();
    let url = app.settings.database.url.expose_secret().to_owned();
    let single = audit_counts(&url)
        .await
        .iter()
        .filter(|r| r.0 == "key:unknown")
        .count();
    let budget = authd::admin::REFUSED_ROWS_PER_SECOND;
    assert!(
        (single as f64) <= budget * 2.0 + budget * elapsed + 1.0,
        "{single} rows for {FLOOD} refusals in {elapsed:.2} s"
    );
    assert!(single < FLOOD, "{single} rows");
    app.stop().await.unwrap();
    let rows = audit_counts(&url).await;
    let refused: i32 = rows
        .iter()
        .filter(|r| r.1 == "GetUser" && r.2 == "PermissionDenied")
        .map(|r| r.3)
        .sum();
    assert_eq!(
        refused, FLOOD as i32,
        "every refusal is accounted for: {rows:?}"
    );
    assert!(
        rows.iter().any(|r| r.0 == "key:unknown" && r.3 > 1),
        "summed-up rows keep their caller: {rows:?}"
    );
    assert!(rows.contains(&("key:ops".into(), "GetUser".into(), "Ok".into(), 1)));
}

/// Before: the audit row was written after the action, in the call's own future: a caller that
/// hung up (or whose deadline passed) while the action ran dropped it, and an action could take
/// effect with no audit row; and a shutdown right after closed the pool under a call still
/// running. Now action and audit run on their own task, which shutdown waits for: with
/// PostgreSQL hung, a DisableUser whose caller gave up, followed at once by a SIGTERM, is
/// audited once PostgreSQL answers again, before the process exits. PostgreSQL stays away
/// past the pool's acquire timeout twice over, so the action fails and so does the audit
/// row's first write (which once lost the row: CI saw it when load stretched the timings):
/// the row is written again until PostgreSQL takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_call_whose_caller_gave_up_is_still_audited() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    write_keys(&keys, &[("ops", KEY)]);
    let postgres = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut settings = test_settings(Mode::NoRedis);
    let url = settings.database.url.expose_secret().to_owned();
    settings.database.url = url
        .replace("127.0.0.1:5432", &postgres.addr.to_string())
        .into();
    settings.admin.api_keys_file = Some(keys);
    let mut app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    postgres.set(Link::Blackhole);
    let mut request = with_key(
        KEY,
        pb::DisableUserRequest {
            user_id: reg.user_id.clone(),
            reason: "lost laptop".into(),
        },
    );
    request.set_timeout(Duration::from_millis(500));
    let status = admin(&app).disable_user(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // SIGTERM now; PostgreSQL answers again 2.5 s later (the action's acquire timed out at
    // 1 s, the audit row's first write at 2 s).
    let (stopped, ()) = tokio::join!(app.stop(), async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        postgres.set(Link::Up);
    });
    stopped.unwrap();
    let rows = audit_counts(&url).await;
    assert!(
        rows.iter()
            .any(|r| r.0 == "key:ops" && r.1 == "DisableUser"),
        "{rows:?}"
    );
}

/// Review found: PostgreSQL text cannot hold a NUL byte, so a target with one made the audit
/// insert fail — no row, for refused and admitted callers alike (200 wrong-key guesses left 0
/// rows) — and newlines and ANSI escapes were stored raw, to drive the terminal of an operator
/// reading the table. Now control characters are written `\u{XX}` (and a backslash `\\`): each
/// such call, refused or admitted, leaves one row naming what it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_bytes_in_a_target_leave_one_readable_audit_row() {
    let dir = tempfile::tempdir().unwrap();
    let app = keyed_app(Mode::NoRedis, dir.path()).await;
    let targets = [
        "a\0b",
        "line\nforged row",
        "\x1b[2J\x1b[31mred",
        "back\\slash",
    ];
    for target in targets {
        let refused = get_user(&app, "not-the-key", target).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        let admitted = get_user(&app, KEY, target).await.unwrap_err();
        assert_eq!(admitted.code(), Code::InvalidArgument, "{admitted:?}");
    }
    let url = app.settings.database.url.expose_secret().to_owned();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "select caller, target from admin_audit where method = 'GetUser' order by id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let expected = [
        "a\\u{0}b",
        "line\\u{a}forged row",
        "\\u{1b}[2J\\u{1b}[31mred",
        "back\\\\slash",
    ];
    let mut want = Vec::new();
    for target in expected {
        want.push(("key:unknown".to_owned(), target.to_owned()));
        want.push(("key:ops".to_owned(), target.to_owned()));
    }
    assert_eq!(rows, want);
    assert!(
        rows.iter().all(|(_, t)| !t.chars().any(char::is_control)),
        "{rows:?}"
    );
}

/// An instance paused (a GC-like stall, SIGSTOP) in the middle of a transaction that holds a
/// user's row: the other instances' calls on that user, whose statements were already waiting
/// for the row when the paused transaction ran its last statement, must be delayed by it, not
/// failed — PostgreSQL ends the idle transaction before their own statement timeout ends them.
/// The paused instance, resuming, finds its transaction ended: UNAVAILABLE (nothing of it was
/// committed), never INTERNAL. (The fault run's Sentinel seed 1795755029 met both: DisableUser
/// and RevokeUserSessions UNAVAILABLE on another instance, INTERNAL on the resumed one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_paused_under_a_row_lock_delays_the_others_calls_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = keyed_settings(Mode::Redis, dir.path());
    // A connection each for the two admin calls: what is shown is the row's wait, not the
    // share's queue.
    settings.database.shares.admin = 20;
    let app = spawn_with(settings).await;
    let (_, victim) = app.register().await;
    // The paused instance's connection: made as authd makes its own.
    let options = authd::store::session_options(&app.settings.database).unwrap();
    let mut paused = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
        .await
        .unwrap();
    let mut tx = sqlx::Connection::begin(&mut paused).await.unwrap();
    sqlx::query("select 1 from users where id = $1::uuid for update")
        .bind(&victim.user_id)
        .execute(&mut *tx)
        .await
        .unwrap();
    let disable = {
        let (mut admin, user_id) = (admin(&app), victim.user_id.clone());
        tokio::spawn(async move {
            let request = pb::DisableUserRequest {
                user_id,
                reason: "paused holder".into(),
            };
            admin.disable_user(with_key(KEY, request)).await
        })
    };
    let revoke = {
        let (mut admin, user_id) = (admin(&app), victim.user_id.clone());
        tokio::spawn(async move {
            let request = pb::RevokeUserSessionsRequest { user_id };
            admin.revoke_user_sessions(with_key(KEY, request)).await
        })
    };
    // Both wait for the row; the paused transaction runs its last statement, then stands idle.
    tokio::time::sleep(app.settings.database.query_timeout / 4).await;
    sqlx::query("select 1").execute(&mut *tx).await.unwrap();
    disable
        .await
        .unwrap()
        .expect("DisableUser, delayed by the paused transaction");
    revoke
        .await
        .unwrap()
        .expect("RevokeUserSessions, delayed by the paused transaction");
    assert_code(
        app.validate(&victim.session_token).await,
        Code::Unauthenticated,
    );
    // The paused instance resumes.
    let resumed = sqlx::query("select 1").execute(&mut *tx).await.unwrap_err();
    let error = authd::store::StoreError::from(resumed);
    assert!(
        matches!(error, authd::store::StoreError::Unavailable(_)),
        "a transaction PostgreSQL ended is a passing condition: {error:?}"
    );
}
