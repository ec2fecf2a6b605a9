//! Following the sentinels' word on which server is the primary.
//!
//! fred asks the sentinels for the primary only when it connects. After a failover whose old
//! primary is still up (`SENTINEL FAILOVER`, or a partition that heals), that server keeps
//! calling itself primary and taking writes until Sentinel demotes it — about ten seconds
//! later (its `+convert-to-slave` comes one ten-second check after the switch), when it
//! discards them and Sentinel kills its clients. Until then an instance still connected there
//! writes its rate-limit buckets (and anything else) to a history that is about to vanish, while
//! instances connected since write to the new primary: two counts of one bucket, and the
//! first lost at the demotion, long after the failover (found by the fault run on Sentinel: five
//! wrong passwords evaluated within ten seconds with a limit of four).
//!
//! So every identity check (`REDIS__CHECK_INTERVAL`) also asks the sentinels which server is the
//! primary, and when a majority of them name one, any client connected elsewhere reconnects at
//! once (fred then asks the sentinels again). A minority that has not heard of the failover
//! cannot move anyone back. What the old primary took between the switch and the check is still
//! lost; that window is one check interval instead of the demotion's ten seconds. The sentinels
//! are asked at once, each within `REDIS__COMMAND_TIMEOUT`, over a connection kept to each.
use std::time::Duration;

use fred::{
    clients::SentinelClient,
    interfaces::{ClientLike, SentinelInterface},
    types::config::{Config, SentinelConfig, Server, ServerConfig},
};

pub(super) struct Sentinels {
    hosts: Vec<Server>,
    service: String,
    username: Option<String>,
    password: Option<String>,
    tls: Option<fred::types::config::TlsConfig>,
    timeout: Duration,
    /// A connection to each sentinel, made when first needed and again after a failure.
    clients: Vec<tokio::sync::Mutex<Option<SentinelClient>>>,
    /// When "no sentinel answers" was last logged.
    warned: std::sync::Mutex<Option<std::time::Instant>>,
    /// When clients were last made to reconnect, and to which primary (see
    /// [`Sentinels::may_move`]).
    moved: std::sync::Mutex<Option<(std::time::Instant, (String, u16))>>,
}

impl Sentinels {
    /// For a Sentinel deployment's configuration; `None` for any other.
    pub(super) fn new(config: &Config, timeout: Duration) -> Option<Self> {
        let ServerConfig::Sentinel {
            hosts,
            service_name,
            username,
            password,
        } = &config.server
        else {
            return None;
        };
        Some(Self {
            hosts: hosts.clone(),
            service: service_name.clone(),
            username: username.clone(),
            password: password.clone(),
            tls: config.tls.clone(),
            timeout,
            clients: hosts
                .iter()
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            warned: std::sync::Mutex::new(None),
            moved: std::sync::Mutex::new(None),
        })
    }

    fn client(&self, host: &Server) -> SentinelClient {
        let config = SentinelConfig {
            host: host.host.to_string(),
            port: host.port,
            username: self.username.clone(),
            password: self.password.clone(),
            tls: self.tls.clone(),
        };
        let performance = fred::types::config::PerformanceConfig {
            default_command_timeout: self.timeout,
            ..Default::default()
        };
        let connection = fred::types::config::ConnectionConfig {
            connection_timeout: self.timeout,
            internal_command_timeout: self.timeout,
            ..Default::default()
        };
        SentinelClient::new(config, Some(performance), Some(connection), None)
    }

    /// What sentinel `index` names as the primary; `None` when it does not answer in time.
    async fn ask(&self, index: usize) -> Option<(String, u16)> {
        let mut client = self.clients[index].lock().await;
        let asked = async {
            if client.is_none() {
                let fresh = self.client(&self.hosts[index]);
                fresh.init().await.ok()?;
                *client = Some(fresh);
            }
            let sentinel = client.as_ref()?;
            sentinel
                .get_master_addr_by_name::<Option<(String, u16)>, _>(self.service.as_str())
                .await
                .ok()
                .flatten()
        };
        let answer = tokio::time::timeout(self.timeout * 2, asked)
            .await
            .ok()
            .flatten();
        if answer.is_none()
            && let Some(failed) = client.take()
        {
            // Not awaited: a hung sentinel must not hold the identity check.
            drop(tokio::spawn(async move { failed.quit().await }));
        }
        answer
    }

    /// The primary a majority of the sentinels name now; `None` when no majority answers alike
    /// (then nothing is moved).
    pub(super) async fn primary(&self) -> Option<(String, u16)> {
        let answers = futures::future::join_all((0..self.hosts.len()).map(|i| self.ask(i))).await;
        let answered = answers.iter().flatten().count();
        if answered == 0 {
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                *warned = Some(std::time::Instant::now());
                tracing::warn!(
                    "no sentinel of REDIS__URL answers: a failover is noticed only when the old \
                     primary drops its clients"
                );
            }
            return None;
        }
        let mut votes: Vec<((String, u16), usize)> = Vec::new();
        for answer in answers.into_iter().flatten() {
            match votes.iter_mut().find(|(primary, _)| *primary == answer) {
                Some((_, count)) => *count += 1,
                None => votes.push((answer, 1)),
            }
        }
        votes
            .into_iter()
            .find(|(_, count)| *count * 2 > self.hosts.len())
            .map(|(primary, _)| primary)
    }

    /// Whether clients may be made to reconnect to `primary` now: at once when it is a primary
    /// they were not sent to yet, then not again for [`MOVE_AGAIN`]. fred reconnects through the
    /// first sentinel that answers it, which may be one that missed the failover: the clients
    /// then land on the old primary again, and moving them every second would only keep the
    /// cache unserved.
    pub(super) fn may_move(&self, primary: &(String, u16)) -> bool {
        let mut moved = self.moved.lock().unwrap_or_else(|e| e.into_inner());
        if moved
            .as_ref()
            .is_some_and(|(at, to)| to == primary && at.elapsed() < MOVE_AGAIN)
        {
            return false;
        }
        *moved = Some((std::time::Instant::now(), primary.clone()));
        true
    }
}

/// How long after clients were made to reconnect they are not made to again.
pub(super) const MOVE_AGAIN: Duration = Duration::from_secs(30);
/// How long a follower waits for the clients it moved to be connected again.
pub(super) const MOVE_WAIT: Duration = Duration::from_secs(2);
