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

mod cluster;
mod process;
mod sentinel;
#[cfg(test)]
mod smoke;
mod talk;
mod tls;

pub use cluster::*;
pub use process::*;
pub use sentinel::*;
pub use talk::*;
#[allow(unused_imports)] // the fault run has no TLS
pub use tls::*;

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
pub(crate) const POLL: Duration = Duration::from_millis(100);
/// How long one command to a server may take (a stopped server never answers).
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one `redis-cli` run may take, unless said otherwise.
pub(crate) const CLI_TIMEOUT: Duration = Duration::from_secs(10);
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
pub(crate) const SLOTS: u32 = 16384;
