//! What operators see: metrics, request ids, health that follows PostgreSQL, secret-free logs,
//! the deployment files.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use authd::proto::authd::v1 as pb;
use futures::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    both_modes,
    helpers::{
        Mode, PASSWORD, TestApp, assert_code, eventually, register_request, spawn_app, spawn_with,
        test_settings, unique_email,
    },
    proxy::{Link, Proxy},
    redis_server::RedisServer,
};

mod envoy;
mod manifests;
mod metrics_port;

both_modes!(metrics_count_rpcs_caches_sessions_and_failures);

async fn metrics_count_rpcs_caches_sessions_and_failures(mode: Mode) {
    let mut settings = test_settings(mode);
    // At most 4 guesses per window: 2 at once.
    settings.rate_limit.login_per_email = 4;
    let app = spawn_with(settings).await;
    let (email, reg) = app.register().await;
    for _ in 0..3 {
        app.validate(&reg.session_token).await.unwrap();
    }
    for _ in 0..2 {
        assert_code(
            app.login(&email, "wrong guess").await,
            Code::Unauthenticated,
        );
    }
    assert_code(
        app.login(&email, "wrong guess").await,
        Code::ResourceExhausted,
    );
    app.get_profile(&reg.user_id).await.unwrap();
    app.logout(&reg.session_token).await.unwrap();

    let rpc = |method: &str, code: &str| {
        format!(
            "authd_rpc_requests_total{{code=\"{code}\",method=\"{method}\",service=\"authd.v1.AuthService\"}}"
        )
    };
    assert_eq!(app.metric(&rpc("ValidateSession", "Ok")).await, 3.0);
    assert_eq!(app.metric(&rpc("Login", "Unauthenticated")).await, 2.0);
    assert_eq!(app.metric(&rpc("Login", "ResourceExhausted")).await, 1.0);
    assert_eq!(
        app.metric("authd_rpc_duration_seconds_count{method=\"ValidateSession\",service=\"authd.v1.AuthService\"}").await,
        3.0
    );
    assert_eq!(app.metric("authd_sessions_created_total").await, 1.0);
    assert_eq!(
        app.metric("authd_sessions_revoked_total{reason=\"logout\"}")
            .await,
        1.0
    );
    assert_eq!(app.metric("authd_failed_logins_total").await, 2.0);
    assert_eq!(
        app.metric("authd_rate_limited_total{operation=\"login\"}")
            .await,
        1.0
    );
    assert_eq!(app.metric("authd_password_hash_queue_depth").await, 0.0);
    assert!(
        app.metric("authd_db_queries_total{origin=\"request\"}")
            .await
            >= 3.0
    );
    let text = app.metrics().await;
    assert!(
        text.contains("authd_db_connections{share=\"lookups\",state=\"idle\"}"),
        "{text}"
    );
    assert!(text.contains("authd_db_connections_waiting"), "{text}");
    assert!(
        text.contains("authd_password_hash_rejections_total"),
        "{text}"
    );
    assert_eq!(app.metric("authd_db_up").await, 1.0);
    // Which build answers, and what the process holds (the test process' own figures).
    let build = format!(
        "authd_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(app.metric(&build).await, 1.0);
    assert!(app.metric("process_resident_memory_bytes").await > 1e6);
    assert!(app.metric("process_open_fds").await >= 3.0);
    // Counted in whole seconds by the collector: present, maybe 0 this early.
    assert!(
        app.metrics().await.contains("\nprocess_cpu_seconds_total "),
        "no process_cpu_seconds_total"
    );
    match mode {
        Mode::Redis | Mode::Cluster => {
            assert_eq!(app.metric("authd_redis_up").await, 1.0);
            assert_eq!(app.metric("authd_redis_enabled").await, 1.0);
            let hits = "authd_cache_lookups_total{cache=\"sessions\",result=\"hit\"}";
            assert_eq!(app.metric(hits).await, 3.0);
        }
        Mode::NoRedis => {
            // Off on purpose: not degraded (the alert joins on this).
            assert_eq!(app.metric("authd_redis_up").await, 0.0);
            assert_eq!(app.metric("authd_redis_enabled").await, 0.0);
        }
    }
}

#[tokio::test]
async fn a_request_id_is_taken_from_the_caller_or_made_and_always_returned() {
    let app = spawn_app(Mode::NoRedis).await;
    let mut request = Request::new(register_request(&unique_email()));
    request
        .metadata_mut()
        .insert("x-request-id", "req-4711".parse().unwrap());
    let response = app.auth.clone().register(request).await.unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap(), "req-4711");

    // Also on errors, and generated when the caller sends none.
    let status = app.validate("bad token").await.unwrap_err();
    let generated = status
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(uuid::Uuid::parse_str(generated).is_ok(), "{generated}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_degraded_not_unhealthy() {
    let mut redis = RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(redis.url());
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    redis.kill();
    app.validate(&reg.session_token).await.unwrap();
    assert_eq!(app.metric("authd_redis_up").await, 0.0);
    let mut errors = 0.0;
    for kind in ["timeout", "disconnected", "error"] {
        errors += app
            .metric(&format!("authd_redis_errors_total{{kind=\"{kind}\"}}"))
            .await;
    }
    assert!(errors >= 1.0, "Redis failures are counted");
    assert_eq!(health(&app, "").await, ServingStatus::Serving);
    redis.restart().await;
    eventually(
        Duration::from_secs(10),
        "the gauge says Redis is back",
        || async {
            let _ = app.validate(&reg.session_token).await;
            app.metric("authd_redis_up").await == 1.0
        },
    )
    .await;
}

async fn health(app: &TestApp, service: &str) -> ServingStatus {
    app.health_of(service).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_postgres_after_the_grace_period() {
    let postgres = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut settings = test_settings(Mode::NoRedis);
    let url = settings.database.url.expose_secret().to_owned();
    settings.database.url =
        SecretString::from(url.replace("127.0.0.1:5432", &postgres.addr.to_string()));
    settings.health.db_grace = Duration::from_secs(1);
    settings.health.db_check_interval = Duration::from_millis(200);
    let app = spawn_with(settings).await;
    let mut watch = app.watch_serving("authd.v1.ProfileService").await;

    postgres.set(Link::Refused);
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    for service in ["", "authd.v1.AuthService", "authd.v1.ProfileService"] {
        assert_eq!(
            health(&app, service).await,
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    assert_eq!(health(&app, "liveness").await, ServingStatus::Serving);
    assert_eq!(app.metric("authd_db_up").await, 0.0);

    postgres.set(Link::Up);
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    assert_eq!(health(&app, "").await, ServingStatus::Serving);
}

/// Runs a whole session lifecycle against the binary logging everything (trace, JSON), then
/// searches every line for tokens, passwords and password hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_at_any_level() {
    let settings = test_settings(Mode::Redis);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    // A file, not a pipe: at trace level the logs would fill a pipe nobody reads yet and block
    // the server.
    let log_path = std::env::temp_dir().join(format!("authd-logs-{port}.txt"));
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_authd"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GRPC__ADDR", &addr)
        .env("METRICS__ADDR", "127.0.0.1:0")
        .env("DATABASE__URL", settings.database.url.expose_secret())
        .env("REDIS__URL", crate::helpers::redis_url())
        .env("REDIS__KEY_PREFIX", &settings.redis.key_prefix)
        .env("LOG__LEVEL", "trace")
        .env("LOG__FORMAT", "json")
        .stdout(Stdio::from(log_file.try_clone().unwrap()))
        .stderr(Stdio::from(log_file))
        .spawn()
        .unwrap();
    let channel = {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let mut tries = 0;
        loop {
            match endpoint.connect().await {
                Ok(c) => break c,
                Err(_) if tries < 300 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    let mut auth = pb::auth_service_client::AuthServiceClient::new(channel.clone());
    let mut profiles = pb::profile_service_client::ProfileServiceClient::new(channel);
    let email = unique_email();
    let reg = auth
        .register(register_request(&email))
        .await
        .unwrap()
        .into_inner();
    let new_password = "a different secret phrase";
    let login = auth
        .login(pb::LoginRequest {
            email: email.clone(),
            password: PASSWORD.into(),
            client: None,
        })
        .await
        .unwrap()
        .into_inner();
    let _ = auth
        .login(pb::LoginRequest {
            email: email.clone(),
            password: "wrong secret guess".into(),
            client: None,
        })
        .await;
    let token = |t: &str| pb::ValidateSessionRequest {
        session_token: t.into(),
        ..Default::default()
    };
    auth.validate_session(token(&login.session_token))
        .await
        .unwrap();
    auth.list_sessions(pb::ListSessionsRequest {
        session_token: login.session_token.clone(),
    })
    .await
    .unwrap();
    profiles
        .update_profile(pb::UpdateProfileRequest {
            session_token: login.session_token.clone(),
            profile: Some(pb::Profile {
                bio: "hello".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["bio".into()],
            }),
            expected_version: 0,
        })
        .await
        .unwrap();
    auth.change_password(pb::ChangePasswordRequest {
        session_token: login.session_token.clone(),
        current_password: PASSWORD.into(),
        new_password: new_password.into(),
    })
    .await
    .unwrap();
    auth.logout(pb::LogoutRequest {
        session_token: login.session_token.clone(),
    })
    .await
    .unwrap();
    let _ = auth.validate_session(token(&reg.session_token)).await;

    let mut conn =
        <sqlx::PgConnection as sqlx::Connection>::connect(settings.database.url.expose_secret())
            .await
            .unwrap();
    let phc: String =
        sqlx::query_scalar("select password_hash from users where email_normalized = $1")
            .bind(&email)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    drop(conn);

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(logs.lines().count() > 50, "trace logging was on");
    assert!(
        logs.contains("\"request_id\""),
        "per-RPC lines carry a request id"
    );
    for secret in [
        reg.session_token.as_str(),
        &reg.session_token["authd_".len()..],
        login.session_token.as_str(),
        PASSWORD,
        new_password,
        "wrong secret guess",
        phc.as_str(),
        &phc[phc.rfind('$').unwrap() + 1..],
    ] {
        assert!(
            !logs.contains(secret),
            "a secret reached the logs: {secret}"
        );
    }
    crate::helpers::drop_database(settings.database.url.expose_secret()).await;
}
