//! `cargo bench --bench faults [-- --quick] [--seed N] [--duration 10m] [--topology single|cluster|all]`
//!
//! A fault-injection run with a history checker (README "Reliability"): three authd processes
//! (the release binary, so SIGKILL and SIGTERM are real), each behind TCP proxies to Redis and
//! PostgreSQL, under a concurrent workload that records every operation, while a schedule drawn
//! from the seed injects faults. Afterwards the checker reads the whole history and the final
//! state; any violation is a non-zero exit.
#[allow(dead_code, clippy::all)]
#[path = "../../tests/api/topology.rs"]
mod topology;

mod check;
mod history;
#[path = "../../tests/support/proxy.rs"]
mod net;
mod postgres;
mod workload;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use authd::proto::authd::v1::{self as pb, auth_service_client::AuthServiceClient};
use clap::Parser;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    check::Violation,
    history::{Fault, History},
    net::{Link, Proxy},
    workload::{Account, PASSWORDS, Shared},
};

const BIN: &str = env!("CARGO_BIN_EXE_authd");
const INSTANCES: usize = 3;
/// The guess limit the run configures (per account, per window).
const GUESS_LIMIT: usize = 4;
const GUESS_WINDOW: Duration = Duration::from_secs(10);
/// After the last fault, everything must be back within this.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);

#[derive(Parser, Debug, Clone)]
struct Opts {
    /// The short run (about a minute per topology) CI executes.
    #[arg(long)]
    quick: bool,
    /// Seed of the fault schedule and of the clients' choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Length of the loaded, faulted part of each run (e.g. `60s`, `1h`).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// `single`, `cluster`, `sentinel` or `all`.
    #[arg(long, default_value = "all")]
    topology: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    // `cargo bench` passes `--bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Where Redis is, and how to fault it.
enum Redis {
    Single {
        port: u16,
        child: Mutex<Option<Child>>,
        dir: tempfile::TempDir,
    },
    Cluster(topology::Cluster),
    Sentinel(topology::Sentinel),
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Redis {
    fn spawn_single(port: u16, dir: &Path) -> Child {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory-policy",
                "noeviction",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed")
    }

    async fn wait_port(port: u16) {
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start on {port}");
    }

    async fn start(kind: &str) -> Redis {
        match kind {
            "cluster" => Redis::Cluster(topology::Cluster::start().await),
            "sentinel" => Redis::Sentinel(topology::Sentinel::start("authd-faults").await),
            _ => {
                let port = free_port();
                let dir = tempfile::tempdir().expect("a temp dir");
                let child = Self::spawn_single(port, dir.path());
                Self::wait_port(port).await;
                Redis::Single {
                    port,
                    child: Mutex::new(Some(child)),
                    dir,
                }
            }
        }
    }

    /// Primaries' ports (the one server for `Single`).
    async fn primaries(&self) -> Vec<u16> {
        match self {
            Redis::Single { port, .. } => vec![*port],
            Redis::Cluster(c) => c.primaries().await,
            Redis::Sentinel(s) => vec![s.primary_port().await],
        }
    }

    async fn used_memory(&self) -> u64 {
        let mut total = 0;
        for port in self.primaries().await {
            if let Ok(reply) = topology::command(port, &["INFO", "memory"]).await
                && let Some(text) = reply.text()
            {
                total += text
                    .lines()
                    .find_map(|l| l.strip_prefix("used_memory:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        total
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Redis::Single { child, .. } = self
            && let Some(mut child) = child.get_mut().unwrap().take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) on a pid this process started; no memory is touched.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// One authd process.
struct Instance {
    index: usize,
    grpc: u16,
    metrics: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Instance {
    fn spawn(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("a log file");
        let child = Command::new(BIN)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("a log file"))
            .stderr(log)
            .spawn()
            .expect("the authd binary");
        *self.child.lock().unwrap() = Some(child);
    }

    fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit (the drain), at most 30 s.
    async fn terminate(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().unwrap().take()?;
        signal(child.id(), libc::SIGTERM);
        for _ in 0..300 {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = child.kill();
        child.wait().ok()
    }

    async fn health(&self) -> Option<ServingStatus> {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{}", self.grpc))
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(1))
            .connect()
            .await
            .ok()?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        Some(response.into_inner().status())
    }

    async fn wait_serving(&self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if self.health().await == Some(ServingStatus::Serving) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    async fn metric(&self, sample: &str) -> Option<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics))
            .await
            .ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: authd\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.ok()?;
        text.lines().find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// Resident memory (KiB) and open file descriptors.
    fn usage(&self) -> Option<(u64, usize)> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        Some((rss, fds))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fault of the schedule: what, on what, for how long (ms).
#[derive(Debug, Clone, Serialize)]
struct Planned {
    at_ms: u64,
    kind: &'static str,
    target: usize,
    hold_ms: u64,
}

fn schedule(seed: u64, topology: &str, run: Duration) -> Vec<Planned> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let redis: &[&str] = match topology {
        "cluster" => &[
            "redis-primary-kill",
            "redis-failover",
            "redis-stop",
            "redis-flushall",
        ],
        "sentinel" => &[
            "redis-primary-kill",
            "redis-failover",
            "redis-stop",
            "redis-flushall",
        ],
        _ => &[
            "redis-kill",
            "redis-stop",
            "redis-flushall",
            "redis-cut",
            "redis-slow",
        ],
    };
    let others = [
        "postgres-cut",
        "postgres-stop",
        "postgres-failover",
        "authd-kill",
        "authd-term",
        "authd-stop",
    ];
    // One failover a run: there is one standby to promote.
    let mut failed_over = false;
    let mut plan = Vec::new();
    let mut at = 4_000;
    // Leave the last part of the run free of faults: the recovery check needs it.
    let end = u64::try_from(run.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_sub(8_000);
    while at < end {
        let mut kind = if rng.bool() {
            redis[rng.usize(..redis.len())]
        } else {
            others[rng.usize(..others.len())]
        };
        if kind == "postgres-failover" {
            if failed_over {
                kind = "postgres-cut";
            }
            failed_over = true;
        }
        plan.push(Planned {
            at_ms: at,
            kind,
            target: rng.usize(..INSTANCES),
            hold_ms: rng.u64(2_000..=5_000),
        });
        at += rng.u64(4_000..=9_000);
    }
    plan
}

struct Env {
    postgres: postgres::Postgres,
    /// The instances' `REDIS__KEY_PREFIX`.
    prefix: String,
    db_name: String,
    redis: Redis,
    redis_proxies: Vec<Proxy>,
    pg_proxies: Vec<Proxy>,
    instances: Vec<Arc<Instance>>,
    admin_key: String,
    _dir: tempfile::TempDir,
}

async fn start_env(topology: &str) -> Env {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let db_name = format!("authd_faults_{id}");
    let postgres = postgres::Postgres::start().await;
    let pg_target: SocketAddr = ([127, 0, 0, 1], postgres.primary_port()).into();
    let dir = tempfile::tempdir().expect("a temp dir");
    let redis = Redis::start(topology).await;
    let mut redis_proxies = Vec::new();
    let mut pg_proxies = Vec::new();
    for _ in 0..INSTANCES {
        pg_proxies.push(Proxy::start(pg_target).await);
        if let Redis::Single { port, .. } = &redis {
            redis_proxies.push(Proxy::start(([127, 0, 0, 1], *port).into()).await);
        }
    }
    let mut key = [0u8; 24];
    getrandom::fill(&mut key).expect("random bytes");
    let admin_key = hex::encode(key);
    let keys = dir.path().join("admin-keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[key]]\nname = \"faults\"\nsha256 = \"{}\"\n",
            hex::encode(Sha256::digest(&admin_key))
        ),
    )
    .expect("write the keys file");
    let prefix = format!("authd-faults:{id}:");
    let mut instances = Vec::new();
    for index in 0..INSTANCES {
        let (grpc, metrics) = (free_port(), free_port());
        let redis_url = match &redis {
            Redis::Single { .. } => format!("redis://{}", redis_proxies[index].addr),
            Redis::Cluster(c) => c.url(),
            Redis::Sentinel(s) => s.url(),
        };
        let env: Vec<(String, String)> = [
            ("GRPC__ADDR", format!("127.0.0.1:{grpc}")),
            ("METRICS__ADDR", format!("127.0.0.1:{metrics}")),
            (
                "DATABASE__URL",
                format!("postgres://postgres@{}/{db_name}", pg_proxies[index].addr),
            ),
            ("DATABASE__MAX_CONNECTIONS", "10".into()),
            ("REDIS__URL", redis_url),
            ("REDIS__KEY_PREFIX", prefix.clone()),
            ("RATE_LIMIT__LOGIN_PER_EMAIL", GUESS_LIMIT.to_string()),
            (
                "RATE_LIMIT__LOGIN_WINDOW",
                format!("{}s", GUESS_WINDOW.as_secs()),
            ),
            ("RATE_LIMIT__LOGIN_PER_IP", "0".into()),
            ("RATE_LIMIT__REGISTER_PER_IP", "0".into()),
            ("RATE_LIMIT__MAX_FAILED_LOGINS", "0".into()),
            ("SESSION__MAX_PER_USER", "1000".into()),
            // The in-process cache is on: the promises must hold with it (README "The
            // in-process cache"); a revoking call may then wait up to a lease (3.13 s) for an
            // instance that was killed or stopped, within the clients' 5 s deadline.
            // (`FAULTS_LOCAL_CACHE=false` runs without it, for comparison.)
            (
                "LOCAL_CACHE__ENABLED",
                std::env::var("FAULTS_LOCAL_CACHE").unwrap_or_else(|_| "true".into()),
            ),
            ("GRPC__SHUTDOWN_GRACE", "5s".into()),
            ("ADMIN__API_KEYS_FILE", keys.display().to_string()),
            // `FAULTS_LOG=info` (or any filter) logs more, e.g. every call, to study a violation.
            (
                "LOG__LEVEL",
                std::env::var("FAULTS_LOG").unwrap_or_else(|_| "warn".into()),
            ),
            ("LOG__FORMAT", "json".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        instances.push(Arc::new(Instance {
            index,
            grpc,
            metrics,
            env,
            log: dir.path().join(format!("authd-{index}.log")),
            child: Mutex::new(None),
        }));
    }
    // The first creates the database and migrates; the others start once it serves.
    instances[0].spawn();
    assert!(
        instances[0].wait_serving(Duration::from_secs(60)).await,
        "instance 0 did not start: {}",
        std::fs::read_to_string(&instances[0].log).unwrap_or_default()
    );
    for instance in &instances[1..] {
        instance.spawn();
    }
    for instance in &instances[1..] {
        assert!(
            instance.wait_serving(Duration::from_secs(60)).await,
            "instance {} did not start",
            instance.index
        );
    }
    Env {
        postgres,
        prefix,
        db_name,
        redis,
        redis_proxies,
        pg_proxies,
        instances,
        admin_key,
        _dir: dir,
    }
}

impl Env {
    /// The run's database on the current primary, directly.
    fn database_url(&self) -> String {
        self.postgres.url(&self.db_name)
    }
}

fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("a URL")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// Registers `count` accounts through instance 0.
async fn accounts(env: &Env, prefix: &str, count: usize) -> Vec<Account> {
    let mut auth = AuthServiceClient::new(channel(env.instances[0].grpc));
    let mut out = Vec::new();
    for i in 0..count {
        let email = format!(
            "{prefix}-{i}-{}@faults.example",
            uuid::Uuid::new_v4().simple()
        );
        let response = auth
            .register(pb::RegisterRequest {
                email: email.clone(),
                password: PASSWORDS[0].into(),
                display_name: format!("Account {i}"),
                client: None,
            })
            .await
            .expect("register an account")
            .into_inner();
        let session = response.session.map(|s| s.session_id).unwrap_or_default();
        out.push(Account {
            user_id: response.user_id,
            email,
            password: 0,
            sessions: vec![(session, response.session_token, 0)],
            disabled: false,
        });
    }
    out
}

/// Injects one fault and records its window.
async fn inject(env: &Env, shared: &Shared, fault: &Planned) {
    let hold = Duration::from_millis(fault.hold_ms);
    let start = shared.now_us();
    let target = fault.target;
    let instance = &env.instances[target];
    let mut target_name = target.to_string();
    match fault.kind {
        "redis-kill" => {
            if let Redis::Single { port, child, dir } = &env.redis {
                if let Some(mut c) = child.lock().unwrap().take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                *child.lock().unwrap() = Some(Redis::spawn_single(*port, dir.path()));
                Redis::wait_port(*port).await;
                target_name = "redis".into();
            }
        }
        "redis-stop" => {
            let ports = env.redis.primaries().await;
            let port = ports[target % ports.len()];
            match &env.redis {
                Redis::Single { child, .. } => {
                    let pid = child.lock().unwrap().as_ref().map(Child::id);
                    if let Some(pid) = pid {
                        signal(pid, libc::SIGSTOP);
                        tokio::time::sleep(hold).await;
                        signal(pid, libc::SIGCONT);
                    }
                }
                // Shorter than the cluster's node timeout and the sentinels' down-after: a
                // stall, not a failover.
                Redis::Cluster(c) => {
                    c.stop(port);
                    tokio::time::sleep(hold.min(Duration::from_millis(800))).await;
                    c.cont(port);
                }
                Redis::Sentinel(s) => {
                    s.stop(port);
                    tokio::time::sleep(hold.min(Duration::from_millis(800))).await;
                    s.cont(port);
                }
            }
            target_name = format!("redis:{port}");
        }
        "redis-flushall" => {
            for port in env.redis.primaries().await {
                let _ = topology::command(port, &["FLUSHALL"]).await;
            }
            target_name = "redis".into();
        }
        "redis-cut" => {
            env.redis_proxies[target].set(Link::Refused);
            tokio::time::sleep(hold).await;
            env.redis_proxies[target].set(Link::Up);
        }
        "redis-slow" => {
            env.redis_proxies[target].set(Link::Slow(Duration::from_millis(300)));
            tokio::time::sleep(hold).await;
            env.redis_proxies[target].set(Link::Up);
        }
        "redis-primary-kill" => match &env.redis {
            Redis::Cluster(c) => {
                let primaries = c.primaries().await;
                let port = primaries[target % primaries.len()];
                c.kill(port);
                let _ = tokio::time::timeout(Duration::from_secs(20), c.wait_primary_change(port))
                    .await;
                c.restart(port).await;
                target_name = format!("redis:{port}");
            }
            Redis::Sentinel(s) => {
                // The sentinels fail a primary over only once they see a fit replica (some
                // 20 s after the last failover): wait for that first.
                s.wait_healthy().await;
                let port = s.primary_port().await;
                s.kill(port);
                let _ = tokio::time::timeout(Duration::from_secs(20), s.wait_primary_change(port))
                    .await;
                s.restart(port).await;
                target_name = format!("redis:{port}");
            }
            Redis::Single { .. } => {}
        },
        "redis-failover" => match &env.redis {
            Redis::Cluster(c) => {
                let replicas = c.replicas().await;
                if let Some(port) = replicas.get(target % replicas.len().max(1)) {
                    c.failover_takeover(*port).await;
                    target_name = format!("redis:{port}");
                }
            }
            Redis::Sentinel(s) => {
                s.wait_healthy().await;
                target_name = format!("redis:{}", s.failover().await);
            }
            Redis::Single { .. } => {}
        },
        "postgres-cut" => {
            env.pg_proxies[target].set(Link::Blackhole);
            tokio::time::sleep(hold).await;
            env.pg_proxies[target].set(Link::Up);
        }
        "postgres-stop" => {
            // Every backend of the run's database stops (a PostgreSQL stall).
            let pids = backends(env).await;
            for pid in &pids {
                signal(*pid, libc::SIGSTOP);
            }
            tokio::time::sleep(hold.min(Duration::from_secs(4))).await;
            for pid in &pids {
                signal(*pid, libc::SIGCONT);
            }
            target_name = format!("{} backends", pids.len());
        }
        "postgres-failover" => {
            if let Some(port) = env.postgres.fail_over().await {
                for proxy in &env.pg_proxies {
                    proxy.retarget(([127, 0, 0, 1], port).into());
                }
                target_name = format!("standby on {port}");
            }
        }
        "authd-stop" => {
            // Paused, with whatever it holds in memory (a GC-like stall, a frozen VM).
            if let Some(pid) = instance.pid() {
                signal(pid, libc::SIGSTOP);
                tokio::time::sleep(hold).await;
                signal(pid, libc::SIGCONT);
            }
        }
        "authd-kill" => {
            instance.kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
            instance.spawn();
            instance.wait_serving(Duration::from_secs(30)).await;
        }
        "authd-term" => {
            let status = instance.terminate().await;
            if !status.is_some_and(|s| s.success()) {
                eprintln!("faults: instance {target} exited {status:?} after SIGTERM");
                target_name = format!("{target} {STOP_FAILED}: {status:?}");
            }
            instance.spawn();
            instance.wait_serving(Duration::from_secs(30)).await;
        }
        _ => {}
    }
    shared.history.fault(Fault {
        kind: fault.kind.to_owned(),
        target: target_name,
        start_us: start,
        end_us: shared.now_us(),
    });
}

/// Marks an `authd-term` fault whose instance did not exit 0 within 30 s of SIGTERM.
const STOP_FAILED: &str = "did not stop cleanly";

/// Process ids of the run database's backends.
async fn backends(env: &Env) -> Vec<u32> {
    let Ok(mut conn) =
        <sqlx::PgConnection as sqlx::Connection>::connect(&env.postgres.url("postgres")).await
    else {
        return Vec::new();
    };
    sqlx::query_scalar::<_, i32>("select pid from pg_stat_activity where datname = $1")
        .bind(&env.db_name)
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| u32::try_from(p).ok())
        .collect()
}

#[derive(Serialize)]
struct Sample {
    at_s: u64,
    rss_kib: Vec<u64>,
    fds: Vec<usize>,
    redis_bytes: u64,
    pg_bytes: i64,
}

async fn sample(env: &Env, shared: &Shared) -> Sample {
    let usage: Vec<(u64, usize)> = env
        .instances
        .iter()
        .map(|i| i.usage().unwrap_or((0, 0)))
        .collect();
    let pg_bytes =
        match <sqlx::PgConnection as sqlx::Connection>::connect(&env.database_url()).await {
            Ok(mut conn) => sqlx::query_scalar::<_, i64>(
                "select coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint from pg_class c
             join pg_namespace n on n.oid = c.relnamespace
             where n.nspname = 'public' and c.relkind = 'r'",
            )
            .fetch_one(&mut conn)
            .await
            .unwrap_or(0),
            Err(_) => 0,
        };
    Sample {
        at_s: shared.now_us() / 1_000_000,
        rss_kib: usage.iter().map(|u| u.0).collect(),
        fds: usage.iter().map(|u| u.1).collect(),
        redis_bytes: env.redis.used_memory().await,
        pg_bytes,
    }
}

/// 3. Everything acknowledged is in PostgreSQL: registered users, profile versions, revoked
///    sessions.
async fn acknowledged_writes_are_kept(
    env: &Env,
    shared: &Shared,
    ops: &[history::Op],
) -> Vec<Violation> {
    let mut violations = Vec::new();
    let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&env.database_url()).await
    else {
        return vec![Violation {
            rule: "acknowledged writes are kept",
            what: "cannot read PostgreSQL at the end".into(),
            ops: vec![],
        }];
    };
    for op in ops.iter().filter(|o| o.outcome == "Ok") {
        if let Some(user) = &op.created_user {
            let id = uuid::Uuid::parse_str(user).unwrap_or_default();
            let found: bool =
                sqlx::query_scalar("select exists (select 1 from users where id = $1)")
                    .bind(id)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap_or(false);
            if !found {
                violations.push(Violation {
                    rule: "acknowledged writes are kept",
                    what: format!("registered user {user} is missing"),
                    ops: vec![op.id],
                });
            }
        }
        if op.kind == history::Kind::UpdateProfile {
            for (user, version) in &op.versions {
                let id = shared.accounts[*user].lock().unwrap().user_id.clone();
                let id = uuid::Uuid::parse_str(&id).unwrap_or_default();
                let stored: i64 =
                    sqlx::query_scalar("select version from profiles where user_id = $1")
                        .bind(id)
                        .fetch_one(&mut conn)
                        .await
                        .unwrap_or(0);
                if stored < *version {
                    violations.push(Violation {
                        rule: "acknowledged writes are kept",
                        what: format!(
                            "profile of user {user} is at {stored}, below acknowledged {version}"
                        ),
                        ops: vec![op.id],
                    });
                }
            }
        }
        let covered: Vec<uuid::Uuid> = op
            .covers
            .iter()
            .filter_map(|s| uuid::Uuid::parse_str(s).ok())
            .collect();
        if !covered.is_empty() {
            let live: Vec<uuid::Uuid> = sqlx::query_scalar(
                "select id from sessions where id = any($1) and revoked_at is null",
            )
            .bind(&covered)
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
            if !live.is_empty() {
                violations.push(Violation {
                    rule: "acknowledged writes are kept",
                    what: format!(
                        "{} sessions of an acknowledged revocation are not revoked",
                        live.len()
                    ),
                    ops: vec![op.id],
                });
            }
        }
    }
    violations
}

/// Whether the cache has followed the outbox logs to their end: the cursor of the run's newest
/// namespace (key prefix and generation) stands past every logged row.
async fn logs_followed(env: &Env) -> bool {
    let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&env.database_url()).await
    else {
        return false;
    };
    sqlx::query_scalar::<_, bool>(
        "select coalesce((
             select c.sessions_after >= coalesce((select max(created_at) from session_invalidations), '-infinity')
                and c.profiles_after >= coalesce((select max(created_at) from profile_invalidations), '-infinity')
             from outbox_cursors c
             where starts_with(c.namespace, $1)
             order by c.updated_at desc
             limit 1), false)",
    )
    .bind(&env.prefix)
    .fetch_one(&mut conn)
    .await
    .unwrap_or(false)
}

/// 6. After the last fault, within [`RECOVERY_BOUND`]: every instance SERVING, Redis up, a
///    cached validation on every instance costs no PostgreSQL query, and the outbox logs are
///    followed to their end. The time it took.
async fn recovers(env: &Env) -> Result<Duration, Violation> {
    let started = Instant::now();
    let mut auth = AuthServiceClient::new(channel(env.instances[0].grpc));
    let email = format!("recovery-{}@faults.example", uuid::Uuid::new_v4().simple());
    let mut token = None;
    let mut last = String::new();
    while started.elapsed() < RECOVERY_BOUND {
        if token.is_none() {
            token = auth
                .register(pb::RegisterRequest {
                    email: email.clone(),
                    password: PASSWORDS[0].into(),
                    display_name: "Recovery".into(),
                    client: None,
                })
                .await
                .ok()
                .map(|r| r.into_inner().session_token);
        }
        let mut all = token.is_some();
        for instance in &env.instances {
            if !all {
                break;
            }
            let serving = instance.health().await == Some(ServingStatus::Serving);
            let redis_up = instance.metric("authd_redis_up").await == Some(1.0);
            let cached = match &token {
                Some(token) if serving && redis_up => {
                    let mut client = AuthServiceClient::new(channel(instance.grpc));
                    let validate = |client: &mut AuthServiceClient<Channel>| {
                        let request = pb::ValidateSessionRequest {
                            session_token: token.clone(),
                        };
                        let mut client = client.clone();
                        async move { client.validate_session(request).await.is_ok() }
                    };
                    let warm = validate(&mut client).await && validate(&mut client).await;
                    let sample = "authd_db_queries_total{origin=\"request\"}";
                    let before = instance.metric(sample).await;
                    let again = validate(&mut client).await;
                    warm && again && before.is_some() && instance.metric(sample).await == before
                }
                _ => false,
            };
            if !(serving && redis_up && cached) {
                last = format!(
                    "instance {}: serving {serving}, redis_up {redis_up}, cached validation {cached}",
                    instance.index
                );
                all = false;
            }
        }
        if all && !logs_followed(env).await {
            last = "the outbox logs are not followed to their end".into();
            all = false;
        }
        if all {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(Violation {
        rule: "recovers by itself",
        what: format!(
            "not recovered {} s after the last fault: {last}",
            RECOVERY_BOUND.as_secs()
        ),
        ops: vec![],
    })
}

#[derive(Serialize)]
struct Report {
    topology: String,
    seed: u64,
    duration_s: u64,
    operations: BTreeMap<String, BTreeMap<String, usize>>,
    faults: Vec<Fault>,
    violations: Vec<Violation>,
    /// The operations named by the violations.
    evidence: Vec<history::Op>,
    recovery_s: Option<f64>,
    samples: Vec<Sample>,
}

async fn run(topology: &str, seed: u64, duration: Duration, clients: usize) -> Report {
    println!(
        "faults: {topology}: starting Redis, PostgreSQL proxies and {INSTANCES} authd processes"
    );
    let env = start_env(topology).await;
    let accounts = accounts(&env, "user", 24).await;
    let targets = accounts_emails(&env).await;
    let shared = Arc::new(Shared {
        channels: env.instances.iter().map(|i| channel(i.grpc)).collect(),
        accounts: accounts.into_iter().map(Mutex::new).collect(),
        targets,
        history: History::default(),
        t0: Instant::now(),
        admin_key: env.admin_key.clone(),
    });
    let plan = schedule(seed, topology, duration);
    println!(
        "faults: {topology}: seed {seed}, {} faults planned over {} s",
        plan.len(),
        duration.as_secs()
    );
    let deadline = Instant::now() + duration;
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            tokio::spawn(workload::client(
                shared.clone(),
                seed.wrapping_add(c as u64 + 1),
                deadline,
            ))
        })
        .collect();
    let mut samples = vec![sample(&env, &shared).await];
    let mut next_sample = Instant::now() + Duration::from_secs(10);
    for fault in &plan {
        let at = shared.t0 + Duration::from_millis(fault.at_ms);
        while Instant::now() < at {
            if Instant::now() >= next_sample {
                samples.push(sample(&env, &shared).await);
                next_sample += Duration::from_secs(10);
            }
            tokio::time::sleep(
                Duration::from_millis(100).min(at.saturating_duration_since(Instant::now())),
            )
            .await;
        }
        inject(&env, &shared, fault).await;
    }
    for worker in workers {
        let _ = worker.await;
    }
    samples.push(sample(&env, &shared).await);
    let recovery = recovers(&env).await;
    let ops = shared.history.ops();
    let faults = shared.history.faults();
    let mut violations = check::revoked_sessions_stay_revoked(&ops, &faults);
    violations.extend(
        faults
            .iter()
            .filter(|f| f.target.contains(STOP_FAILED))
            .map(|f| Violation {
                rule: "stops on SIGTERM",
                what: format!(
                    "instance {} at {:.1} s: no clean exit within 30 s (grace 5 s)",
                    f.target,
                    f.start_us as f64 / 1e6
                ),
                ops: vec![],
            }),
    );
    violations.extend(check::profiles_never_go_back(&ops, &faults));
    violations.extend(acknowledged_writes_are_kept(&env, &shared, &ops).await);
    violations.extend(check::errors_only_when_expected(&ops, &faults));
    violations.extend(check::guesses_stay_within_the_limit(
        &ops,
        &faults,
        GUESS_LIMIT,
        u64::try_from(GUESS_WINDOW.as_micros()).unwrap_or(u64::MAX),
        INSTANCES,
    ));
    let recovery_s = match recovery {
        Ok(took) => Some(took.as_secs_f64()),
        Err(violation) => {
            violations.push(violation);
            None
        }
    };
    let mut operations: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for op in &ops {
        *operations
            .entry(format!("{:?}", op.kind))
            .or_default()
            .entry(op.outcome.clone())
            .or_default() += 1;
    }
    if !violations.is_empty() {
        // The whole logs are kept beside the report (the run's directory goes with it).
        let kept = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
        for instance in &env.instances {
            let log = std::fs::read_to_string(&instance.log).unwrap_or_default();
            let copy = kept.join(format!("faults-{topology}-authd-{}.log", instance.index));
            let copied = std::fs::create_dir_all(&kept).and_then(|()| std::fs::write(&copy, &log));
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!(
                "--- authd-{} log tail (whole log: {}) ---\n{}",
                instance.index,
                match copied {
                    Ok(()) => copy.display().to_string(),
                    Err(error) => format!("not kept: {error}"),
                },
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    let evidence: Vec<history::Op> = violations
        .iter()
        .flat_map(|v| v.ops.iter().copied())
        .filter_map(|id| ops.get(id).cloned())
        .collect();
    drop_database(&env).await;
    Report {
        evidence,
        topology: topology.to_owned(),
        seed,
        duration_s: duration.as_secs(),
        operations,
        faults,
        violations,
        recovery_s,
        samples,
    }
}

/// The accounts only ever guessed at.
async fn accounts_emails(env: &Env) -> Vec<String> {
    accounts(env, "target", 3)
        .await
        .into_iter()
        .map(|a| a.email)
        .collect()
}

async fn drop_database(env: &Env) {
    for instance in &env.instances {
        instance.kill();
    }
    if let Ok(mut conn) =
        <sqlx::PgConnection as sqlx::Connection>::connect(&env.postgres.url("postgres")).await
    {
        let sql = format!("drop database if exists \"{}\" with (force)", env.db_name);
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await;
    }
}

fn summary(report: &Report) {
    println!(
        "\n== {} (seed {}, {} s) ==",
        report.topology, report.seed, report.duration_s
    );
    let total: usize = report.operations.values().flat_map(|m| m.values()).sum();
    println!("operations: {total}");
    for (kind, outcomes) in &report.operations {
        let parts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
        println!("  {kind:<18} {}", parts.join(", "));
    }
    println!("faults: {}", report.faults.len());
    for f in &report.faults {
        println!(
            "  {:>7.1} s  {:<20} {:<12} {:.1} s",
            f.start_us as f64 / 1e6,
            f.kind,
            f.target,
            (f.end_us - f.start_us) as f64 / 1e6
        );
    }
    match report.recovery_s {
        Some(s) => println!(
            "recovered {s:.1} s after the last fault (bound {} s)",
            RECOVERY_BOUND.as_secs()
        ),
        None => println!("did not recover within {} s", RECOVERY_BOUND.as_secs()),
    }
    if let (Some(first), Some(last)) = (report.samples.first(), report.samples.last()) {
        println!(
            "resources, first → last sample: RSS KiB {:?} → {:?}; fds {:?} → {:?}; Redis {} → {} bytes; PostgreSQL {} → {} bytes",
            first.rss_kib,
            last.rss_kib,
            first.fds,
            last.fds,
            first.redis_bytes,
            last.redis_bytes,
            first.pg_bytes,
            last.pg_bytes
        );
    }
    println!("violations: {}", report.violations.len());
    for v in &report.violations {
        println!("  [{}] {} (ops {:?})", v.rule, v.what, v.ops);
        for op in report.evidence.iter().filter(|o| v.ops.contains(&o.id)) {
            println!(
                "      op {}: {:?} on instance {}, {:.3}–{:.3} s, {}",
                op.id,
                op.kind,
                op.instance,
                op.start_us as f64 / 1e6,
                op.end_us as f64 / 1e6,
                op.outcome
            );
        }
    }
}

fn main() -> std::process::ExitCode {
    let opts = Opts::parse();
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let duration = opts.duration.unwrap_or(if opts.quick {
        Duration::from_secs(50)
    } else {
        Duration::from_secs(300)
    });
    let topologies: Vec<&str> = match opts.topology.as_str() {
        "all" => vec!["single", "cluster", "sentinel"],
        one => vec![one],
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut failed = false;
    let mut reports = Vec::new();
    for topology in topologies {
        let report = runtime.block_on(run(topology, seed, duration, opts.clients));
        summary(&report);
        failed |= !report.violations.is_empty();
        reports.push(report);
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/faults.json");
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(json) = serde_json::to_string_pretty(&reports) {
        let _ = std::fs::write(&out, json);
        println!("\nwrote {}", out.display());
    }
    let mut again = format!("--seed {seed}");
    if opts.quick {
        again.push_str(" --quick");
    }
    if opts.topology != "all" {
        again.push_str(&format!(" --topology {}", opts.topology));
    }
    if let Some(duration) = opts.duration {
        again.push_str(&format!(
            " --duration {}",
            humantime::format_duration(duration)
        ));
    }
    println!("seed {seed}: reproduce with `cargo bench --bench faults -- {again}`");
    if failed {
        println!("VIOLATIONS FOUND");
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
