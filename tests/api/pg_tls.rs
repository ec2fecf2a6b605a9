//! PostgreSQL over TLS (`DATABASE__URL` with `sslmode`/`sslrootcert`), against a PostgreSQL of
//! the tests' own that, like RDS with `rds.force_ssl`, refuses connections without TLS.
//!
//! The server is started once per test binary from the machine's `initdb`/`postgres`, as the
//! `postgres` OS user, with a server certificate for `localhost`/`127.0.0.1` from
//! [`Certs`]. It is forked from a thread that lives as long as the binary with
//! `PR_SET_PDEATHSIG = SIGKILL` (see `topology/process.rs`), so it dies with the binary however it ends;
//! an exit hook shuts it down and removes its files when the binary exits normally.
use std::{
    fs::File,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, mpsc},
    time::Duration,
};

use secrecy::SecretString;
use sqlx::Connection;
use tempfile::TempDir;

use crate::{
    binary::{self, Binary},
    helpers::{Mode, PASSWORD, spawn_with, test_settings},
    topology::Certs,
};

/// How long starting the server may take.
const START: Duration = Duration::from_secs(30);

struct TlsPostgres {
    port: u16,
    postgres: Mutex<Child>,
    certs: Certs,
    dir: TempDir,
}

static SERVER: tokio::sync::OnceCell<TlsPostgres> = tokio::sync::OnceCell::const_new();

/// At exit: an immediate shutdown of the server, then its files go (a `static` is never dropped).
extern "C" fn stop_server() {
    let Some(server) = SERVER.get() else { return };
    if let Ok(mut postgres) = server.postgres.lock() {
        // SAFETY: a plain syscall on our own child, which has not been reaped.
        unsafe { libc::kill(postgres.id() as i32, libc::SIGQUIT) };
        for _ in 0..100 {
            if !matches!(postgres.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = std::fs::remove_dir_all(server.dir.path());
    let _ = std::fs::remove_dir_all(server.certs.dir());
}

/// The server, started by the first caller.
async fn server() -> &'static TlsPostgres {
    SERVER
        .get_or_init(|| async {
            let server = tokio::task::spawn_blocking(TlsPostgres::start)
                .await
                .expect("the server starts");
            server.wait_ready().await;
            // SAFETY: registers a plain function; it neither panics nor unwinds.
            unsafe { libc::atexit(stop_server) };
            server
        })
        .await
}

/// The `postgres` OS user's uid and gid (the server refuses to run as root).
fn postgres_user() -> (u32, u32) {
    // SAFETY: a NUL-terminated name; the result is read at once, on one thread.
    let entry = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
    assert!(!entry.is_null(), "the postgres OS user exists");
    // SAFETY: checked non-null above.
    unsafe { ((*entry).pw_uid, (*entry).pw_gid) }
}

/// The newest `/usr/lib/postgresql/<version>/bin`.
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed in /usr/lib/postgresql")
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("a PostgreSQL version with bin/postgres")
        .1
}

/// `command` as the postgres user, with a clean environment.
fn as_postgres(program: PathBuf) -> Command {
    let (uid, gid) = postgres_user();
    let mut command = Command::new(program);
    command.env_clear().env("LANG", "C").uid(uid).gid(gid);
    command
}

fn run(mut command: Command) -> Output {
    let output = command.output().expect("the command runs");
    assert!(output.status.success(), "{command:?}: {output:?}");
    output
}

/// Spawns `command` from a thread that never ends, with `PR_SET_PDEATHSIG = SIGKILL` (which fires
/// when the forking thread ends, so not from a test's thread).
fn spawn_tied(mut command: Command) -> Child {
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    std::thread::Builder::new()
        .name("pg-tls-spawner".into())
        .spawn(move || {
            let _ = reply.send(command.spawn());
            loop {
                std::thread::park();
            }
        })
        .expect("start the spawner thread");
    answer
        .recv()
        .expect("the spawner answers")
        .expect("postgres starts")
}

const PG_HBA: &str = "\
local all all trust
hostssl all all 127.0.0.1/32 trust
hostssl all all ::1/128 trust
hostnossl all all 0.0.0.0/0 reject
hostnossl all all ::/0 reject
";

impl TlsPostgres {
    fn start() -> TlsPostgres {
        let certs = Certs::new();
        let dir = tempfile::Builder::new()
            .prefix("authd-pg-tls-")
            .tempdir()
            .expect("create a temp dir");
        let (uid, gid) = postgres_user();
        let owned = |path: &Path, mode: u32| {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to postgres");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        owned(dir.path(), 0o700);
        let data = dir.path().join("data");
        let cert = dir.path().join("server.pem");
        let key = dir.path().join("server-key.pem");
        std::fs::copy(&certs.server_cert, &cert).unwrap();
        std::fs::copy(&certs.server_key, &key).unwrap();
        owned(&cert, 0o644);
        owned(&key, 0o600);

        let bin = postgres_bin();
        let mut initdb = as_postgres(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-locale",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(initdb);
        std::fs::write(data.join("pg_hba.conf"), PG_HBA).unwrap();

        let port = crate::redis_server::free_port();
        let log = File::create(dir.path().join("postgres.log")).unwrap();
        let mut postgres = as_postgres(bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .arg("-c")
            .arg(format!("ssl_cert_file={}", cert.display()))
            .arg("-c")
            .arg(format!("ssl_key_file={}", key.display()))
            .args(["-c", "listen_addresses=localhost", "-c", "ssl=on"])
            .args(["-c", "fsync=off", "-c", "max_connections=100"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        TlsPostgres {
            port,
            postgres: Mutex::new(spawn_tied(postgres)),
            certs,
            dir,
        }
    }

    /// Waits until a verified TLS connection succeeds; panics with the server's log after
    /// [`START`].
    async fn wait_ready(&self) {
        let url = self.url("postgres", "verify-full", Some(&self.certs.ca_file));
        let deadline = tokio::time::Instant::now() + START;
        loop {
            match sqlx::PgConnection::connect(&url).await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    return;
                }
                Err(error) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "PostgreSQL with TLS did not start: {error}\n{}",
                    self.log()
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The URL of `database` on `localhost` with this `sslmode` and, if any, `sslrootcert`.
    fn url(&self, database: &str, sslmode: &str, root_cert: Option<&Path>) -> String {
        let mut url = format!(
            "postgres://postgres@localhost:{}/{database}?sslmode={sslmode}",
            self.port
        );
        if let Some(path) = root_cert {
            url.push_str(&format!("&sslrootcert={}", path.display()));
        }
        url
    }
}

fn fresh_database() -> String {
    format!("authd_tls_{}", uuid::Uuid::new_v4().simple())
}

/// authd on `sslmode=verify-full` with the server's CA serves every call, and PostgreSQL sees
/// its connections as TLS ones (a plain one would be refused anyway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_servers_ca_serves_over_tls() {
    let pg = server().await;
    let database = fresh_database();
    let url = pg.url(&database, "verify-full", Some(&pg.certs.ca_file));
    let mut settings = test_settings(Mode::NoRedis);
    settings.database.url = SecretString::from(url.clone());
    let app = spawn_with(settings).await;

    let (email, registered) = app.register().await;
    let login = app.login(&email, PASSWORD).await.expect("login");
    app.validate(&login.session_token).await.expect("validate");
    app.validate(&registered.session_token)
        .await
        .expect("validate the registration's session");

    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(ssl, "the test's own connection is TLS");
    let (tls, plain): (i64, i64) = sqlx::query_as(
        "select count(*) filter (where s.ssl), count(*) filter (where not s.ssl)
         from pg_stat_activity a join pg_stat_ssl s using (pid)
         where a.datname = $1 and a.application_name = 'authd'",
    )
    .bind(&database)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(
        tls >= 1,
        "authd's pooled connections are TLS ({tls} TLS, {plain} plain)"
    );
    assert_eq!(plain, 0, "no authd connection is plain");

    let refused = sqlx::PgConnection::connect(&pg.url(&database, "disable", None))
        .await
        .expect_err("the server refuses connections without TLS");
    assert!(refused.to_string().contains("no encryption"), "{refused}");
}

/// The binary as an operator runs it, with `DATABASE__URL` as given and Redis off.
fn authd(url: &str) -> Command {
    let settings = test_settings(Mode::NoRedis);
    let mut cmd = binary::command(&settings, &crate::helpers::redis_url());
    cmd.env("DATABASE__URL", url).env("REDIS__ENABLED", "false");
    cmd
}

/// `verify-full` with a CA that did not sign the server's certificate stops startup — whether
/// authd's first connection is the create-if-missing check (`migrate`) or the TLS probe (`serve`
/// with neither creation nor migrations) — with a message naming DATABASE__URL and the certificate
/// problem, and never the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_a_wrong_ca_stops_startup_naming_the_certificate() {
    let pg = server().await;
    let url = pg.url(
        &fresh_database(),
        "verify-full",
        Some(&pg.certs.other_ca_file),
    );
    let mut migrate = authd(&url);
    migrate.arg("migrate");
    let mut serve = authd(&url);
    serve
        .arg("serve")
        .env("GRPC__ADDR", format!("127.0.0.1:{}", binary::free_port()))
        .env("DATABASE__CREATE_IF_MISSING", "false")
        .env("DATABASE__MIGRATE", "false");
    for mut cmd in [migrate, serve] {
        let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success(), "{output:?}");
        for needle in [
            "DATABASE__URL",
            "TLS",
            "sslmode=verify-full",
            "UnknownIssuer",
            "not signed by a CA in sslrootcert",
        ] {
            assert!(stderr.contains(needle), "{needle:?} in {stderr}");
        }
        for printed in [&stderr, &stdout] {
            assert!(
                !printed.contains("postgres://"),
                "the URL leaked: {printed}"
            );
        }
    }
}

/// `sslmode=require` without a root certificate connects (encrypted, unverified) and warns at
/// startup, naming the sslmode and not the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_without_a_root_certificate_connects_and_warns() {
    let pg = server().await;
    let url = pg.url(&fresh_database(), "require", None);
    let binary = Binary::start(authd(&url)).await;
    let line = binary
        .wait_for_line(
            &["WARN", "sslmode=require", "not verified"],
            Duration::from_secs(10),
        )
        .await;
    assert!(line.contains("DATABASE__URL"), "{line}");

    let mut auth = binary.auth().await;
    let email = crate::helpers::unique_email();
    let registered = auth
        .register(crate::helpers::register_request(&email))
        .await
        .expect("served over TLS")
        .into_inner();
    auth.validate_session(authd::proto::authd::v1::ValidateSessionRequest {
        session_token: registered.session_token,
        ..Default::default()
    })
    .await
    .expect("validated over TLS");
    assert!(
        !binary.output().contains("postgres://"),
        "the URL leaked: {}",
        binary.output()
    );
}

/// A TLS parameter that cannot work is an invalid setting (exit 2, naming DATABASE__URL and the
/// parameter), not a connection failure.
#[tokio::test]
async fn an_unknown_sslmode_or_an_unreadable_root_certificate_is_an_invalid_setting() {
    let missing = std::env::temp_dir().join(format!("authd-no-such-ca-{}.pem", std::process::id()));
    for (url, needle) in [
        (
            "postgres://postgres@localhost:1/authd?sslmode=verify_full".to_owned(),
            "sslmode=verify_full",
        ),
        (
            format!(
                "postgres://postgres@localhost:1/authd?sslmode=verify-full&sslrootcert={}",
                missing.display()
            ),
            "sslrootcert=",
        ),
    ] {
        let output = authd(&url).arg("migrate").output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("DATABASE__URL"), "{stderr}");
        assert!(stderr.contains(needle), "{needle:?} in {stderr}");
        assert!(!stderr.contains("postgres://"), "the URL leaked: {stderr}");
    }
}
