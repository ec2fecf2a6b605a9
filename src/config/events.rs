//! `EVENTS__*`: the event stream (EventService), who may subscribe, and what it may cost.
use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{AdminSettings, ConfigError, invalid};

/// EventService: served only when subscribers can be admitted (as AdminService callers are,
/// from lists of their own).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsSettings {
    /// Comma-separated SANs of client certificates admitted as subscribers.
    pub allowed_clients: String,
    /// TOML file of `[[key]]` tables (`name`, `sha256`) of bearer keys admitted as subscribers.
    pub api_keys_file: Option<PathBuf>,
    /// How often the keys file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Streams one instance serves at once.
    pub max_subscribers: usize,
    /// Of those, the ones holding a lease (MODE_STRICT): each is waited for by every revoking
    /// call of the fleet. 0: strict mode is not offered.
    pub max_strict: usize,
    /// A batch (a heartbeat when nothing changed) at least this often.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Events are kept this long: a stream resumes from a position at most this old.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for EventsSettings {
    fn default() -> Self {
        Self {
            allowed_clients: String::new(),
            api_keys_file: None,
            reload_interval: Duration::from_secs(2),
            max_subscribers: 64,
            max_strict: 16,
            heartbeat: Duration::from_secs(1),
            retention: Duration::from_secs(3600),
        }
    }
}

impl EventsSettings {
    /// Whether EventService is served: some subscriber can be admitted.
    pub fn served(&self) -> bool {
        self.admission().served()
    }

    /// Who is admitted, in the form AdminService's admission reads.
    pub fn admission(&self) -> AdminSettings {
        AdminSettings {
            allowed_clients: self.allowed_clients.clone(),
            api_keys_file: self.api_keys_file.clone(),
            reload_interval: self.reload_interval,
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.reload_interval.is_zero() {
            return invalid("EVENTS__RELOAD_INTERVAL", "must be greater than zero");
        }
        if !(1..=10_000).contains(&self.max_subscribers) {
            return invalid("EVENTS__MAX_SUBSCRIBERS", "must be 1 to 10000");
        }
        if self.max_strict > self.max_subscribers {
            return invalid(
                "EVENTS__MAX_STRICT",
                "must be at most EVENTS__MAX_SUBSCRIBERS",
            );
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&self.heartbeat) {
            return invalid("EVENTS__HEARTBEAT", "must be 100ms to 60s");
        }
        if self.retention < Duration::from_secs(600) {
            return invalid(
                "EVENTS__RETENTION",
                "must be at least 10m (a new stream replays the last few minutes)",
            );
        }
        Ok(())
    }
}
