//! A redis-server of the test's own, which it may kill, restart (empty, or from a snapshot it
//! saved) and configure.
use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Where `SAVE` (or a replica's sync) writes its snapshot, and a restart loads it from when
    /// persistent; never the working directory.
    dir: PathBuf,
    persistent: bool,
    extra: Vec<String>,
}

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

impl RedisServer {
    /// A server that keeps nothing on disk.
    pub async fn start() -> Self {
        Self::start_with(false, &[]).await
    }

    /// A server that snapshots to a directory of its own on `SAVE` and loads the snapshot when
    /// restarted.
    pub async fn start_persistent() -> Self {
        Self::start_with(true, &[]).await
    }

    /// `extra`: more `redis-server` arguments, e.g. `["--maxmemory", "2mb"]`.
    pub async fn start_with(persistent: bool, extra: &[&str]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("authd-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self {
            port,
            child: None,
            dir,
            persistent,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// (Re)starts the server on the same port — empty, or from the last snapshot when
    /// persistent — and waits until it accepts connections.
    pub async fn restart(&mut self) {
        self.kill();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", "no", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--dbfilename", "dump.rdb"]);
        if !self.persistent {
            let _ = std::fs::remove_file(self.dir.join("dump.rdb"));
        }
        let child = command
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                // The port answers: ours, unless our server exited (could not bind) and a
                // stranger holds the port.
                let exited = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                assert!(
                    exited.is_none(),
                    "redis-server on port {} exited: {exited:?}; the port is someone else's",
                    self.port
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
