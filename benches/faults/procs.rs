//! The run's processes: Redis in its topology, PostgreSQL behind proxies, the authd instances, and the accounts they serve.
use super::*;

/// Where Redis is, and how to fault it.
pub(crate) enum Redis {
    Single {
        port: u16,
        child: Mutex<Option<Child>>,
        dir: tempfile::TempDir,
    },
    Cluster(topology::Cluster),
    Sentinel(topology::Sentinel),
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Redis {
    pub(crate) fn spawn_single(port: u16, dir: &Path) -> Child {
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

    pub(crate) async fn wait_port(port: u16) {
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

    pub(crate) async fn start(kind: &str) -> Redis {
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
    pub(crate) async fn primaries(&self) -> Vec<u16> {
        match self {
            Redis::Single { port, .. } => vec![*port],
            Redis::Cluster(c) => c.primaries().await,
            Redis::Sentinel(s) => vec![s.primary_port().await],
        }
    }

    pub(crate) async fn used_memory(&self) -> u64 {
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

pub(crate) fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) on a pid this process started; no memory is touched.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// One authd process.
pub(crate) struct Instance {
    pub(crate) index: usize,
    pub(crate) grpc: u16,
    pub(crate) metrics: u16,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) log: PathBuf,
    pub(crate) child: Mutex<Option<Child>>,
}

impl Instance {
    pub(crate) fn spawn(&self) {
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

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    pub(crate) fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit (the drain), at most 30 s.
    pub(crate) async fn terminate(&self) -> Option<std::process::ExitStatus> {
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

    pub(crate) async fn health(&self) -> Option<ServingStatus> {
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

    pub(crate) async fn wait_serving(&self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if self.health().await == Some(ServingStatus::Serving) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    pub(crate) async fn metric(&self, sample: &str) -> Option<f64> {
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
    pub(crate) fn usage(&self) -> Option<(u64, usize)> {
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

pub(crate) struct Env {
    pub(crate) postgres: postgres::Postgres,
    /// The instances' `REDIS__KEY_PREFIX`.
    pub(crate) prefix: String,
    pub(crate) db_name: String,
    pub(crate) redis: Redis,
    pub(crate) redis_proxies: Vec<Proxy>,
    pub(crate) pg_proxies: Vec<Proxy>,
    pub(crate) instances: Vec<Arc<Instance>>,
    pub(crate) admin_key: String,
    pub(crate) _dir: tempfile::TempDir,
}

pub(crate) async fn start_env(topology: &str) -> Env {
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
            // The run's key also admits the notifier that starts password resets.
            ("ACCOUNTS__API_KEYS_FILE", keys.display().to_string()),
            // The run's callers that validate in their own memory subscribe with the same key;
            // a heartbeat well inside the bounded caller's 1 s stale bound.
            ("EVENTS__API_KEYS_FILE", keys.display().to_string()),
            ("EVENTS__HEARTBEAT", "250ms".into()),
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
    pub(crate) fn database_url(&self) -> String {
        self.postgres.url(&self.db_name)
    }
}

pub(crate) fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("a URL")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// Registers `count` accounts through instance 0.
pub(crate) async fn accounts(env: &Env, prefix: &str, count: usize) -> Vec<Account> {
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
            deleted: false,
        });
    }
    out
}

/// The accounts only ever guessed at.
pub(crate) async fn accounts_emails(env: &Env) -> Vec<String> {
    accounts(env, "target", 3)
        .await
        .into_iter()
        .map(|a| a.email)
        .collect()
}

/// Process ids of the run database's backends.
pub(crate) async fn backends(env: &Env) -> Vec<u32> {
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

pub(crate) async fn drop_database(env: &Env) {
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
