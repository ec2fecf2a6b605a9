//! A primary, a replica and 3 sentinels watching them.
#![allow(dead_code)]

use super::*;

/// A primary and its replica, watched by 3 sentinels (quorum 2) as service `name`.
///
/// Sentinels judge a server down after 1 s (`down-after-milliseconds 1000`), so a primary that is
/// stopped or killed is failed over on its own within a few seconds; `failover-timeout` is 3 s.
/// After a failover the sentinels turn the old primary, once it is reachable, into a replica of
/// the new one, and see it as a replica fit for the next failover, only some 20 s later (see
/// [`SENTINEL_SETTLE`]).
pub struct Sentinel {
    pub(crate) name: String,
    /// The data nodes: the first primary, then the first replica.
    pub(crate) data: Vec<Proc>,
    pub(crate) sentinels: Vec<Proc>,
    pub(crate) dir: TempDir,
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

    pub(crate) fn live_sentinels(&self) -> Vec<u16> {
        self.sentinels
            .iter()
            .filter(|n| n.live())
            .map(|n| n.port)
            .collect()
    }

    pub(crate) fn live_data(&self) -> Vec<u16> {
        self.data
            .iter()
            .filter(|n| n.live())
            .map(|n| n.port)
            .collect()
    }

    pub(crate) fn proc(&self, port: u16) -> &Proc {
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
    pub(crate) async fn primary_per(&self, sentinel: u16) -> Result<u16, String> {
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
    pub(crate) async fn agreed_primary(&self) -> Result<u16, String> {
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
    pub(crate) async fn check_replicated_to(&self, primary: u16) -> Result<(), String> {
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

    pub(crate) async fn wait_replicated_to(&self, primary: u16) {
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
    pub(crate) async fn check_healthy(&self) -> Result<(), String> {
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
