//! The `authd` binary run as operators run it — its own process, settings from the environment,
//! JSON logs on stdout — for what an in-process server cannot show: exit codes, log lines,
//! signals.
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use authd::proto::authd::v1::auth_service_client::AuthServiceClient;
use secrecy::ExposeSecret;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_authd");

/// A command for the binary with a clean environment: the test database and key prefix of
/// `settings`, Redis at `redis_url`, quiet logs on stdout (JSON), metrics on a free port.
pub fn command(settings: &authd::config::Settings, redis_url: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE__URL", settings.database.url.expose_secret())
        .env("REDIS__KEY_PREFIX", &settings.redis.key_prefix)
        .env("REDIS__URL", redis_url)
        .env("LOG__LEVEL", "warn")
        .env("LOG__FORMAT", "json")
        .env("METRICS__ADDR", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `GET /metrics` on `addr` from the loopback address `source`: the body.
pub async fn scrape_from(addr: std::net::SocketAddr, source: [u8; 4]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: authd\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

pub fn free_port() -> u16 {
    crate::redis_server::free_port()
}

/// A running binary whose output is collected as it comes.
pub struct Binary {
    child: Child,
    pub addr: String,
    output: Arc<Mutex<String>>,
}

impl Binary {
    /// Starts `cmd` on a free port and waits until it serves gRPC (in plain text).
    pub async fn start(cmd: Command) -> Binary {
        let binary = Binary::spawn(cmd);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while binary.channel().await.is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the binary did not serve: {}",
                binary.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        binary
    }

    /// Starts `cmd` on a free port (`GRPC__ADDR`), collecting its output.
    pub fn spawn(mut cmd: Command) -> Binary {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = cmd
            .env("GRPC__ADDR", &addr)
            .spawn()
            .expect("the binary starts");
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut out = output.lock().unwrap();
                    out.push_str(&line);
                    out.push('\n');
                }
            });
        }
        Binary {
            child,
            addr,
            output,
        }
    }

    /// Sends `signal` to the process (SIGSTOP and SIGCONT pause and resume it).
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) with a live child's pid and a valid signal number.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// A plaintext channel to its gRPC port, once it serves.
    pub async fn channel(&self) -> Option<Channel> {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .ok()
    }

    pub async fn auth(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel().await.expect("the binary serves"))
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until a line containing every one of `needles` was printed; panics after `within`.
    pub async fn wait_for_line(&self, needles: &[&str], within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(line) = self
                .output()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return line.to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no line with {needles:?} within {within:?}: {}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a first start prints, as operators see it in a file (not a terminal): the database it
/// created and where metrics are served, no colour codes — and a second start on the same
/// database does not log PostgreSQL's "already exists, skipping" notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_logs_say_what_happened_without_noise() {
    let settings = crate::helpers::test_settings(crate::helpers::Mode::NoRedis);
    let start = || {
        let mut cmd = command(&settings, "redis://127.0.0.1:1");
        cmd.env("REDIS__ENABLED", "false")
            .env("LOG__LEVEL", "info")
            .env("LOG__FORMAT", "pretty");
        Binary::start(cmd)
    };
    let first = start().await;
    let database = settings
        .database
        .url
        .expose_secret()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    first
        .wait_for_line(&["created the database", &database], Duration::from_secs(5))
        .await;
    first
        .wait_for_line(
            &["metrics served at http://127.0.0.1:"],
            Duration::from_secs(5),
        )
        .await;
    first
        .wait_for_line(&["authd serving"], Duration::from_secs(5))
        .await;
    drop(first);
    let second = start().await;
    second
        .wait_for_line(&["authd serving"], Duration::from_secs(5))
        .await;
    let output = second.output();
    assert!(
        !output.contains('\u{1b}'),
        "colour codes in a file: {output}"
    );
    assert!(!output.contains("already exists"), "{output}");
    assert!(!output.contains("created the database"), "{output}");
    drop(second);
    crate::helpers::drop_database(settings.database.url.expose_secret()).await;
}

/// The docs quote the line an operator sees when Redis is unreachable at startup (degraded
/// mode): the binary prints exactly that, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_at_startup_is_logged_as_the_docs_quote() {
    const QUOTED: &str =
        "redis is unreachable at startup; serving from PostgreSQL until it is back";
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/redis.md")).unwrap();
    assert!(
        docs.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .contains(QUOTED),
        "docs/redis.md quotes the line"
    );
    let settings = crate::helpers::test_settings(crate::helpers::Mode::Redis);
    let binary = Binary::start(command(&settings, "redis://127.0.0.1:1")).await;
    binary
        .wait_for_line(&[QUOTED], Duration::from_secs(10))
        .await;
    drop(binary);
    crate::helpers::drop_database(settings.database.url.expose_secret()).await;
}

/// docs/redis.md: a Redis outage is logged once and its end once. When Redis returns, the pool's
/// connections come back one by one: a command that fails meanwhile on one still reconnecting
/// is the end of the same outage, not a new one — and fred's own warnings do not repeat what
/// authd says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_logged_once_and_its_end_once() {
    use crate::proxy::{Link, Proxy};
    let settings = crate::helpers::test_settings(crate::helpers::Mode::Redis);
    let link = Proxy::start(crate::helpers::redis_addr()).await;
    let mut cmd = command(&settings, &format!("redis://{}", link.addr));
    cmd.env("LOG__LEVEL", "info");
    let binary = Binary::start(cmd).await;
    let mut auth = binary.auth().await;
    let email = crate::helpers::unique_email();
    let token = auth
        .register(crate::helpers::register_request(&email))
        .await
        .expect("register succeeds")
        .into_inner()
        .session_token;
    // Validations all along, as a fleet's would come: each is a Redis command.
    let traffic = tokio::spawn({
        let mut auth = auth.clone();
        async move {
            loop {
                let request = authd::proto::authd::v1::ValidateSessionRequest {
                    session_token: token.clone(),
                    ..Default::default()
                };
                let _ = auth.validate_session(request).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    const DOWN: &str = "redis is unreachable; serving from PostgreSQL until it returns";
    const BACK: &str = "redis is reachable again; using the cache";
    link.set(Link::Refused);
    binary.wait_for_line(&[DOWN], Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    link.set(Link::Up);
    binary.wait_for_line(&[BACK], Duration::from_secs(20)).await;
    // The pool's other connections come back meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    traffic.abort();
    let output = binary.output();
    let count = |needle: &str| output.lines().filter(|l| l.contains(needle)).count();
    assert_eq!((count(DOWN), count(BACK)), (1, 1), "{output}");
    let fred_warnings = output
        .lines()
        .filter(|l| l.contains(r#"target":"fred"#) && l.contains(r#""level":"WARN""#))
        .count();
    assert_eq!(fred_warnings, 0, "{output}");
    drop(binary);
    crate::helpers::drop_database(settings.database.url.expose_secret()).await;
}

/// docs/security.md, "Security events": a failed login and a password change each make exactly
/// one line with the documented fields, and none carries a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_events_carry_the_documented_fields() {
    use authd::proto::authd::v1 as pb;
    let settings = crate::helpers::test_settings(crate::helpers::Mode::NoRedis);
    let mut cmd = command(&settings, "redis://127.0.0.1:1");
    cmd.env("REDIS__ENABLED", "false")
        .env("LOG__LEVEL", "warn,authd::security=info");
    let binary = Binary::start(cmd).await;
    let mut auth = binary.auth().await;
    let email = crate::helpers::unique_email();
    let registered = auth
        .register(crate::helpers::register_request(&email))
        .await
        .unwrap()
        .into_inner();
    let session = registered.session.clone().unwrap();
    let wrong = "a wrong guess of a password";
    let login = pb::LoginRequest {
        email: email.clone(),
        password: wrong.to_owned(),
        client: Some(pb::ClientInfo {
            ip_address: "203.0.113.9".to_owned(),
            ..Default::default()
        }),
    };
    assert_eq!(
        auth.login(login).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let new_password = "an even better passphrase";
    auth.change_password(pb::ChangePasswordRequest {
        session_token: registered.session_token.clone(),
        current_password: crate::helpers::PASSWORD.to_owned(),
        new_password: new_password.to_owned(),
    })
    .await
    .unwrap();
    let events = |name: &str| -> Vec<serde_json::Value> {
        binary
            .output()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|e| e["target"] == "authd::security" && e["event"] == name)
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while events("password_changed").is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed = events("login_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    let failed = &failed[0];
    assert_eq!(failed["message"], "security event");
    assert_eq!(failed["user_id"], registered.user_id.as_str());
    assert_eq!(failed["client_ip"], "203.0.113.9");
    assert_eq!(failed["reason"], "wrong_password");
    assert_eq!(failed["peer"], "127.0.0.1");
    let changed = events("password_changed");
    assert_eq!(changed.len(), 1, "{changed:?}");
    let changed = &changed[0];
    assert_eq!(changed["user_id"], registered.user_id.as_str());
    assert_eq!(changed["session_id"], session.session_id.as_str());
    // The address the calling session signed in from (register_request's).
    assert_eq!(changed["client_ip"], "192.0.2.10");
    assert_eq!(changed["outcome"], "changed");
    assert_eq!(changed["revoked"], 0);
    assert_eq!(changed["peer"], "127.0.0.1");
    let output = binary.output();
    for secret in [
        registered.session_token.as_str(),
        wrong,
        new_password,
        crate::helpers::PASSWORD,
    ] {
        assert!(!output.contains(secret), "a secret in the logs: {output}");
    }
    drop(binary);
    crate::helpers::drop_database(settings.database.url.expose_secret()).await;
}
