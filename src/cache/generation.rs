//! Generations: which history of the Redis data a value belongs to.
//!
//! The identity of a Redis server's data is its run id (new on every start, so also on every
//! restore from a snapshot) and its replication id (new on every promotion of a replica, and
//! taken from the new primary by every node that resynchronises). The [`Fingerprint`] of a
//! deployment is the set of these identities over every primary the pool is connected to; the job
//! in `jobs.rs` binds each fingerprint to a generation number in PostgreSQL (monotonic, shared by
//! every instance), and [`Redis::adopt`] makes it the one whose copies are served.
//!
//! fred broadcasts a reconnection (and a cluster topology change) *before* it sends anything on the
//! new connection. A [`Latch`] holds a subscription to both: once either has fired, every read
//! distrusts what it got until the generation job has re-established a generation, so a reply from
//! a restarted, restored or newly promoted server is never taken for the old one, however quickly
//! it comes.
use std::sync::{Arc, RwLock};

use fred::{
    clients::Client,
    interfaces::{ClientLike, EventInterface},
    types::{ClusterStateChange, InfoKind, config::Server},
};
use tokio::sync::{Notify, broadcast};

use super::Redis;

/// The identities of the Redis primaries behind the pool, sorted: `run_id/replid,…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(pub String);

pub(super) struct Latch {
    reconnect: RwLock<broadcast::Receiver<Server>>,
    cluster: RwLock<broadcast::Receiver<Vec<ClusterStateChange>>>,
}

impl Latch {
    /// Subscribes to `client`'s events, and wakes `changed` on each.
    pub(super) fn new(client: &Client, changed: &Arc<Notify>) -> Self {
        let wake = changed.clone();
        client.on_reconnect(move |_| {
            wake.notify_one();
            async { Ok(()) }
        });
        let wake = changed.clone();
        client.on_cluster_change(move |_| {
            wake.notify_one();
            async { Ok(()) }
        });
        Self {
            reconnect: RwLock::new(client.reconnect_rx()),
            cluster: RwLock::new(client.cluster_change_rx()),
        }
    }

    /// Whether the client reconnected or saw its topology change since the last [`Latch::reset`].
    pub(super) fn tripped(&self) -> bool {
        let pending = |len: usize| len > 0;
        self.reconnect.read().map_or(true, |r| pending(r.len()))
            || self.cluster.read().map_or(true, |r| pending(r.len()))
    }

    fn reset(&self) {
        if let Ok(mut r) = self.reconnect.write() {
            *r = r.resubscribe();
        }
        if let Ok(mut r) = self.cluster.write() {
            *r = r.resubscribe();
        }
    }
}

/// `run_id/master_replid` of the server answering `client` (or the node it is addressed to).
async fn identity(client: &impl ClientLike) -> Result<String, fred::error::Error> {
    let server: String = client.info(Some(InfoKind::Server)).await?;
    let replication: String = client.info(Some(InfoKind::Replication)).await?;
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let run_id = field(&server, "run_id");
    let replid = field(&replication, "master_replid");
    if run_id.is_empty() {
        return Err(fred::error::Error::new(
            fred::error::ErrorKind::Protocol,
            "INFO did not report a run_id",
        ));
    }
    Ok(format!("{run_id}/{replid}"))
}

impl Redis {
    /// Whether the generation job has work: none established, or an event since.
    pub fn needs_generation(&self) -> bool {
        self.inner().is_some_and(|i| {
            i.generation.load(std::sync::atomic::Ordering::SeqCst) == 0
                || i.latches.iter().any(Latch::tripped)
        })
    }

    /// Waits for the next reconnection or topology change (or a read that found none
    /// established). Never returns when Redis is disabled.
    pub async fn changed(&self) {
        match self.inner() {
            Some(inner) => inner.changed.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Test hook: runs each time the generation job is about to react to an event (before it
    /// stops serving copies), to hold it there deterministically. Only the first call takes
    /// effect.
    #[doc(hidden)]
    pub fn set_establish_hook(&self, hook: super::Hook) {
        if let Some(inner) = self.inner() {
            let _ = inner.establish_hook.set(hook);
        }
    }

    /// Stops serving copies and forgets the events seen so far: the caller is about to read the
    /// fingerprint and establish a generation for it. Events after this keep copies unserved until
    /// the next establishment.
    pub async fn begin_establishing(&self) {
        if let Some(inner) = self.inner() {
            if let Some(hook) = inner.establish_hook.get() {
                hook().await;
            }
            inner
                .generation
                .store(0, std::sync::atomic::Ordering::SeqCst);
            inner.latches.iter().for_each(Latch::reset);
        }
    }

    /// Serves copies of `generation`, established for `fingerprint`, from now on (unless an
    /// event arrived meanwhile).
    pub fn adopt(&self, generation: u64, fingerprint: Fingerprint) {
        if let Some(inner) = self.inner() {
            *inner.fingerprint.lock().unwrap_or_else(|e| e.into_inner()) = Some(fingerprint);
            let previous = inner
                .generation
                .swap(generation, std::sync::atomic::Ordering::SeqCst);
            if previous != generation {
                tracing::info!(generation, "redis generation established");
            }
        }
    }

    /// The identity the current generation was established for.
    pub fn established(&self) -> Option<Fingerprint> {
        let inner = self.inner()?;
        if inner.generation.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return None;
        }
        inner
            .fingerprint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The identities of every primary behind the pool.
    pub async fn fingerprint(&self) -> Result<Fingerprint, fred::error::Error> {
        let Some(inner) = self.inner() else {
            return Ok(Fingerprint(String::new()));
        };
        let mut ids = Vec::new();
        for client in inner.pool.clients() {
            if client.is_clustered() {
                for server in client.active_connections() {
                    let node = client.with_cluster_node(server);
                    ids.push(self.observe(identity(&node).await).ok_or_else(down)?);
                }
            } else {
                ids.push(self.observe(identity(client).await).ok_or_else(down)?);
            }
        }
        ids.sort();
        ids.dedup();
        Ok(Fingerprint(ids.join(",")))
    }
}

fn down() -> fred::error::Error {
    fred::error::Error::new(fred::error::ErrorKind::IO, "redis did not answer INFO")
}
