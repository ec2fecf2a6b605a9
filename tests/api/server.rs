//! The server as operators and tools see it: health, reflection, shutdown, the binary.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use futures::{StreamExt, future::join_all};
use secrecy::{ExposeSecret, SecretString};
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

/// The services reflection lists (what `grpcurl … list` shows).
async fn listed(app: &crate::helpers::TestApp) -> Vec<String> {
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
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

/// Reflection lists what this instance serves, and nothing it does not: AdminService,
/// EventService and Envoy's Authorization appear only when turned on; called while off, they
/// answer UNIMPLEMENTED naming the settings that turn them on.
#[tokio::test]
async fn reflection_lists_the_services_served_and_only_those() {
    let app = spawn_app(Mode::NoRedis).await;
    assert_eq!(
        listed(&app).await,
        [
            "authd.v1.AuthService",
            "authd.v1.ProfileService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
    );
    let mut check = tonic::client::Grpc::new(app.channel.clone());
    check.ready().await.unwrap();
    let refused = check
        .unary::<_, (), _>(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static("/envoy.service.auth.v3.Authorization/Check"),
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
    assert!(
        refused.message().contains("EXT_AUTHZ__ENABLED"),
        "{refused:?}"
    );

    let mut settings = test_settings(Mode::NoRedis);
    settings.ext_authz.enabled = true;
    let app = spawn_with(settings).await;
    assert!(
        listed(&app)
            .await
            .contains(&"envoy.service.auth.v3.Authorization".to_owned())
    );
}

/// `GRPC__REFLECTION=false`: the API is not published (grpcurl needs the protos), the rest works.
#[tokio::test]
async fn reflection_can_be_turned_off() {
    let mut settings = test_settings(Mode::NoRedis);
    settings.grpc.reflection = false;
    let app = spawn_with(settings).await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let refused = ServerReflectionClient::new(app.channel.clone())
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
    app.register().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_goes_not_serving_lets_calls_finish_and_stops_despite_watchers() {
    let mut settings = test_settings(Mode::Redis);
    // A grace no test waits out: a stop that ends at all ended because the calls were done.
    settings.grpc.shutdown_grace = Duration::from_secs(3600);
    settings.auth.hash_concurrency = 1;
    let mut app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let mut health = app.health.clone();
    let mut watch = app.watch_serving("").await;
    let mut liveness = app.watch_serving("liveness").await;

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
    // Then the Watch streams end (with OK): readiness after NOT_SERVING, liveness (still
    // SERVING, which its watcher knows) at once.
    assert!(watch.next().await.is_none(), "the readiness Watch ends");
    assert!(liveness.next().await.is_none(), "the liveness Watch ends");
    for login in logins.await.unwrap() {
        login.expect("in-flight calls complete");
    }
    // Open Watch streams do not hold the process up: it stops as soon as the calls are done,
    // not when the (hour-long) grace runs out. (The timeout only keeps a failure from hanging.)
    tokio::time::timeout(Duration::from_secs(60), stopped)
        .await
        .expect("stopped once the calls were done, not after the grace")
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

use crate::redis_server::free_port;

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
    // The settings reference quotes the first one word for word.
    let reference =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/settings.md")).unwrap();
    let quoted = reference
        .lines()
        .find_map(|l| l.strip_prefix("`authd: invalid setting REDIS__ENABLED"))
        .and_then(|rest| rest.split('`').next())
        .map(|rest| format!("authd: invalid setting REDIS__ENABLED{rest}"))
        .expect("docs/settings.md quotes the message");
    let mut cmd = Command::new(BIN);
    binary_env(&mut cmd, &settings);
    let output = cmd.env("REDIS__ENABLED", "maybe").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end(), quoted);

    // A configuration file that is not there is named, on one line.
    let mut cmd = Command::new(BIN);
    binary_env(&mut cmd, &settings);
    let output = cmd.args(["--config", "missing.toml"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("authd: invalid setting --config: cannot read missing.toml: ")
            && stderr.trim_end().lines().count() == 1,
        "{stderr:?}"
    );
    // So is a syntax error in one.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("authd.toml");
    std::fs::write(&broken, "[redis]\nenabled = = true\n").unwrap();
    let mut cmd = Command::new(BIN);
    binary_env(&mut cmd, &settings);
    let output = cmd.arg("--config").arg(&broken).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("authd.toml") && stderr.trim_end().lines().count() == 1,
        "{stderr:?}"
    );
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

/// The shipped roles (deploy/postgres/roles.sql): the owner migrates with `authd migrate`, the
/// service runs as the app role — every RPC and background job works, and the app role can
/// change no schema.
/// A database made by deploy/postgres/roles.sql (owner and app role of their own), migrated by
/// `authd migrate` as the owner; dropped with its roles by [`Roles::drop_all`].
struct Roles {
    base: String,
    database: String,
    owner: String,
    app: String,
}

impl Roles {
    fn create() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let roles = Roles {
            base: crate::helpers::postgres_base_url(),
            database: format!("authd_roles_{id}"),
            owner: format!("authd_owner_{id}"),
            app: format!("authd_app_{id}"),
        };
        let psql = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-v", &format!("database={}", roles.database)])
            .args(["-v", &format!("owner={}", roles.owner)])
            .args(["-v", "owner_password=owner-pw"])
            .args(["-v", &format!("app={}", roles.app)])
            .args(["-v", "app_password=app-pw"])
            .args([
                "-f",
                concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/postgres/roles.sql"),
            ])
            .arg(format!("{}/postgres", roles.base))
            .output()
            .expect("psql is installed");
        assert!(psql.status.success(), "{psql:?}");
        let mut settings = test_settings(Mode::Redis);
        settings.database.url = SecretString::from(roles.url(&roles.owner));
        let mut migrate = Command::new(BIN);
        binary_env(&mut migrate, &settings);
        let output = migrate.arg("migrate").output().unwrap();
        assert!(output.status.success(), "{output:?}");
        roles
    }

    fn url(&self, role: &str) -> String {
        let (scheme, rest) = self.base.split_once("://").unwrap();
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{role}@{host}/{}", self.database)
    }

    /// Settings of a service that runs as the app role and migrates nothing.
    fn app_settings(&self) -> authd::config::Settings {
        let mut settings = test_settings(Mode::Redis);
        settings.database.url = SecretString::from(self.url(&self.app));
        settings.database.migrate = false;
        settings.database.create_if_missing = false;
        settings
    }

    async fn as_owner(&self, sql: &str) {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&self.url(&self.owner))
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await
            .unwrap();
    }

    async fn drop_all(self) {
        crate::helpers::drop_database(&format!("{}/{}", self.base, self.database)).await;
        let mut admin =
            <sqlx::PgConnection as sqlx::Connection>::connect(&format!("{}/postgres", self.base))
                .await
                .unwrap();
        for role in [&self.app, &self.owner] {
            let sql = format!("drop role if exists \"{role}\"");
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_runs_as_a_role_that_cannot_change_the_schema() {
    let roles = Roles::create();
    let app_role = roles.app.clone();
    let as_role = |role: &str| roles.url(role);
    let settings = roles.app_settings();
    let app = crate::helpers::spawn_with(settings).await;
    let (email, registered) = app.register().await;
    let token = app.login(&email, PASSWORD).await.unwrap().session_token;
    app.validate(&token).await.unwrap();
    assert!(
        app.served_from_redis(&token).await,
        "a generation was drawn"
    );
    app.logout(&token).await.unwrap();
    app.get_profile(&registered.user_id).await.unwrap();
    assert_eq!(
        app.change_password(
            &registered.session_token,
            PASSWORD,
            "another fine passphrase"
        )
        .await
        .unwrap(),
        0
    );

    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&as_role(&app_role))
        .await
        .unwrap();
    for ddl in [
        "create table intruder (id int)",
        "drop table users",
        "alter table sessions add column note text",
        "create index on users (created_at)",
        "truncate sessions",
    ] {
        let error = sqlx::query(ddl).execute(&mut conn).await.unwrap_err();
        let code = error.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("42501"), "{ddl}: {error}");
    }
    // Review found: the app role could rewrite or delete the audit, and replace the page-token
    // signing key. Now the audit is append-only for it, and secrets are added, never replaced.
    sqlx::query(
        "insert into admin_audit (caller, method, outcome, at)
         values ('key:ops', 'DisableUser', 'Ok', clock_timestamp() - interval '2 hours'),
                ('key:ops', 'GetUser', 'Ok', clock_timestamp() - interval '400 days')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    for dml in [
        "update admin_audit set caller = 'someone else'",
        "delete from admin_audit",
        "truncate admin_audit",
        "update service_secrets set secret = '\\x00'",
        "delete from service_secrets",
    ] {
        let error = sqlx::query(dml).execute(&mut conn).await.unwrap_err();
        let code = error.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("42501"), "{dml}: {error}");
    }
    // The purge it may run deletes nothing younger than a day, whatever it asks.
    let purged: i64 = sqlx::query_scalar("select purge_admin_audit(0, 1000)")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(purged, 1, "only the 400-day-old row");
    let left: i64 =
        sqlx::query_scalar("select count(*) from admin_audit where method = 'DisableUser'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(left, 1);
    drop(conn);
    drop(app);
    roles.drop_all().await;
}

/// Review found: with a table right missing from the app role, Register answered INTERNAL while
/// health stayed SERVING. Now the call answers UNAVAILABLE (the log names the privilege), and
/// readiness is NOT_SERVING until the right is granted back; so is an instance whose schema
/// lacks a migration this release needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_the_role_cannot_use_is_unavailable_and_not_ready() {
    let roles = Roles::create();
    let mut settings = roles.app_settings();
    settings.health.db_check_interval = Duration::from_millis(200);
    let app = crate::helpers::spawn_with(settings.clone()).await;
    app.register().await;
    assert_eq!(app.health_of("").await, ServingStatus::Serving);

    let revoke = format!("revoke insert on users from \"{}\"", roles.app);
    roles.as_owner(&revoke).await;
    let error = app
        .auth
        .clone()
        .register(crate::helpers::register_request(
            &crate::helpers::unique_email(),
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    eventually(Duration::from_secs(5), "readiness NOT_SERVING", || async {
        app.health_of("").await == ServingStatus::NotServing
    })
    .await;
    assert_eq!(app.health_of("liveness").await, ServingStatus::Serving);

    let grant = format!("grant insert on users to \"{}\"", roles.app);
    roles.as_owner(&grant).await;
    eventually(
        Duration::from_secs(5),
        "readiness SERVING again",
        || async { app.health_of("").await == ServingStatus::Serving },
    )
    .await;
    app.register().await;
    drop(app);

    // A schema older than the release (its last migration taken back): not ready from the start.
    roles
        .as_owner("delete from _sqlx_migrations where version = (select max(version) from _sqlx_migrations)")
        .await;
    let app = crate::helpers::spawn_with(settings).await;
    eventually(Duration::from_secs(5), "readiness NOT_SERVING", || async {
        app.health_of("").await == ServingStatus::NotServing
    })
    .await;
    drop(app);
    roles.drop_all().await;
}
