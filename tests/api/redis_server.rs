//! A redis-server of the test's own, which it may kill, restart (empty, or from a snapshot it
//! saved) and configure.
use std::{
    net::SocketAddr,
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

pub use crate::topology::free_port;

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
