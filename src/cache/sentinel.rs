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
//! So every identity check (`REDIS__CHECK_INTERVAL`) also asks a sentinel which server is the
//! primary, and any client connected elsewhere reconnects at once (fred then asks the
//! sentinels again). What the old primary took between the switch and the check is still lost;
//! that window is one check interval instead of the demotion's ten seconds.
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
    /// The sentinel asked last, and a connection to it.
    current: tokio::sync::Mutex<(usize, Option<SentinelClient>)>,
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
            current: tokio::sync::Mutex::new((0, None)),
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

    /// The primary the sentinels name now, asking each in turn from the last that answered;
    /// `None` when none answers (then nothing is moved).
    pub(super) async fn primary(&self) -> Option<(String, u16)> {
        let mut current = self.current.lock().await;
        for _ in 0..self.hosts.len() {
            let (index, client) = &mut *current;
            if client.is_none() {
                let fresh = self.client(&self.hosts[*index % self.hosts.len()]);
                if tokio::time::timeout(self.timeout, fresh.init())
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    *client = Some(fresh);
                }
            }
            if let Some(sentinel) = client.as_ref() {
                let asked = sentinel
                    .get_master_addr_by_name::<Option<(String, u16)>, _>(self.service.as_str())
                    .await;
                if let Ok(Some(primary)) = asked {
                    return Some(primary);
                }
                let _ = sentinel.quit().await;
            }
            *client = None;
            *index = (*index + 1) % self.hosts.len();
        }
        None
    }
}
