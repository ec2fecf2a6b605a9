//! Redis topologies of the tests' own, started from the machine's `redis-server` and `redis-cli`:
//!
//! - [`Cluster`]: a Redis Cluster of 3 primaries and 3 replicas; [`shared_cluster`] is one for the
//!   whole test binary;
//! - [`Sentinel`]: a primary, a replica and 3 sentinels watching them;
//! - [`Certs`] and [`TlsRedis`]: certificates minted on the fly (a CA, a server and client
//!   certificates, and an unrelated "wrong" CA) and a TLS-only server using them.
//!
//! Every server is started from one long-lived thread with `PR_SET_PDEATHSIG = SIGKILL`, so it dies
//! with the test binary even when its owner is a `static` that is never dropped; an owner that is
//! dropped kills its servers at once. Servers log to files in their topology's temp dir; every
//! wait is bounded (30 s) and panics with what it was waiting for and the tail of those logs.
//! Nothing here keeps a tokio resource past the call that made it, so a topology may be shared by
//! tests that each run their own runtime.
#![allow(dead_code)]

use std::{
    collections::HashSet,
    fs::OpenOptions,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicI32, AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, sleep, timeout},
};

/// How long any wait here may take before it panics.
pub const WAIT: Duration = Duration::from_secs(30);
/// Between two checks of a wait.
const POLL: Duration = Duration::from_millis(100);
/// How long one command to a server may take (a stopped server never answers).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one `redis-cli` run may take, unless said otherwise.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// The cluster's `cluster-node-timeout`: a node silent this long is marked failing, and a primary
/// that stays so is failed over by its replica soon after.
pub const CLUSTER_NODE_TIMEOUT: Duration = Duration::from_millis(1000);
/// The sentinels' `down-after-milliseconds`.
pub const SENTINEL_DOWN_AFTER: Duration = Duration::from_millis(1000);
/// How long [`Sentinel::wait_healthy`] and [`Sentinel::wait_replicated`] may take: after a
/// failover the sentinels notice that the old primary still claims to be one at their next
/// `INFO` of it (every 10 s), reconfigure it 8 s later, and see it as a fit replica at their next
/// `INFO` again — about 20 s, up to 30 s.
pub const SENTINEL_SETTLE: Duration = Duration::from_secs(60);
/// How many slots a cluster has.
const SLOTS: u32 = 16384;

// ---------------------------------------------------------------------------------------------
// Talking to servers
// ---------------------------------------------------------------------------------------------

/// A reply in RESP2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<String>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The text of a simple or bulk string.
    pub fn text(&self) -> Option<&str> {
        match self {
            Resp::Simple(s) | Resp::Bulk(Some(s)) => Some(s),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Resp::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The items of an array (none for anything else).
    pub fn items(&self) -> &[Resp] {
        match self {
            Resp::Array(Some(items)) => items,
            _ => &[],
        }
    }

    /// A flat `[key, value, key, value, …]` array (as Sentinel answers) as pairs.
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.items()
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => Some((
                    k.text()?.to_owned(),
                    v.text().unwrap_or_default().to_owned(),
                )),
                _ => None,
            })
            .collect()
    }

    /// The value of `key` in a flat `[key, value, …]` array.
    pub fn get(&self, key: &str) -> Option<String> {
        self.pairs()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

/// Parses one reply from the front of `buf`: `None` while it is incomplete, else the reply and the
/// bytes it took.
fn parse_resp(buf: &[u8]) -> Result<Option<(Resp, usize)>, String> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[1..eol]).map_err(|e| e.to_string())?;
    let after = eol + 2;
    let number = || {
        line.parse::<i64>()
            .map_err(|e| format!("bad RESP number {line:?}: {e}"))
    };
    Ok(Some(match buf[0] {
        b'+' => (Resp::Simple(line.to_owned()), after),
        b'-' => (Resp::Error(line.to_owned()), after),
        b':' => (Resp::Int(number()?), after),
        b'$' => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Some((Resp::Bulk(None), after)));
            };
            if buf.len() < after + len + 2 {
                return Ok(None);
            }
            let text = String::from_utf8_lossy(&buf[after..after + len]).into_owned();
            (Resp::Bulk(Some(text)), after + len + 2)
        }
        b'*' => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Some((Resp::Array(None), after)));
            };
            let mut items = Vec::with_capacity(len);
            let mut at = after;
            for _ in 0..len {
                let Some((item, used)) = parse_resp(&buf[at..])? else {
                    return Ok(None);
                };
                items.push(item);
                at += used;
            }
            (Resp::Array(Some(items)), at)
        }
        other => return Err(format!("unexpected RESP type byte {:?}", other as char)),
    }))
}

/// Sends `commands` to `127.0.0.1:port` over one connection, in order, and returns their replies
/// (error replies included). `Err` when the server cannot be reached or does not answer all within
/// 2 s — as a stopped (SIGSTOP) server never does.
pub async fn pipeline(port: u16, commands: &[&[&str]]) -> Result<Vec<Resp>, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect to port {port}: {e}"))?;
        let mut request = Vec::new();
        for args in commands {
            request.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for arg in *args {
                request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                request.extend_from_slice(arg.as_bytes());
                request.extend_from_slice(b"\r\n");
            }
        }
        stream
            .write_all(&request)
            .await
            .map_err(|e| format!("write to port {port}: {e}"))?;
        let mut buf = Vec::new();
        let mut replies = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        while replies.len() < commands.len() {
            while let Some((reply, used)) = parse_resp(&buf)? {
                replies.push(reply);
                buf.drain(..used);
                if replies.len() == commands.len() {
                    return Ok(replies);
                }
            }
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read from port {port}: {e}"))?;
            if n == 0 {
                return Err(format!("port {port} closed the connection"));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok(replies)
    };
    timeout(COMMAND_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("port {port} did not answer within {COMMAND_TIMEOUT:?}"))?
}

/// Sends one command to `127.0.0.1:port`; an error reply is an `Err` too.
pub async fn command(port: u16, args: &[&str]) -> Result<Resp, String> {
    match pipeline(port, &[args]).await?.pop() {
        Some(Resp::Error(e)) => Err(format!("{args:?} on port {port}: {e}")),
        Some(reply) => Ok(reply),
        None => Err("no reply".into()),
    }
}

/// `INFO section` of the server on `port`, as `field:value` text.
async fn info(port: u16, section: &str) -> Result<String, String> {
    command(port, &["INFO", section])
        .await?
        .text()
        .map(str::to_owned)
        .ok_or_else(|| format!("INFO {section} on port {port}: not text"))
}

/// The value of `name` in `field:value` lines (INFO, CLUSTER INFO).
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|line| line.trim_end().split_once(':'))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Runs `redis-cli` with `args` (at most 10 s, or it panics) and returns what it did. Mind that
/// `redis-cli` exits 0 even when the server answers an error: look at its stdout.
pub async fn redis_cli(args: &[&str]) -> Output {
    redis_cli_within(args, CLI_TIMEOUT).await
}

async fn redis_cli_within(args: &[&str], limit: Duration) -> Output {
    let run = tokio::process::Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match timeout(limit, run).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("redis-cli could not run (is it installed?): {e}"),
        Err(_) => panic!("redis-cli {args:?} did not finish within {limit:?}"),
    }
}

/// `redis-cli`'s stdout, trimmed.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Both of `redis-cli`'s outputs, for messages.
fn outputs(output: &Output) -> String {
    format!(
        "status {}, stdout {:?}, stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Checks `check` every 100 ms until it returns `Ok`, for at most [`WAIT`]; then panics with
/// `what`, the last reason it gave and `logs()`.
async fn wait_until<T, Fut>(what: &str, logs: impl Fn() -> String, check: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Result<T, String>>,
{
    wait_until_within(WAIT, what, logs, check).await
}

/// As [`wait_until`], for at most `limit`.
async fn wait_until_within<T, Fut>(
    limit: Duration,
    what: &str,
    logs: impl Fn() -> String,
    mut check: impl FnMut() -> Fut,
) -> T
where
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match check().await {
            Ok(value) => return value,
            Err(reason) => reason,
        };
        if Instant::now() >= deadline {
            panic!("{what}: not so within {limit:?}; last: {last}\n{}", logs());
        }
        sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Server processes
// ---------------------------------------------------------------------------------------------

/// A port nobody listens on now (the OS picks it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// A free port for a cluster node: below 55535 and with its bus port (port + 10000) free too,
/// neither among `taken` (which gets both).
fn cluster_port(taken: &mut HashSet<u16>) -> u16 {
    for _ in 0..1000 {
        let port = free_port();
        if port >= 55535 || taken.contains(&port) || taken.contains(&(port + 10000)) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10000)).is_err() {
            continue;
        }
        taken.insert(port);
        taken.insert(port + 10000);
        return port;
    }
    panic!("found no free port below 55535 whose bus port is free too");
}

/// Spawns `command` so that it is sent SIGKILL when the test binary exits, however it exits.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends, not the process: tests
/// run on threads of their own that end with the test, so every server is forked from one thread
/// that lives as long as the binary.
fn spawn_tied(mut command: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("topology-spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("start the spawner thread");
        requests
    });
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The binary died between fork and prctl: nobody would kill us later.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner
        .send((command, reply))
        .expect("the spawner thread is alive");
    answer.recv().expect("the spawner thread answers")
}

/// What a server process is doing, as far as the tests made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    Running,
    /// SIGSTOPped: it holds its connections but answers nothing.
    Stopped,
    Dead,
}

/// How to tell that a server is up.
#[derive(Clone)]
enum Probe {
    /// It answers PING on its plain port (with anything, even NOAUTH).
    Ping,
    /// `redis-cli` with these arguments prints PONG (or NOAUTH).
    Cli(Vec<String>),
}

/// One `redis-server` (or sentinel) process, which may be stopped, continued, killed and started
/// again with the same arguments.
struct Proc {
    port: u16,
    args: Vec<String>,
    log: PathBuf,
    /// The child's pid while it runs (0 otherwise), for the exit hook that may not lock.
    pid: AtomicI32,
    state: Mutex<(Option<Child>, Run)>,
}

impl Proc {
    fn new(port: u16, args: Vec<String>, log: PathBuf) -> Self {
        Self {
            port,
            args,
            log,
            pid: AtomicI32::new(0),
            state: Mutex::new((None, Run::Dead)),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, (Option<Child>, Run)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the process (its output appended to its log file).
    fn spawn(&self) {
        let mut state = self.state();
        assert!(state.0.is_none(), "port {} is already running", self.port);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the server's log file");
        let mut command = Command::new("redis-server");
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = spawn_tied(command).expect("redis-server is installed");
        self.pid.store(child.id() as i32, Ordering::SeqCst);
        *state = (Some(child), Run::Running);
    }

    /// Running, stopped, or dead (killed, or exited by itself).
    fn run(&self) -> Run {
        let mut state = self.state();
        if let Some(child) = state.0.as_mut()
            && let Ok(Some(_)) = child.try_wait()
        {
            state.0 = None;
            state.1 = Run::Dead;
            self.pid.store(0, Ordering::SeqCst);
        }
        state.1
    }

    fn live(&self) -> bool {
        self.run() == Run::Running
    }

    fn signal(&self, signal: libc::c_int, then: Run) {
        let mut state = self.state();
        let child = state
            .0
            .as_ref()
            .unwrap_or_else(|| panic!("the server on port {} is not running", self.port));
        // SAFETY: a plain kill(2) of our own child, which is not reaped while we hold the lock.
        let done = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        assert_eq!(done, 0, "signal {signal} to port {}", self.port);
        state.1 = then;
    }

    fn stop(&self) {
        self.signal(libc::SIGSTOP, Run::Stopped);
    }

    fn cont(&self) {
        self.signal(libc::SIGCONT, Run::Running);
    }

    /// SIGKILL, and reaps it. Nothing if it is not running.
    fn kill(&self) {
        let mut state = self.state();
        if let Some(mut child) = state.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        state.1 = Run::Dead;
        self.pid.store(0, Ordering::SeqCst);
    }

    /// The last `lines` lines of its log.
    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!(
            "--- {} (last {lines} lines) ---\n{tail}\n",
            self.log.display()
        )
    }

    /// Waits (at most 10 s) until it answers `probe`; `Err` if it exits or never does.
    async fn wait_ready(&self, probe: &Probe) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.run() == Run::Dead {
                return Err(format!("redis-server on port {} exited", self.port));
            }
            let up = match probe {
                Probe::Ping => pipeline(self.port, &[&["PING"]]).await.is_ok(),
                Probe::Cli(args) => {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let out = stdout(&redis_cli_within(&args, Duration::from_secs(5)).await);
                    out.contains("PONG") || out.contains("NOAUTH")
                }
            };
            if up {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redis-server on port {} did not answer within 10s",
                    self.port
                ));
            }
            sleep(POLL).await;
        }
    }

    /// Starts a server on a port from `pick`, with the arguments `args` gives for that port, and
    /// waits until it answers `probe`; tries other ports (up to 5) when it does not come up, as
    /// when someone took the port meanwhile.
    async fn start(
        dir: &Path,
        label: &str,
        mut pick: impl FnMut() -> u16,
        args: impl Fn(u16) -> Vec<String>,
        probe: impl Fn(u16) -> Probe,
    ) -> Proc {
        let mut failures = String::new();
        for _ in 0..5 {
            let port = pick();
            let proc = Proc::new(port, args(port), dir.join(format!("{label}-{port}.log")));
            proc.spawn();
            match proc.wait_ready(&probe(port)).await {
                Ok(()) => return proc,
                Err(e) => {
                    proc.kill();
                    failures.push_str(&format!("{e}\n{}", proc.log_tail(10)));
                }
            }
        }
        panic!("could not start {label}:\n{failures}");
    }
}

fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temp dir")
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_owned()
}

/// Arguments every data node gets: loopback only, nothing on disk but what it must keep in `dir`,
/// and replicas synced at once (7.0 waits 5 s for more replicas before a diskless sync).
fn base_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &path_str(dir),
        "--repl-diskless-sync-delay",
        "0",
    ]
    .map(str::to_owned)
    .to_vec()
}

// ---------------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------------

/// A Redis Cluster on 127.0.0.1: 3 primaries with one replica each, the slots split evenly.
///
/// Nodes are `--cluster-node-timeout 1000`: a node that stops answering (SIGSTOP, SIGKILL) is
/// marked failing within about a second, and a failing primary is failed over by its replica a
/// second or two later. Replicas may always fail over (`cluster-replica-validity-factor 0`) and
/// never move to another primary (`cluster-allow-replica-migration no`), so the layout only
/// changes when a test makes it. Nothing is persisted but each node's `nodes-PORT.conf` in the
/// cluster's temp dir, so a node started again rejoins empty.
///
/// Right after `redis-cli --cluster create` returns, some nodes still see a replica-to-be as a
/// primary: [`Cluster::start`] waits until every node sees the same roles.
pub struct Cluster {
    nodes: Vec<Proc>,
    /// The primaries when it was created: the seed nodes of [`Cluster::url`].
    seeds: Vec<u16>,
    dir: TempDir,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// The id of its primary, for a replica.
    primary: Option<String>,
}

impl NodeLine {
    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

fn parse_cluster_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() < 8 {
                return None;
            }
            // ip:port@cport[,hostname]
            let port = parts[1]
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            Some(NodeLine {
                id: parts[0].to_owned(),
                port,
                flags: parts[2].split(',').map(str::to_owned).collect(),
                primary: (parts[3] != "-").then(|| parts[3].to_owned()),
            })
        })
        .collect()
}

/// Slot ranges and the port of the primary that serves each, sorted.
type SlotMap = Vec<(u16, u16, u16)>;

/// Nodes and the port of their primary (none for a primary), sorted.
type Roles = Vec<(u16, Option<u16>)>;

impl Cluster {
    /// Starts 6 nodes on free ports, creates the cluster with `redis-cli --cluster create
    /// --cluster-replicas 1`, and waits until it is healthy ([`Cluster::wait_healthy`]).
    pub async fn start() -> Cluster {
        let dir = temp_dir("authd-cluster-");
        let mut taken = HashSet::new();
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let path = dir.path().to_owned();
            let node = Proc::start(
                dir.path(),
                "node",
                || cluster_port(&mut taken),
                |port| {
                    let mut args = base_args(port, &path);
                    let conf = path_str(&path.join(format!("nodes-{port}.conf")));
                    let timeout = CLUSTER_NODE_TIMEOUT.as_millis().to_string();
                    args.extend(
                        [
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            &conf,
                            "--cluster-node-timeout",
                            &timeout,
                            "--cluster-replica-validity-factor",
                            "0",
                            "--cluster-allow-replica-migration",
                            "no",
                        ]
                        .map(str::to_owned),
                    );
                    args
                },
                |_| Probe::Ping,
            )
            .await;
            nodes.push(node);
        }
        let mut cluster = Cluster {
            nodes,
            seeds: Vec::new(),
            dir,
        };

        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        let created = redis_cli_within(&args, Duration::from_secs(60)).await;
        if !created.status.success() || !stdout(&created).contains("All 16384 slots covered") {
            panic!(
                "redis-cli --cluster create failed: {}\n{}",
                outputs(&created),
                cluster.logs()
            );
        }
        cluster.wait_healthy().await;
        cluster.seeds = cluster.primaries().await;
        assert_eq!(cluster.seeds.len(), 3, "3 primaries after creation");
        cluster
    }

    /// `redis-cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`: the primaries it was created
    /// with, as seed nodes.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .seeds
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis-cluster://{}", seeds.join(","))
    }

    /// The ports of all 6 nodes, whatever their role or state.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The ports of the seed nodes in [`Cluster::url`] (the primaries at creation).
    pub fn seed_ports(&self) -> Vec<u16> {
        self.seeds.clone()
    }

    /// The ports of the nodes running now (neither stopped nor dead).
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.live())
            .map(|n| n.port)
            .collect()
    }

    /// What the test made of the node on `port`.
    pub fn run(&self, port: u16) -> Run {
        self.node(port).run()
    }

    fn node(&self, port: u16) -> &Proc {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| {
                panic!(
                    "port {port} is no node of this cluster ({:?})",
                    self.ports()
                )
            })
    }

    /// The tail of every node's log.
    pub fn logs(&self) -> String {
        self.nodes.iter().map(|n| n.log_tail(15)).collect()
    }

    /// The first live node, to ask about the cluster.
    fn any_live(&self) -> u16 {
        *self
            .live_ports()
            .first()
            .unwrap_or_else(|| panic!("no node of the cluster is running"))
    }

    /// `CLUSTER NODES` as seen by the node on `port`.
    async fn nodes_view(port: u16) -> Result<Vec<NodeLine>, String> {
        let reply = command(port, &["CLUSTER", "NODES"]).await?;
        Ok(parse_cluster_nodes(reply.text().unwrap_or_default()))
    }

    /// `CLUSTER SLOTS` as seen by the node on `port`: which primary serves which slots.
    async fn slots_view(port: u16) -> Result<SlotMap, String> {
        let reply = command(port, &["CLUSTER", "SLOTS"]).await?;
        let mut map = Vec::new();
        for range in reply.items() {
            let items = range.items();
            let (Some(start), Some(end), Some(port)) = (
                items.first().and_then(Resp::int),
                items.get(1).and_then(Resp::int),
                items
                    .get(2)
                    .and_then(|p| p.items().get(1))
                    .and_then(Resp::int),
            ) else {
                return Err(format!("odd CLUSTER SLOTS entry: {range:?}"));
            };
            map.push((start as u16, end as u16, port as u16));
        }
        map.sort_unstable();
        Ok(map)
    }

    /// The ports of the nodes that are primaries now (as a live node sees it), in start order.
    pub async fn primaries(&self) -> Vec<u16> {
        let view = Self::nodes_view(self.any_live())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.ports()
            .into_iter()
            .filter(|p| {
                view.iter()
                    .any(|n| n.port == *p && n.has("master") && !n.has("fail"))
            })
            .collect()
    }

    /// The ports of the nodes that are replicas now (as a live node sees it), in start order.
    pub async fn replicas(&self) -> Vec<u16> {
        let view = Self::nodes_view(self.any_live())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.ports()
            .into_iter()
            .filter(|p| view.iter().any(|n| n.port == *p && n.has("slave")))
            .collect()
    }

    /// The slot `key` hashes to (`CLUSTER KEYSLOT`).
    pub async fn slot_of(&self, key: &str) -> u16 {
        command(self.any_live(), &["CLUSTER", "KEYSLOT", key])
            .await
            .ok()
            .and_then(|r| r.int())
            .unwrap_or_else(|| panic!("CLUSTER KEYSLOT {key} failed")) as u16
    }

    /// The port of the primary that serves `key` now, as a live node's `CLUSTER SLOTS` says.
    pub async fn primary_for_key(&self, key: &str) -> u16 {
        let slot = self.slot_of(key).await;
        let map = Self::slots_view(self.any_live())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        map.iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, port)| *port)
            .unwrap_or_else(|| panic!("no primary serves slot {slot} ({map:?})"))
    }

    /// The port of a replica of the primary on `primary_port` (one not marked failing, if there
    /// is one), as a live node sees it.
    pub async fn replica_of(&self, primary_port: u16) -> u16 {
        let view = Self::nodes_view(self.any_live())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let id = &view
            .iter()
            .find(|n| n.port == primary_port)
            .unwrap_or_else(|| panic!("port {primary_port} is unknown to the cluster"))
            .id;
        let mut replicas: Vec<&NodeLine> = view
            .iter()
            .filter(|n| n.primary.as_ref() == Some(id))
            .collect();
        replicas.sort_by_key(|n| n.has("fail") || n.has("fail?"));
        replicas
            .first()
            .unwrap_or_else(|| panic!("port {primary_port} has no replica: {view:?}"))
            .port
    }

    /// SIGSTOPs the node on `port`: it keeps its sockets but answers nothing. A stopped primary
    /// is failed over by its replica within a few seconds ([`Cluster::wait_primary_change`]);
    /// continued, it becomes a replica. Mind that [`Cluster::wait_healthy`] right after a stop
    /// returns at once: the live nodes have not noticed anything yet.
    pub fn stop(&self, port: u16) {
        self.node(port).stop();
    }

    /// SIGCONTs the node on `port`.
    pub fn cont(&self, port: u16) {
        self.node(port).cont();
    }

    /// SIGKILLs the node on `port`. A killed primary is failed over by its replica within a few
    /// seconds ([`Cluster::wait_primary_change`]).
    pub fn kill(&self, port: u16) {
        self.node(port).kill();
    }

    /// Starts the killed node on `port` again, with its old identity (from its `nodes-PORT.conf`)
    /// but no data; it rejoins the cluster (as a replica if its slots moved meanwhile). Waits
    /// until it answers, not until the cluster is healthy.
    pub async fn restart(&self, port: u16) {
        let node = self.node(port);
        assert_eq!(
            node.run(),
            Run::Dead,
            "kill port {port} before restarting it"
        );
        node.spawn();
        if let Err(e) = node.wait_ready(&Probe::Ping).await {
            panic!("{e}\n{}", node.log_tail(20));
        }
    }

    /// Makes the replica on `replica_port` the primary of its slots at once
    /// (`CLUSTER FAILOVER TAKEOVER`: no agreement from its primary or the others needed), then
    /// waits until it says `role:master` and every live node's `CLUSTER SLOTS` agrees and gives
    /// it slots. Its old primary, if live, turns into its replica (see
    /// [`Cluster::wait_healthy`] to wait for that one's sync).
    pub async fn failover_takeover(&self, replica_port: u16) {
        if let Err(e) = command(replica_port, &["CLUSTER", "FAILOVER", "TAKEOVER"]).await {
            panic!("CLUSTER FAILOVER TAKEOVER: {e}\n{}", self.logs());
        }
        wait_until(
            &format!("port {replica_port} taking over its slots"),
            || self.logs(),
            move || async move {
                let replication = info(replica_port, "replication").await?;
                if field(&replication, "role") != Some("master") {
                    return Err(format!("port {replica_port} is not role:master yet"));
                }
                let map = self.agreed_slots().await?;
                if !map.iter().any(|(_, _, p)| *p == replica_port) {
                    return Err(format!("port {replica_port} serves no slot yet: {map:?}"));
                }
                Ok(())
            },
        )
        .await
    }

    /// Waits until the slots that the primary on `old` serves now are served by another node,
    /// as every live node agrees, and the cluster is healthy again ([`Cluster::wait_healthy`]);
    /// returns the new primary's port. For after [`Cluster::stop`] or [`Cluster::kill`] of a
    /// primary: its replica takes over on its own within a few seconds.
    pub async fn wait_primary_change(&self, old: u16) -> u16 {
        let slot = wait_until(
            &format!("the slots of port {old}"),
            || self.logs(),
            move || async move {
                let map = match self.agreed_slots().await {
                    Ok(map) => map,
                    // Live nodes may disagree for a moment: one's view will do here.
                    Err(_) => Self::slots_view(self.any_live()).await?,
                };
                Ok(map
                    .iter()
                    .find(|(_, _, p)| *p == old)
                    .map(|(start, _, _)| *start))
            },
        )
        .await
        .unwrap_or_else(|| panic!("port {old} serves no slot"));
        wait_until(
            &format!("another primary for the slots of port {old}"),
            || self.logs(),
            move || async move {
                self.check_healthy().await?;
                let map = self.agreed_slots().await?;
                let owner = map
                    .iter()
                    .find(|(start, end, _)| (*start..=*end).contains(&slot))
                    .map(|(_, _, p)| *p)
                    .ok_or_else(|| format!("no primary serves slot {slot}"))?;
                if owner == old {
                    return Err(format!("port {old} still serves slot {slot}"));
                }
                Ok(owner)
            },
        )
        .await
    }

    /// The slot map, when every live node's `CLUSTER SLOTS` is the same.
    async fn agreed_slots(&self) -> Result<SlotMap, String> {
        let mut agreed: Option<(u16, SlotMap)> = None;
        for port in self.live_ports() {
            let map = Self::slots_view(port).await?;
            match &agreed {
                None => agreed = Some((port, map)),
                Some((first, seen)) if *seen != map => {
                    return Err(format!(
                        "CLUSTER SLOTS differ: port {first} says {seen:?}, port {port} says {map:?}"
                    ));
                }
                Some(_) => {}
            }
        }
        agreed
            .map(|(_, map)| map)
            .ok_or_else(|| "no node is running".into())
    }

    /// Why the cluster is not healthy now, if it is not.
    async fn check_healthy(&self) -> Result<(), String> {
        let live = self.live_ports();
        let mut agreed_roles: Option<(u16, Roles)> = None;
        for &port in &live {
            let cluster_info = command(port, &["CLUSTER", "INFO"]).await?;
            let cluster_info = cluster_info.text().unwrap_or_default();
            if field(cluster_info, "cluster_state") != Some("ok") {
                return Err(format!("port {port}: cluster_state is not ok"));
            }
            if field(cluster_info, "cluster_known_nodes")
                != Some(self.nodes.len().to_string().as_str())
            {
                return Err(format!("port {port} does not know every node yet"));
            }
            if field(cluster_info, "cluster_slots_assigned") != Some(SLOTS.to_string().as_str()) {
                return Err(format!("port {port}: not every slot is assigned"));
            }
            let view = Self::nodes_view(port).await?;
            for node in &view {
                if live.contains(&node.port) && (node.has("fail") || node.has("fail?")) {
                    return Err(format!(
                        "port {port} sees live port {} as failing",
                        node.port
                    ));
                }
            }
            // Who replicates whom, among live nodes: every node must see the same (a node is
            // told it is a replica before the others hear of it).
            let mut roles: Roles = view
                .iter()
                .filter(|n| live.contains(&n.port))
                .map(|n| {
                    let primary = n
                        .primary
                        .as_ref()
                        .map(|id| view.iter().find(|p| &p.id == id).map_or(0, |p| p.port));
                    (n.port, primary)
                })
                .collect();
            roles.sort_unstable();
            match &agreed_roles {
                None => agreed_roles = Some((port, roles)),
                Some((first, seen)) if *seen != roles => {
                    return Err(format!(
                        "roles differ: port {first} sees (node, its primary) {seen:?}, \
                         port {port} sees {roles:?}"
                    ));
                }
                Some(_) => {}
            }
            let replication = info(port, "replication").await?;
            if field(&replication, "role") == Some("slave")
                && field(&replication, "master_link_status") != Some("up")
            {
                return Err(format!("replica {port}: link to its primary is not up"));
            }
        }
        let map = self.agreed_slots().await?;
        let covered: u32 = map.iter().map(|(s, e, _)| u32::from(e - s) + 1).sum();
        if covered != SLOTS {
            return Err(format!("CLUSTER SLOTS covers {covered} slots: {map:?}"));
        }
        Ok(())
    }

    /// Waits until every live node says `cluster_state:ok`, knows every node, sees no live node
    /// failing, sees the same live nodes as replicas of the same primaries and has the same
    /// `CLUSTER SLOTS` covering every slot, and every live replica's link to its primary is up.
    /// Stopped and dead nodes are left out.
    pub async fn wait_healthy(&self) {
        wait_until(
            "the cluster to be healthy",
            || self.logs(),
            move || self.check_healthy(),
        )
        .await
    }

    /// Kills every node at once, without reaping (for the exit hook).
    fn kill_now(&self) {
        for node in &self.nodes {
            let pid = node.pid.load(Ordering::SeqCst);
            if pid > 0 {
                // SAFETY: plain kill(2) of a child of ours.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.kill();
        }
    }
}

static SHARED_CLUSTER: tokio::sync::OnceCell<Cluster> = tokio::sync::OnceCell::const_new();

/// At exit: kills the shared cluster and removes its temp dir (a `static` is never dropped).
extern "C" fn remove_shared_cluster() {
    if let Some(cluster) = SHARED_CLUSTER.get() {
        cluster.kill_now();
        let _ = std::fs::remove_dir_all(cluster.dir.path());
    }
}

/// One cluster for every test of the binary, started by the first caller. For tests that leave it
/// as they found it: one that stops, kills or fails over nodes should start a [`Cluster`] of its
/// own. Its servers die with the binary.
pub async fn shared_cluster() -> &'static Cluster {
    SHARED_CLUSTER
        .get_or_init(|| async {
            let cluster = Cluster::start().await;
            // SAFETY: registers a plain function; it neither panics nor unwinds.
            unsafe { libc::atexit(remove_shared_cluster) };
            cluster
        })
        .await
}

// ---------------------------------------------------------------------------------------------
// Sentinel
// ---------------------------------------------------------------------------------------------

/// A primary and its replica, watched by 3 sentinels (quorum 2) as service `name`.
///
/// Sentinels judge a server down after 1 s (`down-after-milliseconds 1000`), so a primary that is
/// stopped or killed is failed over on its own within a few seconds; `failover-timeout` is 3 s.
/// After a failover the sentinels turn the old primary, once it is reachable, into a replica of
/// the new one, and see it as a replica fit for the next failover, only some 20 s later (see
/// [`SENTINEL_SETTLE`]).
pub struct Sentinel {
    name: String,
    /// The data nodes: the first primary, then the first replica.
    data: Vec<Proc>,
    sentinels: Vec<Proc>,
    dir: TempDir,
}

impl Sentinel {
    /// Starts the primary, its replica (`--replicaof`), waits for the replica's sync, then starts
    /// the sentinels (each with its own config file, which it rewrites) and waits until each of
    /// them sees the primary, the replica and the 2 other sentinels.
    pub async fn start(name: &str) -> Sentinel {
        let dir = temp_dir("authd-sentinel-");
        let path = dir.path().to_owned();
        let primary = Proc::start(
            &path,
            "primary",
            free_port,
            |port| base_args(port, &path),
            |_| Probe::Ping,
        )
        .await;
        let primary_port = primary.port;
        let replica = Proc::start(
            &path,
            "replica",
            free_port,
            |port| {
                let mut args = base_args(port, &path);
                args.extend([
                    "--replicaof".into(),
                    "127.0.0.1".into(),
                    primary_port.to_string(),
                ]);
                args
            },
            |_| Probe::Ping,
        )
        .await;
        let mut topology = Sentinel {
            name: name.to_owned(),
            data: vec![primary, replica],
            sentinels: Vec::new(),
            dir,
        };
        topology.wait_replicated_to(primary_port).await;

        for _ in 0..3 {
            let sentinel = Proc::start(
                &path,
                "sentinel",
                free_port,
                |port| {
                    let conf = path.join(format!("sentinel-{port}.conf"));
                    let text = format!(
                        "port {port}\n\
                         bind 127.0.0.1\n\
                         daemonize no\n\
                         dir \"{dir}\"\n\
                         sentinel monitor {name} 127.0.0.1 {primary_port} 2\n\
                         sentinel down-after-milliseconds {name} {down}\n\
                         sentinel failover-timeout {name} 3000\n\
                         sentinel parallel-syncs {name} 1\n",
                        dir = path_str(&path),
                        down = SENTINEL_DOWN_AFTER.as_millis(),
                    );
                    std::fs::write(&conf, text).expect("write the sentinel config");
                    vec![path_str(&conf), "--sentinel".into()]
                },
                |_| Probe::Ping,
            )
            .await;
            topology.sentinels.push(sentinel);
        }
        topology.wait_healthy().await;
        topology
    }

    /// `redis-sentinel://127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/?service_name=NAME`.
    pub fn url(&self) -> String {
        let sentinels: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!(
            "redis-sentinel://{}/?service_name={}",
            sentinels.join(","),
            self.name
        )
    }

    /// The service name the sentinels watch.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The ports of the two data nodes: the first primary, then the first replica.
    pub fn data_ports(&self) -> Vec<u16> {
        self.data.iter().map(|n| n.port).collect()
    }

    /// The ports of the 3 sentinels.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|n| n.port).collect()
    }

    fn live_sentinels(&self) -> Vec<u16> {
        self.sentinels
            .iter()
            .filter(|n| n.live())
            .map(|n| n.port)
            .collect()
    }

    fn live_data(&self) -> Vec<u16> {
        self.data
            .iter()
            .filter(|n| n.live())
            .map(|n| n.port)
            .collect()
    }

    fn proc(&self, port: u16) -> &Proc {
        self.data
            .iter()
            .chain(&self.sentinels)
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("port {port} is no server of this topology"))
    }

    /// What the test made of the server (data node or sentinel) on `port`.
    pub fn run(&self, port: u16) -> Run {
        self.proc(port).run()
    }

    /// The tail of every server's log.
    pub fn logs(&self) -> String {
        self.data
            .iter()
            .chain(&self.sentinels)
            .map(|n| n.log_tail(15))
            .collect()
    }

    /// The primary's port as the sentinel on `sentinel` says (`SENTINEL get-master-addr-by-name`).
    async fn primary_per(&self, sentinel: u16) -> Result<u16, String> {
        let reply = command(
            sentinel,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.name],
        )
        .await?;
        reply
            .items()
            .get(1)
            .and_then(Resp::text)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("sentinel {sentinel} knows no primary: {reply:?}"))
    }

    /// The primary's port when every live sentinel names the same one.
    async fn agreed_primary(&self) -> Result<u16, String> {
        let mut agreed = None;
        for sentinel in self.live_sentinels() {
            let port = self.primary_per(sentinel).await?;
            match agreed {
                None => agreed = Some(port),
                Some(seen) if seen != port => {
                    return Err(format!("sentinels disagree: {seen} and {port}"));
                }
                Some(_) => {}
            }
        }
        agreed.ok_or_else(|| "no sentinel is running".into())
    }

    /// The primary's port, as the first live sentinel that answers says.
    pub async fn primary_port(&self) -> u16 {
        let mut errors = Vec::new();
        for sentinel in self.live_sentinels() {
            match self.primary_per(sentinel).await {
                Ok(port) => return port,
                Err(e) => errors.push(e),
            }
        }
        panic!("no sentinel named the primary: {errors:?}");
    }

    /// The data node that is not the primary now (live or not).
    pub async fn replica_port(&self) -> u16 {
        let primary = self.primary_port().await;
        self.data_ports()
            .into_iter()
            .find(|p| *p != primary)
            .expect("two data nodes")
    }

    /// SIGSTOPs the server (data node or sentinel) on `port`. A stopped primary is failed over
    /// within a few seconds (see [`Sentinel::wait_primary_change`]).
    pub fn stop(&self, port: u16) {
        self.proc(port).stop();
    }

    /// SIGCONTs the server on `port`.
    pub fn cont(&self, port: u16) {
        self.proc(port).cont();
    }

    /// SIGKILLs the server on `port`.
    pub fn kill(&self, port: u16) {
        self.proc(port).kill();
    }

    /// Starts the killed server on `port` again with its first arguments (a sentinel with its
    /// rewritten config file, so it remembers what it learnt; a data node empty, and the
    /// sentinels turn it into a replica of the current primary some seconds later). Waits until
    /// it answers.
    pub async fn restart(&self, port: u16) {
        let proc = self.proc(port);
        assert_eq!(
            proc.run(),
            Run::Dead,
            "kill port {port} before restarting it"
        );
        proc.spawn();
        if let Err(e) = proc.wait_ready(&Probe::Ping).await {
            panic!("{e}\n{}", proc.log_tail(20));
        }
    }

    /// Forces a failover (`SENTINEL FAILOVER NAME`, retried while a sentinel answers that one is
    /// in progress or that no replica is fit yet), then waits until every live sentinel names the
    /// new primary and it says `role:master` (1 to 2 s). Returns its port. The sentinels turn the
    /// old primary into its replica some 20 s later ([`SENTINEL_SETTLE`]):
    /// [`Sentinel::wait_healthy`] waits for that, and a next failover should wait for it too.
    pub async fn failover(&self) -> u16 {
        let old = self.primary_port().await;
        let name = self.name.clone();
        wait_until_within(
            SENTINEL_SETTLE,
            "SENTINEL FAILOVER to be accepted",
            || self.logs(),
            || {
                let sentinels = self.live_sentinels();
                let name = name.clone();
                async move {
                    let sentinel = *sentinels.first().ok_or("no sentinel is running")?;
                    command(sentinel, &["SENTINEL", "FAILOVER", &name])
                        .await
                        .map(drop)
                }
            },
        )
        .await;
        self.wait_primary_change(old).await
    }

    /// Waits until every live sentinel names the same primary, other than `old`, and that server
    /// says `role:master`. Returns its port.
    pub async fn wait_primary_change(&self, old: u16) -> u16 {
        wait_until(
            &format!("a primary other than {old}"),
            || self.logs(),
            move || async move {
                let primary = self.agreed_primary().await?;
                if primary == old {
                    return Err(format!("the sentinels still name {old}"));
                }
                let replication = info(primary, "replication").await?;
                if field(&replication, "role") != Some("master") {
                    return Err(format!("{primary} is not role:master yet"));
                }
                Ok(primary)
            },
        )
        .await
    }

    /// Why the live replicas are not in sync with `primary`, if they are not: each must say
    /// `master_link_status:up` to that port and have applied all the primary has sent.
    async fn check_replicated_to(&self, primary: u16) -> Result<(), String> {
        let replication = info(primary, "replication").await?;
        if field(&replication, "role") != Some("master") {
            return Err(format!("{primary} is not role:master"));
        }
        for replica in self.live_data().into_iter().filter(|p| *p != primary) {
            let theirs = info(replica, "replication").await?;
            if field(&theirs, "role") != Some("slave")
                || field(&theirs, "master_port") != Some(primary.to_string().as_str())
            {
                return Err(format!("{replica} is not a replica of {primary} yet"));
            }
            if field(&theirs, "master_link_status") != Some("up") {
                return Err(format!("{replica}: link to {primary} is not up"));
            }
            // Offsets are read one after the other; a write in between makes them differ once.
            let ours = info(primary, "replication").await?;
            let sent = field(&ours, "master_repl_offset");
            let applied = field(&theirs, "slave_repl_offset");
            if sent != applied {
                return Err(format!(
                    "{replica} applied offset {applied:?}, {primary} sent {sent:?}"
                ));
            }
        }
        Ok(())
    }

    async fn wait_replicated_to(&self, primary: u16) {
        wait_until(
            &format!("replicas in sync with {primary}"),
            || self.logs(),
            move || self.check_replicated_to(primary),
        )
        .await
    }

    /// Waits until every live data node other than the primary (as the sentinels agree) is its
    /// replica, linked and caught up (up to [`SENTINEL_SETTLE`] after a failover).
    pub async fn wait_replicated(&self) {
        wait_until_within(
            SENTINEL_SETTLE,
            "replicas in sync with the primary",
            || self.logs(),
            move || async move {
                let primary = self.agreed_primary().await?;
                self.check_replicated_to(primary).await
            },
        )
        .await
    }

    /// Why the topology is not ready for a failover now, if it is not.
    async fn check_healthy(&self) -> Result<(), String> {
        let primary = self.agreed_primary().await?;
        self.check_replicated_to(primary).await?;
        let live_sentinels = self.live_sentinels();
        let replicas: Vec<u16> = self
            .live_data()
            .into_iter()
            .filter(|p| *p != primary)
            .collect();
        for &sentinel in &live_sentinels {
            let master = command(sentinel, &["SENTINEL", "MASTER", &self.name]).await?;
            if master.get("flags").as_deref() != Some("master") {
                return Err(format!(
                    "sentinel {sentinel}: primary flags {:?}",
                    master.get("flags")
                ));
            }
            let others: usize = master
                .get("num-other-sentinels")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if others + 1 < live_sentinels.len() {
                return Err(format!(
                    "sentinel {sentinel} knows {others} other sentinels"
                ));
            }
            let known = command(sentinel, &["SENTINEL", "REPLICAS", &self.name]).await?;
            for replica in &replicas {
                let fit = known.items().iter().any(|r| {
                    r.get("port") == Some(replica.to_string())
                        && r.get("flags").as_deref() == Some("slave")
                        && r.get("master-link-status").as_deref() == Some("ok")
                });
                if !fit {
                    return Err(format!(
                        "sentinel {sentinel} does not see replica {replica} fit yet"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Waits until every live sentinel names the same primary, sees it as up, knows the other
    /// live sentinels and sees every live replica up and linked, and those replicas are caught up:
    /// the state in which a failover can be made. Takes up to [`SENTINEL_SETTLE`] after a
    /// failover.
    pub async fn wait_healthy(&self) {
        wait_until_within(
            SENTINEL_SETTLE,
            "the sentinel topology to be healthy",
            || self.logs(),
            move || self.check_healthy(),
        )
        .await
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        for proc in self.sentinels.iter().chain(&self.data) {
            proc.kill();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// Certificates for TLS tests, minted with rcgen (ECDSA P-256) and written as PEM files in a temp
/// dir of their own:
///
/// - `ca_*`: a CA;
/// - `server_*`: a server certificate for `localhost` and `127.0.0.1`, signed by the CA;
/// - `client_*`: a client certificate signed by the CA, with the SANs given to
///   [`Certs::with_client`] (by default DNS [`Certs::CLIENT_DNS`] and URI [`Certs::CLIENT_URI`]);
/// - `other_ca_*`: an unrelated CA (the "wrong CA"), which signed none of them.
///
/// [`Certs::client`] and [`Certs::other_client`] mint more client certificates.
pub struct Certs {
    pub ca_file: PathBuf,
    pub ca_pem: String,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    pub other_ca_file: PathBuf,
    pub other_ca_pem: String,
    ca: Issuer<'static, KeyPair>,
    other_ca: Issuer<'static, KeyPair>,
    minted: AtomicUsize,
    dir: TempDir,
}

/// A self-signed CA: its certificate's PEM and what signs with it.
fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "authd tests");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 12, 31);
    let key = KeyPair::generate().expect("generate a key");
    let cert = params.self_signed(&key).expect("self-sign the CA");
    (cert.pem(), Issuer::new(params, key))
}

/// A certificate signed by `issuer`: its PEM and its key's PEM (PKCS#8).
fn new_leaf(
    issuer: &Issuer<'static, KeyPair>,
    common_name: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 12, 31);
    let key = KeyPair::generate().expect("generate a key");
    let cert = params
        .signed_by(&key, issuer)
        .expect("sign the certificate");
    (cert.pem(), key.serialize_pem())
}

fn client_sans(dns: &[&str], uris: &[&str]) -> Vec<SanType> {
    let dns = dns
        .iter()
        .map(|d| SanType::DnsName((*d).try_into().expect("a DNS name in ASCII")));
    let uris = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("a URI in ASCII")));
    dns.chain(uris).collect()
}

impl Certs {
    /// The client certificate's DNS SAN by default.
    pub const CLIENT_DNS: &str = "client.example.org";
    /// The client certificate's URI SAN by default.
    pub const CLIENT_URI: &str = "spiffe://example.org/ns/a/sa/b";

    /// A CA, a server certificate, a client certificate with DNS SAN [`Certs::CLIENT_DNS`] and
    /// URI SAN [`Certs::CLIENT_URI`], and a wrong CA.
    pub fn new() -> Certs {
        Self::with_client(&[Self::CLIENT_DNS], &[Self::CLIENT_URI])
    }

    /// As [`Certs::new`], the client certificate with these DNS and URI SANs (either may be
    /// empty).
    pub fn with_client(dns: &[&str], uris: &[&str]) -> Certs {
        let dir = temp_dir("authd-certs-");
        let write = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write a PEM file");
            path
        };
        let (ca_pem, ca) = new_ca("authd test CA");
        let (other_ca_pem, other_ca) = new_ca("authd test wrong CA");
        let (server_cert_pem, server_key_pem) = new_leaf(
            &ca,
            "localhost",
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert_pem, client_key_pem) = new_leaf(
            &ca,
            dns.first().copied().unwrap_or("authd test client"),
            client_sans(dns, uris),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Certs {
            ca_file: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server_cert_pem),
            server_key: write("server-key.pem", &server_key_pem),
            client_cert: write("client.pem", &client_cert_pem),
            client_key: write("client-key.pem", &client_key_pem),
            other_ca_file: write("other-ca.pem", &other_ca_pem),
            ca_pem,
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
            other_ca_pem,
            ca,
            other_ca,
            minted: AtomicUsize::new(0),
            dir,
        }
    }

    /// The temp dir the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a minted certificate and key, returning their paths.
    fn write_pair(&self, kind: &str, (cert, key): (String, String)) -> (PathBuf, PathBuf) {
        let n = self.minted.fetch_add(1, Ordering::SeqCst);
        let cert_path = self.dir.path().join(format!("{kind}-{n}.pem"));
        let key_path = self.dir.path().join(format!("{kind}-{n}-key.pem"));
        std::fs::write(&cert_path, cert).expect("write a PEM file");
        std::fs::write(&key_path, key).expect("write a PEM file");
        (cert_path, key_path)
    }

    /// A new client certificate and key (PEM), signed by the CA, with these DNS and URI SANs; its
    /// common name is the first DNS name, if any.
    pub fn client_pem(&self, dns: &[&str], uris: &[&str]) -> (String, String) {
        new_leaf(
            &self.ca,
            dns.first().copied().unwrap_or("authd test client"),
            client_sans(dns, uris),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// As [`Certs::client_pem`], written to files: `(cert_path, key_path)`.
    pub fn client(&self, dns: &[&str], uris: &[&str]) -> (PathBuf, PathBuf) {
        self.write_pair("client", self.client_pem(dns, uris))
    }

    /// A client certificate like [`Certs::client`]'s but signed by the wrong CA.
    pub fn other_client(&self, dns: &[&str], uris: &[&str]) -> (PathBuf, PathBuf) {
        let pair = new_leaf(
            &self.other_ca,
            dns.first().copied().unwrap_or("authd test client"),
            client_sans(dns, uris),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        self.write_pair("other-client", pair)
    }

    /// A server certificate for `localhost` and `127.0.0.1` signed by the wrong CA, for a server
    /// that clients trusting [`Certs::ca_file`] must refuse: `(cert_path, key_path)`.
    pub fn other_server(&self) -> (PathBuf, PathBuf) {
        let pair = new_leaf(
            &self.other_ca,
            "localhost",
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        self.write_pair("other-server", pair)
    }
}

/// How a [`TlsRedis`] is set up beyond TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// `--tls-auth-clients yes` (a client must present a certificate signed by the CA) rather than
    /// `optional` (one it presents is checked, none is fine).
    pub require_client_cert: bool,
    /// `--requirepass`: the `default` user's password.
    pub requirepass: Option<String>,
    /// ACL users `(name, password)`, each `on >PASSWORD ~* &* +@all`.
    pub users: Vec<(String, String)>,
    /// `user default off`: only the ACL users may do anything.
    pub disable_default_user: bool,
    /// The server's certificate and key instead of [`Certs::server_cert`] (e.g.
    /// [`Certs::other_server`]).
    pub server_cert: Option<(PathBuf, PathBuf)>,
    /// More `redis-server` arguments.
    pub extra: Vec<String>,
}

/// A redis-server that speaks only TLS (`--port 0 --tls-port P`), with the [`Certs`] it was started
/// with: the server certificate, and the CA to check client certificates against.
pub struct TlsRedis {
    pub port: u16,
    ca_file: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    proc: Proc,
    dir: TempDir,
}

impl TlsRedis {
    /// A TLS server that requires a client certificate (`require_client_cert`) or takes one if
    /// given, without passwords.
    pub async fn start(certs: &Certs, require_client_cert: bool) -> TlsRedis {
        Self::start_with(
            certs,
            TlsOptions {
                require_client_cert,
                ..TlsOptions::default()
            },
        )
        .await
    }

    /// A TLS server set up as `options` say. Ready once `redis-cli --tls` (with the CA and the
    /// client certificate) gets PONG, or NOAUTH.
    pub async fn start_with(certs: &Certs, options: TlsOptions) -> TlsRedis {
        let dir = temp_dir("authd-tls-redis-");
        let path = dir.path().to_owned();
        let (cert, key) = options
            .server_cert
            .clone()
            .unwrap_or_else(|| (certs.server_cert.clone(), certs.server_key.clone()));
        let args = |port: u16| {
            let mut args: Vec<String> = [
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--tls-cert-file",
                &path_str(&cert),
                "--tls-key-file",
                &path_str(&key),
                "--tls-ca-cert-file",
                &path_str(&certs.ca_file),
                "--tls-auth-clients",
                if options.require_client_cert {
                    "yes"
                } else {
                    "optional"
                },
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &path_str(&path),
            ]
            .map(str::to_owned)
            .to_vec();
            if let Some(password) = &options.requirepass {
                args.extend(["--requirepass".to_owned(), password.clone()]);
            }
            for (user, password) in &options.users {
                args.extend(
                    [
                        "--user",
                        user,
                        "on",
                        &format!(">{password}"),
                        "~*",
                        "&*",
                        "+@all",
                    ]
                    .map(str::to_owned),
                );
            }
            if options.disable_default_user {
                args.extend(["--user", "default", "off"].map(str::to_owned));
            }
            args.extend(options.extra.iter().cloned());
            args
        };
        // A server certificate from elsewhere need not chain to the CA: skip checking it then.
        let trust = match options.server_cert {
            None => vec!["--cacert".to_owned(), path_str(&certs.ca_file)],
            Some(_) => vec!["--insecure".to_owned()],
        };
        let probe = |port: u16| {
            let mut cli = vec!["--tls".to_owned()];
            cli.extend(trust.iter().cloned());
            cli.extend(
                [
                    "--cert",
                    &path_str(&certs.client_cert),
                    "--key",
                    &path_str(&certs.client_key),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "ping",
                ]
                .map(str::to_owned),
            );
            Probe::Cli(cli)
        };
        let proc = Proc::start(&path, "tls-redis", free_port, args, probe).await;
        TlsRedis {
            port: proc.port,
            ca_file: certs.ca_file.clone(),
            client_cert: certs.client_cert.clone(),
            client_key: certs.client_key.clone(),
            proc,
            dir,
        }
    }

    /// `rediss://127.0.0.1:P`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Runs `redis-cli --tls --cacert CA --cert CLIENT --key CLIENT_KEY -h 127.0.0.1 -p P` then
    /// `args` (which may start with more options, e.g. `--user NAME --pass PW`).
    pub async fn cli(&self, args: &[&str]) -> Output {
        let port = self.port.to_string();
        let (ca, cert, key) = (
            path_str(&self.ca_file),
            path_str(&self.client_cert),
            path_str(&self.client_key),
        );
        let mut all = vec![
            "--tls",
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "-h",
            "127.0.0.1",
            "-p",
            &port,
        ];
        all.extend_from_slice(args);
        redis_cli(&all).await
    }

    /// The tail of the server's log.
    pub fn logs(&self) -> String {
        self.proc.log_tail(30)
    }

    /// SIGKILLs the server.
    pub fn kill(&self) {
        self.proc.kill();
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Smoke tests of the helpers themselves
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn topology_cluster_routes_fails_over_and_heals() {
    let cluster = Cluster::start().await;
    let url = cluster.url();
    assert!(url.starts_with("redis-cluster://127.0.0.1:"), "{url}");
    assert_eq!(url.matches(',').count(), 2, "{url}");
    assert_eq!(cluster.ports().len(), 6);
    let seed = cluster.seed_ports()[0].to_string();

    // redis-cli -c follows MOVED to whichever primary serves the key.
    let set = redis_cli(&["-c", "-p", &seed, "SET", "topology:key", "v1"]).await;
    assert_eq!(stdout(&set), "OK", "{}", outputs(&set));
    let got = redis_cli(&["-c", "-p", &seed, "GET", "topology:key"]).await;
    assert_eq!(stdout(&got), "v1", "{}", outputs(&got));

    let primary = cluster.primary_for_key("topology:key").await;
    let replica = cluster.replica_of(primary).await;
    assert_ne!(primary, replica);
    assert!(cluster.primaries().await.contains(&primary));
    assert!(cluster.replicas().await.contains(&replica));
    // Make sure the replica has the key before it takes over.
    let replies = pipeline(
        primary,
        &[&["SET", "topology:key", "v2"], &["WAIT", "1", "5000"]],
    )
    .await
    .unwrap();
    assert_eq!(replies[1], Resp::Int(1), "{replies:?}");

    cluster.failover_takeover(replica).await;
    assert_eq!(cluster.primary_for_key("topology:key").await, replica);
    cluster.wait_healthy().await;
    // The old primary is now the new one's replica.
    assert_eq!(cluster.replica_of(replica).await, primary);
    let got = redis_cli(&["-c", "-p", &seed, "GET", "topology:key"]).await;
    assert_eq!(stdout(&got), "v2", "{}", outputs(&got));

    // A primary stopped past the node timeout is failed over by its replica on its own, and
    // rejoins as a replica once continued.
    let other = *cluster
        .primaries()
        .await
        .iter()
        .find(|p| **p != replica)
        .unwrap();
    let its_replica = cluster.replica_of(other).await;
    cluster.stop(other);
    assert_eq!(cluster.wait_primary_change(other).await, its_replica);
    assert!(cluster.primaries().await.contains(&its_replica));
    cluster.cont(other);
    cluster.wait_healthy().await;
    assert_eq!(cluster.replica_of(its_replica).await, other);

    // A replica (the old primary, `primary`) stopped past the node timeout is marked failing, and
    // healthy again once continued; a killed one rejoins when restarted.
    cluster.stop(primary);
    sleep(CLUSTER_NODE_TIMEOUT * 3).await;
    assert_eq!(cluster.run(primary), Run::Stopped);
    cluster.cont(primary);
    cluster.wait_healthy().await;
    cluster.kill(primary);
    assert_eq!(cluster.live_ports().len(), 5);
    cluster.wait_healthy().await;
    cluster.restart(primary).await;
    cluster.wait_healthy().await;
    assert_eq!(cluster.replica_of(replica).await, primary);
}

#[tokio::test]
async fn topology_shared_cluster_is_one() {
    let first = shared_cluster().await;
    let second = shared_cluster().await;
    assert!(std::ptr::eq(first, second));
    let port = first.seed_ports()[1].to_string();
    let set = redis_cli(&["-c", "-p", &port, "SET", "topology:shared", "yes"]).await;
    assert_eq!(stdout(&set), "OK", "{}", outputs(&set));
    let owner = first.primary_for_key("topology:shared").await;
    let got = command(owner, &["GET", "topology:shared"]).await.unwrap();
    assert_eq!(got.text(), Some("yes"));
}

#[tokio::test]
async fn topology_sentinel_fails_over() {
    let sentinel = Sentinel::start("authd").await;
    let url = sentinel.url();
    assert!(url.starts_with("redis-sentinel://127.0.0.1:"), "{url}");
    assert!(url.ends_with("/?service_name=authd"), "{url}");
    assert_eq!(url.matches(',').count(), 2, "{url}");

    let [first, second] = sentinel.data_ports()[..] else {
        panic!("two data nodes")
    };
    assert_eq!(sentinel.primary_port().await, first);
    assert_eq!(sentinel.replica_port().await, second);
    let replies = pipeline(
        first,
        &[&["SET", "topology:key", "v1"], &["WAIT", "1", "5000"]],
    )
    .await
    .unwrap();
    assert_eq!(replies[1], Resp::Int(1), "{replies:?}");

    let promoted = sentinel.failover().await;
    assert_eq!(promoted, second);
    assert_eq!(sentinel.primary_port().await, second);
    let role = redis_cli(&["-p", &second.to_string(), "ROLE"]).await;
    assert!(stdout(&role).starts_with("master"), "{}", outputs(&role));
    let got = redis_cli(&["-p", &second.to_string(), "GET", "topology:key"]).await;
    assert_eq!(stdout(&got), "v1");

    sentinel.wait_healthy().await;
    assert_eq!(sentinel.replica_port().await, first);
    let role = redis_cli(&["-p", &first.to_string(), "ROLE"]).await;
    assert!(stdout(&role).starts_with("slave"), "{}", outputs(&role));

    // A killed primary is failed over on its own.
    sentinel.kill(second);
    assert_eq!(sentinel.wait_primary_change(second).await, first);
}

#[tokio::test]
async fn topology_tls_redis_checks_certificates_and_users() {
    let certs = Certs::new();
    let ca = path_str(&certs.ca_file);
    let other_ca = path_str(&certs.other_ca_file);

    // The client certificate carries the SANs asked for and chains to the CA only.
    let verify = |ca: &str, cert: &Path| {
        Command::new("openssl")
            .args(["verify", "-CAfile", ca, &path_str(cert)])
            .output()
            .map(|o| o.status.success())
    };
    if let Ok(ok) = verify(&ca, &certs.client_cert) {
        assert!(ok, "the client certificate chains to the CA");
        assert!(!verify(&other_ca, &certs.client_cert).unwrap());
        assert!(verify(&ca, &certs.server_cert).unwrap());
        let text = Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-text",
                "-in",
                &path_str(&certs.client_cert),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains("DNS:client.example.org"), "{text}");
        assert!(
            text.contains("URI:spiffe://example.org/ns/a/sa/b"),
            "{text}"
        );
    }

    let redis = TlsRedis::start(&certs, true).await;
    assert_eq!(redis.url(), format!("rediss://127.0.0.1:{}", redis.port));
    let port = redis.port.to_string();
    let pong = redis.cli(&["PING"]).await;
    assert_eq!(stdout(&pong), "PONG", "{}", outputs(&pong));

    // Without a client certificate, with one from the wrong CA, or trusting the wrong CA: no.
    let bare = redis_cli(&["--tls", "--cacert", &ca, "-p", &port, "PING"]).await;
    assert_ne!(stdout(&bare), "PONG", "{}", outputs(&bare));
    let (cert, key) = certs.other_client(&["intruder.example.org"], &[]);
    let wrong = redis_cli(&[
        "--tls",
        "--cacert",
        &ca,
        "--cert",
        &path_str(&cert),
        "--key",
        &path_str(&key),
        "-p",
        &port,
        "PING",
    ])
    .await;
    assert_ne!(stdout(&wrong), "PONG", "{}", outputs(&wrong));
    let distrust = redis_cli(&[
        "--tls",
        "--cacert",
        &other_ca,
        "--cert",
        &path_str(&certs.client_cert),
        "--key",
        &path_str(&certs.client_key),
        "-p",
        &port,
        "PING",
    ])
    .await;
    assert_ne!(stdout(&distrust), "PONG", "{}", outputs(&distrust));
    // A freshly minted client certificate is fine.
    let (cert, key) = certs.client(&[], &["spiffe://example.org/ns/x/sa/y"]);
    let minted = redis_cli(&[
        "--tls",
        "--cacert",
        &ca,
        "--cert",
        &path_str(&cert),
        "--key",
        &path_str(&key),
        "-p",
        &port,
        "PING",
    ])
    .await;
    assert_eq!(stdout(&minted), "PONG", "{}", outputs(&minted));

    // Client certificates optional; only the ACL user may do anything.
    let acl = TlsRedis::start_with(
        &certs,
        TlsOptions {
            users: vec![("alice".into(), "secret".into())],
            disable_default_user: true,
            ..TlsOptions::default()
        },
    )
    .await;
    let port = acl.port.to_string();
    let bare = redis_cli(&["--tls", "--cacert", &ca, "-p", &port, "PING"]).await;
    assert!(stdout(&bare).contains("NOAUTH"), "{}", outputs(&bare));
    let alice = redis_cli(&[
        "--tls",
        "--cacert",
        &ca,
        "-p",
        &port,
        "--user",
        "alice",
        "--pass",
        "secret",
        "--no-auth-warning",
        "PING",
    ])
    .await;
    assert_eq!(stdout(&alice), "PONG", "{}", outputs(&alice));
    let bad = acl
        .cli(&[
            "--user",
            "alice",
            "--pass",
            "wrong",
            "--no-auth-warning",
            "PING",
        ])
        .await;
    let said = format!("{}{}", stdout(&bad), String::from_utf8_lossy(&bad.stderr));
    assert!(said.contains("WRONGPASS"), "{}", outputs(&bad));
}
