//! The run's own PostgreSQL, as a managed offering runs it: a primary and a streaming standby
//! (synchronous: nothing acknowledged is lost on failover), started from the machine's
//! `initdb`/`pg_basebackup` as the `postgres` user. The fault `postgres-failover` stops the primary
//! as a crash would, promotes the standby, and switches every instance's proxy to it, as a
//! managed endpoint's DNS name would move.
use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Mutex,
    time::Duration,
};

pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// The primary's port.
    primary: Mutex<u16>,
    /// The standby (data directory, port), until it is promoted.
    standby: Mutex<Option<(PathBuf, u16)>>,
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
    versions.pop().expect("a PostgreSQL with bin/postgres").1
}

fn run(command: &mut Command) -> Output {
    let output = command.output().expect("the command runs");
    assert!(output.status.success(), "{command:?}: {output:?}");
    output
}

const PG_HBA: &str = "\
local all all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
";

async fn connect(port: u16) -> Option<sqlx::PgConnection> {
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .ok()
}

impl Postgres {
    fn command(&self, program: &str) -> Command {
        let (uid, gid) = postgres_user();
        let mut command = Command::new(self.bin.join(program));
        command.env_clear().env("LANG", "C").uid(uid).gid(gid);
        command
    }

    /// Starts the primary, then a standby streaming from it, then makes every commit wait for
    /// the standby.
    pub async fn start() -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("authd-faults-pg-")
            .tempdir()
            .expect("a temp dir");
        let (uid, gid) = postgres_user();
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown to postgres");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let primary_port = crate::free_port();
        let pg = Postgres {
            bin: postgres_bin(),
            dir,
            primary: Mutex::new(primary_port),
            standby: Mutex::new(None),
        };
        let primary = pg.dir.path().join("primary");
        run(pg.command("initdb").arg("-D").arg(&primary).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-locale",
            "-E",
            "UTF8",
            "--no-sync",
        ]));
        std::fs::write(primary.join("pg_hba.conf"), PG_HBA).unwrap();
        pg.launch(&primary, primary_port);
        pg.wait_ready(primary_port).await;
        let standby = pg.dir.path().join("standby");
        run(pg.command("pg_basebackup").args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary_port.to_string(),
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "-D",
            &standby.display().to_string(),
        ]));
        let standby_port = crate::free_port();
        pg.launch(&standby, standby_port);
        pg.wait_ready(standby_port).await;
        let mut conn = connect(primary_port).await.expect("the primary answers");
        for sql in [
            "alter system set synchronous_standby_names = '*'",
            "select pg_reload_conf()",
        ] {
            sqlx::query(sql)
                .execute(&mut conn)
                .await
                .expect("configure the primary");
        }
        for _ in 0..300 {
            let sync: Option<String> = sqlx::query_scalar(
                "select sync_state from pg_stat_replication where sync_state = 'sync'",
            )
            .fetch_optional(&mut conn)
            .await
            .ok()
            .flatten();
            if sync.is_some() {
                *pg.standby.lock().unwrap() = Some((standby, standby_port));
                return pg;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the standby never became synchronous");
    }

    fn launch(&self, data: &Path, port: u16) {
        let options = [
            format!("-p {port}"),
            "-c listen_addresses=127.0.0.1".into(),
            format!("-c unix_socket_directories={}", self.dir.path().display()),
            "-c fsync=off".into(),
            "-c max_connections=200".into(),
            "-c wal_level=replica".into(),
            "-c max_wal_senders=4".into(),
            "-c hot_standby=on".into(),
        ]
        .join(" ");
        let log = data.with_extension("log");
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(data)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(options)
            .args(["start", "-w"]));
    }

    async fn wait_ready(&self, port: u16) {
        for _ in 0..300 {
            if let Some(conn) = connect(port).await {
                let _ = sqlx::Connection::close(conn).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("PostgreSQL on {port} did not start");
    }

    pub fn primary_port(&self) -> u16 {
        *self.primary.lock().unwrap()
    }

    /// `postgres://…/<database>` on the current primary, directly.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}",
            self.primary_port()
        )
    }

    /// Stops the primary as a crash would, promotes the standby and waits until it takes
    /// writes: the new primary's port (`None` when no standby is left).
    pub async fn fail_over(&self) -> Option<u16> {
        let (standby, port) = self.standby.lock().unwrap().take()?;
        let old = self.dir.path().join("primary");
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&old)
            .args(["stop", "-m", "immediate"])
            .output();
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(&standby)
            .args(["promote", "-w"]));
        for _ in 0..300 {
            if let Some(mut conn) = connect(port).await {
                let recovering: Result<bool, _> = sqlx::query_scalar("select pg_is_in_recovery()")
                    .fetch_one(&mut conn)
                    .await;
                if matches!(recovering, Ok(false)) {
                    *self.primary.lock().unwrap() = port;
                    return Some(port);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the promoted standby never took writes");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        for node in ["primary", "standby"] {
            let data = self.dir.path().join(node);
            if data.exists() {
                let _ = self
                    .command("pg_ctl")
                    .arg("-D")
                    .arg(&data)
                    .args(["stop", "-m", "immediate"])
                    .output();
            }
        }
    }
}
