//! Server processes: ports, processes tied to the test binary, their arguments and logs.
#![allow(dead_code)]

use super::*;

/// A port nobody listens on now, below the kernel's ephemeral range (32768 and up here), and so
/// is its cluster bus port (+10000). Servers the tests restart on the same port need it: a port
/// the OS hands out for `bind(0)` can be taken by another test's server (or by any socket bound
/// to port 0) while ours is down, and the restart would then reach a stranger. Ports come from
/// a counter of this process over 12000..22000, starting at an offset of the process's own.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 12_000;
    const SPAN: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// A free port for a cluster node: below 55535 and with its bus port (port + 10000) free too,
/// neither among `taken` (which gets both).
pub(crate) fn cluster_port(taken: &mut HashSet<u16>) -> u16 {
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
pub(crate) fn spawn_tied(mut command: Command) -> io::Result<Child> {
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
pub(crate) enum Probe {
    /// It answers PING on its plain port (with anything, even NOAUTH).
    Ping,
    /// `redis-cli` with these arguments prints PONG (or NOAUTH).
    Cli(Vec<String>),
}

/// One `redis-server` (or sentinel) process, which may be stopped, continued, killed and started
/// again with the same arguments.
pub(crate) struct Proc {
    pub(crate) port: u16,
    pub(crate) args: Vec<String>,
    pub(crate) log: PathBuf,
    /// The child's pid while it runs (0 otherwise), for the exit hook that may not lock.
    pub(crate) pid: AtomicI32,
    pub(crate) state: Mutex<(Option<Child>, Run)>,
}

impl Proc {
    pub(crate) fn new(port: u16, args: Vec<String>, log: PathBuf) -> Self {
        Self {
            port,
            args,
            log,
            pid: AtomicI32::new(0),
            state: Mutex::new((None, Run::Dead)),
        }
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, (Option<Child>, Run)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the process (its output appended to its log file).
    pub(crate) fn spawn(&self) {
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
    pub(crate) fn run(&self) -> Run {
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

    pub(crate) fn live(&self) -> bool {
        self.run() == Run::Running
    }

    pub(crate) fn signal(&self, signal: libc::c_int, then: Run) {
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

    pub(crate) fn stop(&self) {
        self.signal(libc::SIGSTOP, Run::Stopped);
    }

    pub(crate) fn cont(&self) {
        self.signal(libc::SIGCONT, Run::Running);
    }

    /// SIGKILL, and reaps it. Nothing if it is not running.
    pub(crate) fn kill(&self) {
        let mut state = self.state();
        if let Some(mut child) = state.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        state.1 = Run::Dead;
        self.pid.store(0, Ordering::SeqCst);
    }

    /// The last `lines` lines of its log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!(
            "--- {} (last {lines} lines) ---\n{tail}\n",
            self.log.display()
        )
    }

    /// Waits (at most 10 s) until it answers `probe`; `Err` if it exits or never does.
    pub(crate) async fn wait_ready(&self, probe: &Probe) -> Result<(), String> {
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
    pub(crate) async fn start(
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

pub(crate) fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temp dir")
}

pub(crate) fn path_str(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_owned()
}

/// Arguments every data node gets: loopback only, nothing on disk but what it must keep in `dir`,
/// and replicas synced at once (7.0 waits 5 s for more replicas before a diskless sync).
pub(crate) fn base_args(port: u16, dir: &Path) -> Vec<String> {
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
