//! A Redis Cluster of 3 primaries and 3 replicas.
#![allow(dead_code)]

use super::*;

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
    pub(crate) nodes: Vec<Proc>,
    /// The primaries when it was created: the seed nodes of [`Cluster::url`].
    pub(crate) seeds: Vec<u16>,
    pub(crate) dir: TempDir,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub(crate) struct NodeLine {
    pub(crate) id: String,
    pub(crate) port: u16,
    pub(crate) flags: Vec<String>,
    /// The id of its primary, for a replica.
    pub(crate) primary: Option<String>,
}

impl NodeLine {
    pub(crate) fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

pub(crate) fn parse_cluster_nodes(text: &str) -> Vec<NodeLine> {
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
pub(crate) type SlotMap = Vec<(u16, u16, u16)>;

/// Nodes and the port of their primary (none for a primary), sorted.
pub(crate) type Roles = Vec<(u16, Option<u16>)>;

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

    pub(crate) fn node(&self, port: u16) -> &Proc {
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
    pub(crate) fn any_live(&self) -> u16 {
        *self
            .live_ports()
            .first()
            .unwrap_or_else(|| panic!("no node of the cluster is running"))
    }

    /// `CLUSTER NODES` as seen by the node on `port`.
    pub(crate) async fn nodes_view(port: u16) -> Result<Vec<NodeLine>, String> {
        let reply = command(port, &["CLUSTER", "NODES"]).await?;
        Ok(parse_cluster_nodes(reply.text().unwrap_or_default()))
    }

    /// `CLUSTER SLOTS` as seen by the node on `port`: which primary serves which slots.
    pub(crate) async fn slots_view(port: u16) -> Result<SlotMap, String> {
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
    pub(crate) async fn agreed_slots(&self) -> Result<SlotMap, String> {
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
    pub(crate) async fn check_healthy(&self) -> Result<(), String> {
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
    pub(crate) fn kill_now(&self) {
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

pub(crate) static SHARED_CLUSTER: tokio::sync::OnceCell<Cluster> =
    tokio::sync::OnceCell::const_new();

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
