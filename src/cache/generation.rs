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

/// What one INFO of a primary tells.
#[derive(Debug, Default)]
struct NodeInfo {
    /// `run_id/master_replid`.
    identity: String,
    used_memory: i64,
    maxmemory: i64,
    maxmemory_policy: String,
    evicted_keys: i64,
    connected_clients: i64,
}

/// One INFO (all default sections) of the server answering `client`, or the node it is addressed
/// to.
async fn node_info(client: &impl ClientLike) -> Result<NodeInfo, fred::error::Error> {
    let text: String = client.info(None::<InfoKind>).await?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let number = |name: &str| field(name).parse::<i64>().unwrap_or(0);
    let run_id = field("run_id");
    if run_id.is_empty() {
        return Err(fred::error::Error::new(
            fred::error::ErrorKind::Protocol,
            "INFO did not report a run_id",
        ));
    }
    Ok(NodeInfo {
        identity: format!("{run_id}/{}", field("master_replid")),
        used_memory: number("used_memory"),
        maxmemory: number("maxmemory"),
        maxmemory_policy: field("maxmemory_policy"),
        evicted_keys: number("evicted_keys"),
        connected_clients: number("connected_clients"),
    })
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
            self.metrics.redis_generation.set(0);
            inner.latches.iter().for_each(Latch::reset);
        }
    }

    /// Serves copies of `generation`, established for `fingerprint`, from now on (unless an
    /// event arrived meanwhile).
    pub fn adopt(&self, generation: u64, fingerprint: Fingerprint) {
        if let Some(inner) = self.inner() {
            *inner.fingerprint.lock().unwrap_or_else(|e| e.into_inner()) = Some(fingerprint);
            inner
                .generation
                .store(generation, std::sync::atomic::Ordering::SeqCst);
            let previous = inner
                .last_generation
                .swap(generation, std::sync::atomic::Ordering::SeqCst);
            self.metrics
                .redis_generation
                .set(i64::try_from(generation).unwrap_or(i64::MAX));
            if previous != generation {
                if previous != 0 {
                    self.metrics.redis_generation_changes.inc();
                    tracing::warn!(
                        generation,
                        "redis restarted, was restored or failed over: a new generation of cached \
                         data starts (the cache is cold)"
                    );
                } else {
                    tracing::info!(generation, "redis generation established");
                }
            }
        }
    }

    /// The generation last established and its identity, whether or not it is served now.
    pub fn established_any(&self) -> Option<(u64, Fingerprint)> {
        let inner = self.inner()?;
        let generation = inner
            .last_generation
            .load(std::sync::atomic::Ordering::SeqCst);
        let fingerprint = inner
            .fingerprint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        (generation != 0).then_some((generation, fingerprint))
    }

    /// Says, once a minute at most, why no generation can be established: without one the
    /// cache is not used at all.
    pub fn explain_identity_failure(&self, error: &fred::error::Error) {
        let Some(inner) = self.inner() else {
            return;
        };
        let now = super::monotonic_ms(std::time::Instant::now());
        let last = inner
            .identity_warned
            .load(std::sync::atomic::Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < 60_000 {
            return;
        }
        inner
            .identity_warned
            .store(now.max(1), std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            %error,
            "cannot read the identity of the redis servers (INFO); the cache is not used until \
             it can (an ACL must allow INFO)"
        );
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

    /// The identities of every primary behind every client (one INFO each), publishing each
    /// node's health and memory figures on the way. Fails when any client is not connected or any
    /// node does not answer: a partial view must not pass for a new identity.
    pub async fn fingerprint(&self) -> Result<Fingerprint, fred::error::Error> {
        let Some(inner) = self.inner() else {
            return Ok(Fingerprint(String::new()));
        };
        let mut ids = Vec::new();
        let mut failed = None;
        for client in inner.pool.clients().iter().chain([&inner.durable]) {
            if !client.is_connected() {
                failed = Some(down());
                continue;
            }
            let mut nodes = client.active_connections();
            if !client.is_clustered() {
                nodes.truncate(1);
            }
            if nodes.is_empty() {
                failed = Some(down());
            }
            for server in nodes {
                let info = if client.is_clustered() {
                    node_info(&client.with_cluster_node(server.clone())).await
                } else {
                    node_info(client).await
                };
                let node = server.to_string();
                let m = &self.metrics;
                match info {
                    Ok(info) => {
                        m.redis_node_up.with_label_values(&[&node]).set(1);
                        m.redis_used_memory
                            .with_label_values(&[&node])
                            .set(info.used_memory);
                        m.redis_maxmemory
                            .with_label_values(&[&node])
                            .set(info.maxmemory);
                        m.redis_evicted_keys
                            .with_label_values(&[&node])
                            .set(info.evicted_keys);
                        let clients = &m.redis_connected_clients;
                        clients
                            .with_label_values(&[&node])
                            .set(info.connected_clients);
                        let policy = &m.redis_maxmemory_policy;
                        policy
                            .with_label_values(&[&node, &info.maxmemory_policy])
                            .set(1);
                        ids.push(info.identity);
                    }
                    Err(error) => {
                        m.redis_node_up.with_label_values(&[&node]).set(0);
                        failed = Some(error);
                    }
                }
            }
        }
        if let Some(error) = failed {
            self.observe::<()>(Err(error.clone()));
            return Err(error);
        }
        self.observe(Ok(()));
        ids.sort();
        ids.dedup();
        Ok(Fingerprint(ids.join(",")))
    }
}

fn down() -> fred::error::Error {
    fred::error::Error::new(fred::error::ErrorKind::IO, "redis did not answer INFO")
}
