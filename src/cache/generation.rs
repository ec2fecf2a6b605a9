//! Generations: which history of the Redis data a value belongs to.
//!
//! A primary's data history is identified by its run id (new on every start, so also on every
//! restore from a snapshot) and its replication id (new on every promotion of a replica, and
//! taken from its new primary by every node that resynchronises — that is, loses its own data).
//! The [`Fingerprint`] of a deployment is the set of these identities over the primaries the pool
//! is connected to, and every pooled client must see the same set (clients split between an old
//! and a new primary are not one history). The generation job binds each fingerprint to a
//! generation number in PostgreSQL (monotonic, shared by every instance), and [`Redis::adopt`]
//! makes it the one whose copies are served.
//!
//! A history that merely *continues* keeps its generation (see [`Fingerprint::continues`]): a
//! primary that gets its first replica changes its replication id but keeps the old one as its
//! second (`master_replid2`), under the same run id; a cluster that gains a primary keeps every
//! earlier one. Anything else — a restart, a restore, a promoted replica, a node that
//! resynchronised from another — is a new generation, whose copies start empty.
//!
//! fred broadcasts a reconnection *before* it sends anything on the new connection (also for a
//! node it connects to after a topology change). A [`Latch`] holds a subscription to it: once it
//! has fired, every read distrusts what it got until the generation job has looked at the
//! servers again, so a reply from a restarted, restored or newly promoted server is never taken
//! for the old one, however quickly it comes.
use std::sync::{Arc, RwLock};

use fred::{
    clients::Client,
    interfaces::{ClientLike, EventInterface},
    types::{InfoKind, config::Server},
};
use tokio::sync::{Notify, broadcast};

use super::Redis;

/// The history of one primary's data.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeIdentity {
    run_id: String,
    replid: String,
    /// The replication id it had before its current one (`master_replid2`), or empty.
    replid2: String,
    /// Whether it had a replication backlog (it had replicas).
    backlog: bool,
}

impl NodeIdentity {
    /// Whether this is the same data as `earlier`, continued: the same process, and a replication
    /// id that is the earlier one or followed it directly — or a primary that had never had a
    /// replica getting its first one (Redis then draws a new id without recording the old).
    fn continues(&self, earlier: &NodeIdentity) -> bool {
        self.run_id == earlier.run_id
            && (self.replid == earlier.replid
                || self.replid2 == earlier.replid
                || (!earlier.backlog && self.backlog))
    }
}

/// The identities of the Redis primaries behind the pool, sorted, and the PostgreSQL history
/// they are used with (a promoted standby may not know what the old primary had: a new history
/// starts a new generation, as a new Redis one does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    nodes: Vec<NodeIdentity>,
    history: String,
}

impl Fingerprint {
    /// This fingerprint, with the PostgreSQL history (`store::Db::history_key`) it is used with.
    pub fn with_history(mut self, history: String) -> Self {
        self.history = history;
        self
    }

    /// The text stored in PostgreSQL: `<history>|run_id/replid/replid2/backlog,…`.
    pub fn text(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                let backlog = u8::from(n.backlog);
                format!("{}/{}/{}/{backlog}", n.run_id, n.replid, n.replid2)
            })
            .collect();
        format!("{}|{}", self.history, nodes.join(","))
    }

    /// Reads [`Fingerprint::text`] (a text of an earlier release, without a history, has an
    /// empty one: it continues nothing of this release's).
    pub fn parse(text: &str) -> Option<Fingerprint> {
        let (history, nodes) = text.split_once('|').unwrap_or(("", text));
        let nodes = nodes
            .split(',')
            .filter(|n| !n.is_empty())
            .map(|n| {
                let mut parts = n.split('/');
                Some(NodeIdentity {
                    run_id: parts.next()?.to_owned(),
                    replid: parts.next()?.to_owned(),
                    replid2: parts.next().unwrap_or_default().to_owned(),
                    backlog: parts.next() == Some("1"),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Fingerprint {
            nodes,
            history: history.to_owned(),
        })
    }

    /// Whether every primary of `earlier` is still here with its data continued (primaries may
    /// have been added: a cluster that grows moves data with MIGRATE, which keeps it whole), on
    /// the same PostgreSQL history.
    pub fn continues(&self, earlier: &Fingerprint) -> bool {
        !earlier.nodes.is_empty()
            && self.history == earlier.history
            && earlier
                .nodes
                .iter()
                .all(|old| self.nodes.iter().any(|now| now.continues(old)))
    }
}

pub(super) struct Latch {
    reconnect: RwLock<broadcast::Receiver<Server>>,
}

impl Latch {
    /// Subscribes to `client`'s reconnections, and wakes `changed` on each.
    pub(super) fn new(client: &Client, changed: &Arc<Notify>) -> Self {
        let wake = changed.clone();
        client.on_reconnect(move |_| {
            wake.notify_one();
            async { Ok(()) }
        });
        Self {
            reconnect: RwLock::new(client.reconnect_rx()),
        }
    }

    /// Whether the client connected anew since the last [`Latch::reset`].
    pub(super) fn tripped(&self) -> bool {
        self.reconnect.read().map_or(true, |r| !r.is_empty())
    }

    fn reset(&self) {
        if let Ok(mut r) = self.reconnect.write() {
            *r = r.resubscribe();
        }
    }
}

/// A field of an INFO reply.
fn field(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// The identity of the server answering `client` (or the node it is addressed to): two small
/// INFO sections.
async fn identity(client: &impl ClientLike) -> Result<NodeIdentity, fred::error::Error> {
    let server: String = client.info(Some(InfoKind::Server)).await?;
    let replication: String = client.info(Some(InfoKind::Replication)).await?;
    let identity = NodeIdentity {
        run_id: field(&server, "run_id"),
        replid: field(&replication, "master_replid"),
        replid2: field(&replication, "master_replid2"),
        backlog: field(&replication, "repl_backlog_active") == "1",
    };
    if identity.run_id.is_empty() || field(&replication, "role") != "master" {
        return Err(fred::error::Error::new(
            fred::error::ErrorKind::Protocol,
            "the server is not a primary (or INFO did not report its run_id)",
        ));
    }
    Ok(identity)
}

impl Redis {
    /// Whether the generation job has work: none established, or a reconnection since.
    pub fn needs_generation(&self) -> bool {
        self.inner().is_some_and(|i| {
            i.generation.load(std::sync::atomic::Ordering::SeqCst) == 0
                || i.latches.iter().any(Latch::tripped)
        })
    }

    /// Waits for the next reconnection (or a read that found no generation). Never returns when
    /// Redis is disabled.
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

    /// Stops serving copies and forgets the reconnections seen so far: the caller is about to
    /// read the fingerprint and establish a generation for it. Reconnections after this keep
    /// copies unserved until the next establishment.
    pub async fn begin_establishing(&self) {
        if let Some(inner) = self.inner() {
            if let Some(hook) = inner.establish_hook.get() {
                hook().await;
            }
            inner
                .epoch
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            inner
                .generation
                .store(0, std::sync::atomic::Ordering::SeqCst);
            self.metrics.redis_generation.set(0);
            inner.latches.iter().for_each(Latch::reset);
        }
    }

    /// Serves copies of `generation`, established for `fingerprint`, from now on (unless a
    /// reconnection happened meanwhile).
    pub fn adopt(&self, generation: u64, fingerprint: Fingerprint) {
        if let Some(inner) = self.inner() {
            *inner.fingerprint.lock().unwrap_or_else(|e| e.into_inner()) = Some(fingerprint);
            let previous = inner
                .last_generation
                .swap(generation, std::sync::atomic::Ordering::SeqCst);
            if previous != generation {
                // Nothing of the new generation is served before a pass over the logs completed
                // in it (`Redis::trust`) — the trust of earlier passes is gone before the
                // generation can be read. Its servers may lack what this instance wrote to the
                // previous ones while other instances were already filling them — with Sentinel,
                // a primary about to be demoted confirms writes that the promoted replica, where
                // other instances moved first, never sees: a pass re-applies every logged
                // revocation and version since the new namespace's cursor (created at the
                // generation's birth), which the copies filled there meanwhile cannot outlive
                // (`deployments::a_write_confirmed_by_a_demoted_primary_is_not_lost_to_copies_filled_on_the_new_one`).
                inner
                    .trusted_until
                    .store(0, std::sync::atomic::Ordering::SeqCst);
            }
            inner
                .generation
                .store(generation, std::sync::atomic::Ordering::SeqCst);
            self.metrics
                .redis_generation
                .set(i64::try_from(generation).unwrap_or(i64::MAX));
            if previous != generation {
                inner.adopted.notify_one();
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
            "cannot establish which redis servers the cache is on (INFO of every primary, the \
             same for every pooled connection); the cache is not used until it can"
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

    /// The identities of the primaries behind the pool. Fails when a client is not connected,
    /// a node does not answer or is not a primary, or the clients do not all see the same
    /// primaries: a partial or split view must not pass for a history.
    pub async fn fingerprint(&self) -> Result<Fingerprint, fred::error::Error> {
        let Some(inner) = self.inner() else {
            return Ok(Fingerprint {
                nodes: Vec::new(),
                history: String::new(),
            });
        };
        let mut seen: Option<Vec<NodeIdentity>> = None;
        for client in inner.pool.clients() {
            if !client.is_connected() {
                // No command runs on an idle instance: this check is what tells that Redis is
                // gone.
                self.unreachable(&down());
                return Err(down());
            }
            let mut nodes = client.active_connections();
            if !client.is_clustered() {
                nodes.truncate(1);
            }
            if nodes.is_empty() {
                return Err(down());
            }
            let mut ids = Vec::with_capacity(nodes.len());
            for server in nodes {
                let id = if client.is_clustered() {
                    identity(&client.with_cluster_node(server)).await
                } else {
                    identity(client).await
                };
                ids.push(self.observe(id).ok_or_else(down)?);
            }
            ids.sort();
            ids.dedup();
            match &seen {
                Some(first) if *first != ids => {
                    return Err(fred::error::Error::new(
                        fred::error::ErrorKind::Cluster,
                        "the pooled connections are on different primaries",
                    ));
                }
                _ => seen = Some(ids),
            }
        }
        Ok(Fingerprint {
            nodes: seen.unwrap_or_default(),
            history: String::new(),
        })
    }

    /// PostgreSQL changed history: no copy is served until a generation is bound anew (to the
    /// new history), which the generation job does at once.
    pub fn history_changed(&self) {
        if let Some(inner) = self.inner() {
            inner
                .epoch
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            inner
                .generation
                .store(0, std::sync::atomic::Ordering::SeqCst);
            self.metrics.redis_generation.set(0);
            inner.changed.notify_one();
        }
    }

    /// Publishes each primary's health and memory figures (one full INFO each, through the
    /// first client); `false` when one did not answer.
    pub async fn survey(&self) -> bool {
        let Some(client) = self.inner().and_then(|i| i.pool.clients().first()) else {
            return false;
        };
        let mut nodes = client.active_connections();
        if !client.is_clustered() {
            nodes.truncate(1);
        }
        let mut all = !nodes.is_empty();
        self.metrics.redis_maxmemory_policy.reset();
        for server in nodes {
            let info: Result<String, _> = if client.is_clustered() {
                client
                    .with_cluster_node(server.clone())
                    .info(None::<InfoKind>)
                    .await
            } else {
                client.info(None::<InfoKind>).await
            };
            let node = server.to_string();
            let m = &self.metrics;
            let Ok(text) = info else {
                m.redis_node_up.with_label_values(&[&node]).set(0);
                all = false;
                continue;
            };
            let number = |name: &str| field(&text, name).parse::<i64>().unwrap_or(0);
            m.redis_node_up.with_label_values(&[&node]).set(1);
            let set = |g: &prometheus::IntGaugeVec, name: &str| {
                g.with_label_values(&[&node]).set(number(name))
            };
            set(&m.redis_used_memory, "used_memory");
            set(&m.redis_maxmemory, "maxmemory");
            set(&m.redis_evicted_keys, "evicted_keys");
            set(&m.redis_connected_clients, "connected_clients");
            let policy = field(&text, "maxmemory_policy");
            m.redis_maxmemory_policy
                .with_label_values(&[&node, &policy])
                .set(1);
        }
        all
    }
}

fn down() -> fred::error::Error {
    fred::error::Error::new(
        fred::error::ErrorKind::IO,
        "a redis primary did not answer INFO",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(run: &str, replid: &str, replid2: &str) -> NodeIdentity {
        NodeIdentity {
            run_id: run.into(),
            replid: replid.into(),
            replid2: replid2.into(),
            backlog: true,
        }
    }

    fn fp(nodes: Vec<NodeIdentity>) -> Fingerprint {
        Fingerprint {
            nodes,
            history: "7/00000001".into(),
        }
    }

    #[test]
    fn what_continues_a_history_and_what_starts_a_new_one() {
        let before = fp(vec![node("p", "a", "")]);
        // The first replica: a new replication id, the old one kept as the second.
        assert!(fp(vec![node("p", "b", "a")]).continues(&before));
        // A primary added beside it.
        assert!(fp(vec![node("p", "a", ""), node("q", "c", "")]).continues(&before));
        // A restart (or a restore), a promoted replica, a resynchronised node.
        assert!(!fp(vec![node("p2", "a", "")]).continues(&before));
        assert!(!fp(vec![node("r", "d", "a")]).continues(&before));
        assert!(!fp(vec![node("p", "e", "d")]).continues(&before));
        // The very first replica of a primary that never had one: a new id, the old not kept.
        let alone = fp(vec![NodeIdentity {
            backlog: false,
            ..node("p", "a", "")
        }]);
        assert!(fp(vec![node("p", "f", "")]).continues(&alone));
        assert!(!fp(vec![node("p", "f", "")]).continues(&before));
        // A primary gone.
        let two = fp(vec![node("p", "a", ""), node("q", "c", "")]);
        assert!(!before.continues(&two));
        let text = two.text();
        assert_eq!(Fingerprint::parse(&text), Some(two.clone()));
        // The same servers on a promoted PostgreSQL standby: a new history.
        let promoted = two.clone().with_history("7/00000002".into());
        assert!(!promoted.continues(&two));
        // A fingerprint of the previous release (no history) continues nothing.
        let old = Fingerprint::parse(text.split_once('|').unwrap().1).unwrap();
        assert!(!two.continues(&old));
    }
}
