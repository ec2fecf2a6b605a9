//! The server as operators and tools see it: health, reflection, shutdown, the binary.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use futures::{StreamExt, future::join_all};
use secrecy::ExposeSecret;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::helpers::{Mode, PASSWORD, eventually, spawn_app, spawn_with, test_settings};

const BIN: &str = env!("CARGO_BIN_EXE_authd");

#[tokio::test]
async fn health_reports_serving_for_the_server_and_auth_service() {
    let app = spawn_app(Mode::Redis).await;
    for service in ["", "authd.v1.AuthService"] {
        let response = app
            .health
            .clone()
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
}

#[tokio::test]
async fn reflection_lists_every_service() {
    let app = spawn_app(Mode::NoRedis).await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(app.channel.clone())
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "authd.v1.AuthService",
        "authd.v1.ProfileService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_goes_not_serving_lets_calls_finish_and_stops_despite_watchers() {
    let mut settings = test_settings(Mode::Redis);
    settings.grpc.shutdown_grace = Duration::from_secs(2);
    settings.auth.hash_concurrency = 1;
    let mut app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let mut health = app.health.clone();
    let mut watch = app.watch_serving("").await;

    // Logins queue behind one hashing slot, so several are in flight when the stop comes.
    let logins = tokio::spawn({
        let client = app.auth.clone();
        let email = email.clone();
        async move {
            join_all((0..4).map(|_| {
                let mut client = client.clone();
                let request = authd::proto::authd::v1::LoginRequest {
                    email: email.clone(),
                    password: PASSWORD.into(),
                    client: None,
                };
                async move { client.login(request).await }
            }))
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let stopped = tokio::spawn(async move { app.stop().await });

    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    for login in logins.await.unwrap() {
        login.expect("in-flight calls complete");
    }
    // The open Watch stream does not hold the process beyond the grace period.
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("stopped within the grace period")
        .unwrap()
        .expect("clean stop");
    // After the drain, new calls are refused: the old connection is closed (the first call on
    // it may see that as CANCELLED) and no new one is accepted.
    for _ in 0..2 {
        let refused = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                refused.code(),
                tonic::Code::Unavailable | tonic::Code::Cancelled
            ),
            "{refused:?}"
        );
    }
    let last = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(last.code(), tonic::Code::Unavailable, "{last:?}");
}

fn binary_env(cmd: &mut Command, settings: &authd::config::Settings) {
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE__URL", settings.database.url.expose_secret())
        .env("REDIS__KEY_PREFIX", &settings.redis.key_prefix)
        .env("REDIS__URL", crate::helpers::redis_url())
        .env("LOG__LEVEL", "warn")
        .env("METRICS__ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_reports_health_and_exits_zero_on_sigterm() {
    let settings = test_settings(Mode::Redis);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut server = Command::new(BIN);
    binary_env(&mut server, &settings);
    let mut child = server.env("GRPC__ADDR", &addr).spawn().unwrap();

    let healthcheck = |service: &str| {
        Command::new(BIN)
            .args(["healthcheck", "--addr", &addr, "--service", service])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    eventually(
        Duration::from_secs(30),
        "the binary reports SERVING",
        || {
            let ok = healthcheck("authd.v1.AuthService");
            async move { ok }
        },
    )
    .await;
    assert!(!healthcheck("no.such.Service"));

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!healthcheck(""), "nothing answers after exit");
    crate::helpers::drop_database(settings.database.url.expose_secret()).await;
}

#[tokio::test]
async fn an_invalid_setting_stops_startup_naming_it() {
    let settings = test_settings(Mode::Redis);
    for (key, value) in [
        ("REDIS__ENABLED", "maybe"),
        ("SESSION__IDLE_TIMEOUT", "soon"),
        ("SESSION__TOUCH_INTERVAL", "30d"),
        ("GRPC__ADDR", "nowhere"),
        ("DATABASE__URL", "mysql://x"),
    ] {
        let mut cmd = Command::new(BIN);
        binary_env(&mut cmd, &settings);
        let output = cmd.env(key, value).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{key}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(key), "{key}={value}: {stderr}");
    }
}

#[tokio::test]
async fn migrate_creates_the_database_and_applies_migrations() {
    let settings = test_settings(Mode::NoRedis);
    let mut cmd = Command::new(BIN);
    binary_env(&mut cmd, &settings);
    let output = cmd.arg("migrate").output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let mut conn =
        <sqlx::PgConnection as sqlx::Connection>::connect(settings.database.url.expose_secret())
            .await
            .unwrap();
    let applied: i64 = sqlx::query_scalar("select count(*) from _sqlx_migrations where success")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(applied >= 1);
    drop(conn);
    crate::helpers::drop_database(settings.database.url.expose_secret()).await;
}
