//! `ADMIN__*` and `AUDIT__*`: who may call AdminService, and how long its audit is kept.
use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{ConfigError, invalid};

/// AdminService: served only when callers can be admitted (see `admin::access`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Comma-separated SANs (URI such as a SPIFFE ID, or DNS name) of client certificates
    /// admitted.
    pub allowed_clients: String,
    /// TOML file of `[[key]]` tables (`name`, `sha256`) of admitted bearer keys.
    pub api_keys_file: Option<PathBuf>,
    /// How often the keys file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl AdminSettings {
    /// Whether any caller can be admitted: the service is served.
    pub fn served(&self) -> bool {
        self.api_keys_file.is_some() || self.allowed_clients().next().is_some()
    }

    /// The admitted SANs.
    pub fn allowed_clients(&self) -> impl Iterator<Item = &str> {
        self.allowed_clients
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            allowed_clients: String::new(),
            api_keys_file: None,
            reload_interval: Duration::from_secs(2),
        }
    }
}

impl AdminSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.reload_interval.is_zero() {
            return invalid("ADMIN__RELOAD_INTERVAL", "must be greater than zero");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    /// AdminService audit rows are deleted this long after the call.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

impl AuditSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.retention < Duration::from_secs(86_400) {
            return invalid(
                "AUDIT__RETENTION",
                "must be at least 1d (no audit row younger is ever purged)",
            );
        }
        Ok(())
    }
}
