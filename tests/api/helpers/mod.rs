//! spawn_app(): a real authd on 127.0.0.1:0 with its own fresh database and its own Redis key
//! prefix, so tests run in parallel and never see each other's data.
use std::{sync::Arc, time::Duration};

use authd::{
    app::Application,
    auth::FillHook,
    config::{LogSettings, Settings},
    proto::authd::v1::{
        self as pb, auth_service_client::AuthServiceClient,
        profile_service_client::ProfileServiceClient,
    },
    store::Db,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::health_client::HealthClient;

mod calls;

pub const PASSWORD: &str = "correct horse battery staple";

/// The Redis deployment the app under test uses; every behaviour is tested with one Redis,
/// with a Redis Cluster (3 primaries + 3 replicas, shared by the tests of this binary) and with
/// `REDIS__ENABLED=false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Redis,
    Cluster,
    NoRedis,
}

/// The shared cluster's URL, once [`crate::topology::shared_cluster`] has started it.
static CLUSTER_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Starts (once) the cluster the `Mode::Cluster` tests share.
pub async fn cluster_ready() {
    let cluster = crate::topology::shared_cluster().await;
    let _ = CLUSTER_URL.set(cluster.url());
}

/// Runs an async test body with one Redis, with a Redis Cluster and with
/// `REDIS__ENABLED=false`.
#[macro_export]
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn with_redis() {
                super::$name($crate::helpers::Mode::Redis).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn with_cluster() {
                $crate::helpers::cluster_ready().await;
                super::$name($crate::helpers::Mode::Cluster).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn without_redis() {
                super::$name($crate::helpers::Mode::NoRedis).await
            }
        }
    )*};
}

pub fn postgres_base_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The test Redis' address, for a proxy in front of it.
pub fn redis_addr() -> std::net::SocketAddr {
    redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("TEST_REDIS_URL with a numeric host:port")
}

/// Settings for one test: fresh database name, own key prefix, quick background passes.
pub fn test_settings(mode: Mode) -> Settings {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut s = Settings::default();
    s.grpc.addr = "127.0.0.1:0".parse().unwrap();
    s.metrics.addr = "127.0.0.1:0".parse().unwrap();
    s.grpc.shutdown_grace = Duration::from_secs(5);
    s.database.url = SecretString::from(format!("{}/authd_test_{id}", postgres_base_url()));
    s.redis.enabled = mode != Mode::NoRedis;
    s.redis.url = SecretString::from(match mode {
        Mode::Cluster => CLUSTER_URL
            .get()
            .expect("call helpers::cluster_ready() first")
            .clone(),
        Mode::Redis | Mode::NoRedis => redis_url(),
    });
    s.redis.key_prefix = format!("authd-test:{id}:");
    s.session.invalidation_interval = Duration::from_millis(100);
    // Every test with Redis runs with the in-process cache on: the guarantees must hold with it.
    s.local_cache.enabled = mode != Mode::NoRedis;
    // Tests register and log in many users from one address; the tests of the per-address
    // limits set them back.
    s.rate_limit.login_per_ip = 100_000;
    s.rate_limit.register_per_ip = 100_000;
    s.log = LogSettings {
        level: std::env::var("TEST_LOG").unwrap_or_else(|_| "off".into()),
        ..LogSettings::default()
    };
    s
}

pub struct TestApp {
    /// The gRPC port.
    pub addr: std::net::SocketAddr,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub auth: AuthServiceClient<Channel>,
    pub profiles: ProfileServiceClient<Channel>,
    pub health: HealthClient<Channel>,
    pub channel: Channel,
    pub db: Arc<Db>,
    /// The domain service behind the port (for what no RPC does: reloading the signing keys).
    pub service: Arc<authd::auth::AuthService>,
    pub settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    pub server: Option<JoinHandle<anyhow::Result<()>>>,
    drop_database: bool,
}

pub async fn spawn_app(mode: Mode) -> TestApp {
    spawn_with(test_settings(mode)).await
}

pub async fn spawn_with(settings: Settings) -> TestApp {
    spawn_inner(settings, true, Hooks::default(), ANY_PORT).await
}

/// Hooks called between a cache miss's PostgreSQL read and its Redis write.
#[derive(Default)]
pub struct Hooks {
    /// How the test's clients reach an app with TLS on (`None`: plain text).
    pub client_tls: Option<tonic::transport::ClientTlsConfig>,
    pub session_fill: Option<FillHook>,
    pub profile_fill: Option<FillHook>,
    /// Runs when the generation job is about to react to a reconnection.
    pub establish: Option<authd::cache::Hook>,
}

pub async fn spawn_with_hooks(settings: Settings, hooks: Hooks) -> TestApp {
    spawn_inner(settings, true, hooks, ANY_PORT).await
}

/// An app whose session cache fills call `hook` between their PostgreSQL read and their Redis
/// write.
pub async fn spawn_with_fill_hook(settings: Settings, hook: FillHook) -> TestApp {
    spawn_with_hooks(
        settings,
        Hooks {
            session_fill: Some(hook),
            ..Hooks::default()
        },
    )
    .await
}

/// A second instance on the same database and Redis prefix as `other`.
pub async fn spawn_sharing(other: &TestApp, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = other.settings.clone();
    adjust(&mut settings);
    spawn_inner(settings, false, Hooks::default(), ANY_PORT).await
}

/// Where an app listens unless a test says: a port the OS picks.
const ANY_PORT: &str = "127.0.0.1:0";

/// A second instance sharing `other`'s database and Redis prefix on `addr` (an instance that
/// stopped there, restarted).
pub async fn spawn_sharing_on(other: &TestApp, addr: std::net::SocketAddr) -> TestApp {
    spawn_inner(
        other.settings.clone(),
        false,
        Hooks::default(),
        &addr.to_string(),
    )
    .await
}

async fn spawn_inner(settings: Settings, drop_database: bool, hooks: Hooks, bind: &str) -> TestApp {
    let _ = authd::telemetry::init(&settings.log, &settings.traces);
    let listener = TcpListener::bind(bind).await.unwrap();
    let app = Application::build_with_listener(settings.clone(), listener)
        .await
        .expect("the app builds");
    let addr = app.local_addr();
    let metrics_addr = app.metrics_addr();
    let db = app.db();
    let service = app.auth();
    if let Some(hook) = hooks.session_fill {
        app.auth().set_fill_hook(hook);
    }
    if let Some(hook) = hooks.profile_fill {
        app.profiles().set_fill_hook(hook);
    }
    if let Some(hook) = hooks.establish {
        app.redis().set_establish_hook(hook);
    }
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let scheme = if hooks.client_tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(10));
    if let Some(tls) = hooks.client_tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let channel = endpoint.connect().await.expect("connects to the app");
    TestApp {
        addr,
        metrics_addr,
        auth: AuthServiceClient::new(channel.clone()),
        profiles: ProfileServiceClient::new(channel.clone()),
        health: HealthClient::new(channel.clone()),
        channel,
        db,
        service,
        settings,
        stop: Some(stop),
        server: Some(server),
        drop_database,
    }
}

pub fn unique_email() -> String {
    format!("user-{}@example.com", uuid::Uuid::new_v4().simple())
}

pub fn register_request(email: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        email: email.to_owned(),
        password: PASSWORD.to_owned(),
        display_name: "Test User".to_owned(),
        client: Some(pb::ClientInfo {
            ip_address: "192.0.2.10".to_owned(),
            user_agent: "authd-tests/1.0".to_owned(),
            device_id: String::new(),
        }),
    }
}

impl TestApp {
    /// Registers a new user; returns (email, response).
    /// The health status of `service` (`""`: the whole server).
    pub async fn health_of(
        &self,
        service: &str,
    ) -> tonic_health::pb::health_check_response::ServingStatus {
        self.health
            .clone()
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status()
    }

    pub async fn register(&self) -> (String, pb::RegisterResponse) {
        let email = unique_email();
        let response = self
            .auth
            .clone()
            .register(register_request(&email))
            .await
            .expect("register succeeds")
            .into_inner();
        (email, response)
    }

    pub async fn login(&self, email: &str, password: &str) -> Result<pb::LoginResponse, Status> {
        self.auth
            .clone()
            .login(pb::LoginRequest {
                email: email.to_owned(),
                password: password.to_owned(),
                client: None,
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn validate(&self, token: &str) -> Result<pb::Session, Status> {
        self.auth
            .clone()
            .validate_session(pb::ValidateSessionRequest {
                session_token: token.to_owned(),
                ..Default::default()
            })
            .await
            .map(|r| {
                r.into_inner()
                    .session
                    .expect("a valid session comes with its details")
            })
    }

    pub async fn logout(&self, token: &str) -> Result<(), Status> {
        self.auth
            .clone()
            .logout(pb::LogoutRequest {
                session_token: token.to_owned(),
            })
            .await
            .map(|_| ())
    }

    /// Validations of `token` no longer reach PostgreSQL (they are served by Redis).
    pub async fn served_from_redis(&self, token: &str) -> bool {
        if self.validate(token).await.is_err() {
            return false;
        }
        let before = self.queries();
        self.validate(token).await.is_ok() && self.queries() == before
    }

    pub fn queries(&self) -> u64 {
        self.db.queries_executed()
    }

    /// Reloads the token signing keys now (as the job does every minute).
    pub async fn refresh_keys(&self) {
        self.service.refresh_keys().await.unwrap();
    }

    /// Stops the server as SIGTERM would and waits for it to finish.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.server.take() {
            Some(server) => server.await?,
            None => Ok(()),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if !self.drop_database {
            return;
        }
        let url = self.settings.database.url.expose_secret().to_owned();
        // Drop runs inside the test's runtime: do the async cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(drop_database(&url));
        })
        .join();
    }
}

/// A token of the right shape that authd never minted (a MAC under a key of its own).
pub fn made_up_token() -> String {
    use authd::auth::token::{SigningKey, generate};
    let key = SigningKey::new(1, &SigningKey::random_secret()).expect("32 bytes");
    generate(&key).0
}

/// A direct Redis connection, to look at or tamper with what authd stored (any URL authd
/// accepts).
pub async fn redis_client(url: &str) -> fred::clients::Client {
    use fred::interfaces::ClientLike;
    let (url, _, _) = authd::cache::normalize_url(url).unwrap();
    let config = fred::types::config::Config::from_url(&url).unwrap();
    let client = fred::prelude::Builder::from_config(config).build().unwrap();
    client.init().await.expect("redis is reachable");
    client
}

/// Calls of each Redis command so far (from INFO commandstats), e.g. `get`, `mget`, `evalsha`.
pub async fn redis_command_calls(
    client: &fred::clients::Client,
) -> std::collections::HashMap<String, u64> {
    use fred::interfaces::ClientLike;
    let info: String = client
        .info(Some(fred::types::InfoKind::CommandStats))
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

/// The Redis key of a token's cached session in `app`'s namespace.
pub fn session_key(app: &TestApp, token: &str) -> String {
    let hash = authd::auth::token::TokenHash::of_token(token).expect("a well-formed token");
    format!(
        "{}session:v2:{}",
        app.settings.redis.key_prefix,
        hash.to_hex()
    )
}

/// The Redis key of a user's cached profile in `app`'s namespace.
pub fn profile_key(app: &TestApp, user_id: &str) -> String {
    format!("{}profile:v2:{}", app.settings.redis.key_prefix, user_id)
}

pub fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    match result {
        Err(status) if status.code() == code => status,
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

/// Polls `check` until it holds (for effects that are asynchronous by design, such as a
/// reconnection); fails the test after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fill hook that pauses the first cache fill after [`PauseOnce::arm`] (between its PostgreSQL
/// read and its Redis write) until [`PauseOnce::resume`].
#[derive(Clone, Default)]
pub struct PauseOnce {
    armed: Arc<std::sync::atomic::AtomicBool>,
    reached: Arc<tokio::sync::Notify>,
    resume: Arc<tokio::sync::Notify>,
}

impl PauseOnce {
    pub fn hook(&self) -> FillHook {
        let this = self.clone();
        Arc::new(move |_| {
            let this = this.clone();
            Box::pin(async move {
                if this.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    this.reached.notify_one();
                    this.resume.notified().await;
                }
            })
        })
    }

    /// The same pause as a generation-job hook.
    pub fn establish_hook(&self) -> authd::cache::Hook {
        let hook = self.hook();
        Arc::new(move || hook(uuid::Uuid::nil()))
    }

    pub fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until the armed fill has paused.
    pub async fn reached(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.reached.notified())
            .await
            .expect("the fill paused after reading PostgreSQL");
    }

    pub fn resume(&self) {
        self.resume.notify_one();
    }
}

/// The fields named by the `google.rpc.BadRequest` of an INVALID_ARGUMENT.
pub fn violation_fields(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .expect("INVALID_ARGUMENT carries google.rpc.BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

pub use crate::database::drop_database;

/// A transaction of its own holding `tables` (`"profiles"`, `"sessions, profiles"`) in access
/// exclusive mode: every statement of the app on them waits (PostgreSQL slow for them) until
/// [`TableLock::release`].
pub struct TableLock(sqlx::PgConnection);

impl TableLock {
    pub async fn hold(app: &TestApp, tables: &str) -> Self {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(
            app.settings.database.url.expose_secret(),
        )
        .await
        .unwrap();
        sqlx::query("begin").execute(&mut conn).await.unwrap();
        let lock = format!("lock table {tables} in access exclusive mode");
        sqlx::query(sqlx::AssertSqlSafe(lock))
            .execute(&mut conn)
            .await
            .unwrap();
        Self(conn)
    }

    pub async fn release(mut self) {
        sqlx::query("rollback").execute(&mut self.0).await.unwrap();
    }
}

/// Runs `command` with `input` on its standard input, and what it printed (`missing`: what to
/// say when the program cannot be started).
pub async fn run_with_input(
    mut command: tokio::process::Command,
    input: &[u8],
    missing: &str,
) -> std::process::Output {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(missing);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).await.unwrap();
    drop(stdin);
    child.wait_with_output().await.unwrap()
}
