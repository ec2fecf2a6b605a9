//! `GRPC__*`, `METRICS__*`, `HEALTH__*`, `LOG__*`: the ports authd serves and what it says.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcSettings {
    pub addr: SocketAddr,
    /// How long in-flight calls may take to finish after SIGTERM before the server stops anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Largest request message accepted, in bytes (authd's real requests stay under 8 KiB).
    pub max_message_size: usize,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Connections served at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// Connections one client address may hold at once (0: no cap); further ones are closed.
    pub max_connections_per_address: usize,
    /// Bound on one call on the server (it answers CANCELLED past it).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Serve gRPC server reflection (for grpcurl); turn off in production if you prefer.
    pub reflection: bool,
    pub tls: GrpcTlsSettings,
}

impl Default for GrpcSettings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 50051)),
            shutdown_grace: Duration::from_secs(20),
            max_message_size: 16 * 1024,
            max_concurrent_streams: 100,
            max_connections: 1024,
            max_connections_per_address: 256,
            request_timeout: Duration::from_secs(10),
            reflection: true,
            tls: GrpcTlsSettings::default(),
        }
    }
}

impl GrpcSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let g = self;
        if !(1024..=4 * 1024 * 1024).contains(&g.max_message_size) {
            return invalid("GRPC__MAX_MESSAGE_SIZE", "must be 1024 to 4194304 bytes");
        }
        if g.max_concurrent_streams == 0 {
            return invalid("GRPC__MAX_CONCURRENT_STREAMS", "must be at least 1");
        }
        if g.max_connections == 0 {
            return invalid("GRPC__MAX_CONNECTIONS", "must be at least 1");
        }
        if g.request_timeout < Duration::from_millis(100) {
            return invalid("GRPC__REQUEST_TIMEOUT", "must be at least 100ms");
        }
        let tls = &self.tls;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return invalid(
                "GRPC__TLS__CERT_FILE",
                "GRPC__TLS__CERT_FILE and GRPC__TLS__KEY_FILE go together",
            );
        }
        if tls.client_ca_file.is_some() && !tls.enabled() {
            return invalid(
                "GRPC__TLS__CLIENT_CA_FILE",
                "needs GRPC__TLS__CERT_FILE and GRPC__TLS__KEY_FILE (TLS on)",
            );
        }
        if tls.require_client_cert && tls.client_ca_file.is_none() {
            return invalid(
                "GRPC__TLS__REQUIRE_CLIENT_CERT",
                "needs GRPC__TLS__CLIENT_CA_FILE (the roots client certificates are checked with)",
            );
        }
        if tls.reload_interval.is_zero() {
            return invalid("GRPC__TLS__RELOAD_INTERVAL", "must be greater than zero");
        }
        Ok(())
    }
}

/// TLS for the gRPC port: on when a certificate and key are given.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcTlsSettings {
    /// PEM certificate chain of the server.
    pub cert_file: Option<PathBuf>,
    /// Its PEM private key.
    pub key_file: Option<PathBuf>,
    /// PEM roots that client certificates are verified with (mutual TLS); clients are asked for
    /// one when set.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse connections without a valid client certificate (otherwise optional: only
    /// AdminService admission by SAN looks at it).
    pub require_client_cert: bool,
    /// How often the files are checked for changes (a changed file is loaded for new
    /// connections; open ones keep theirs).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl GrpcTlsSettings {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some()
    }
}

impl Default for GrpcTlsSettings {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            require_client_cert: false,
            reload_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Serve Prometheus metrics at `http://<addr>/metrics`.
    pub enabled: bool,
    pub addr: SocketAddr,
    /// Connections served at once; others wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections one client address (an IPv6 /64) may hold; past it, closed at once: one
    /// address cannot keep every scraper out.
    pub max_connections_per_address: usize,
    /// A request's headers must arrive within this, or the connection is closed (slowloris).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            addr: SocketAddr::from(([0, 0, 0, 0], 9090)),
            max_connections: 16,
            max_connections_per_address: 4,
            header_read_timeout: Duration::from_secs(5),
        }
    }
}

impl MetricsSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return invalid("METRICS__MAX_CONNECTIONS", "must be at least 1");
        }
        let per_address = self.max_connections_per_address;
        if per_address == 0 || per_address > self.max_connections {
            return invalid(
                "METRICS__MAX_CONNECTIONS_PER_ADDRESS",
                "must be 1 to METRICS__MAX_CONNECTIONS",
            );
        }
        if self.header_read_timeout.is_zero() {
            return invalid("METRICS__HEADER_READ_TIMEOUT", "must be greater than zero");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthSettings {
    /// PostgreSQL unreachable for longer than this turns health NOT_SERVING (until it answers).
    #[serde(with = "humantime_serde")]
    pub db_grace: Duration,
    /// How often PostgreSQL is pinged for health.
    #[serde(with = "humantime_serde")]
    pub db_check_interval: Duration,
    /// A plaintext listener serving `grpc.health.v1` alone (for Kubernetes probes, which cannot
    /// speak TLS); none when unset.
    pub addr: Option<SocketAddr>,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            db_grace: Duration::from_secs(10),
            db_check_interval: Duration::from_secs(1),
            addr: None,
        }
    }
}

impl HealthSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.db_check_interval.is_zero() {
            return invalid("HEALTH__DB_CHECK_INTERVAL", "must be greater than zero");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing filter (`info`, `authd=debug,sqlx=warn`); `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".to_owned(),
        }
    }
}

impl LogSettings {
    /// A tracing filter whose every directive without `=` is a level: tracing reads a bare
    /// word as a target enabled at every level, so a misspelt level (`inf`, `verbose`) would
    /// name a target nothing logs under and turn the logs off without a word.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        // tracing reads `authd=debug, info` as a target named ` info`: no spaces around `,`.
        if let Some(spaced) = self.level.split(',').find(|d| d.trim() != *d) {
            return invalid(
                "LOG__LEVEL",
                &format!("`{spaced}` has spaces around it; write directives as `info,authd=debug`"),
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err() {
            return invalid("LOG__LEVEL", "must be a tracing filter such as `info`");
        }
        let bare = self
            .level
            .split(',')
            .filter(|d| !d.is_empty() && !d.contains(['=', '[']));
        for directive in bare {
            if directive
                .parse::<tracing::level_filters::LevelFilter>()
                .is_err()
            {
                return invalid(
                    "LOG__LEVEL",
                    &format!(
                        "`{directive}` is not a level (trace, debug, info, warn, error, off); \
                         a target's level is written `target=level`"
                    ),
                );
            }
        }
        Ok(())
    }
}

/// OpenTelemetry traces over OTLP/gRPC, off unless an endpoint is given. The SDK's own
/// variables (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
/// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`) are honoured as the SDK documents them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracesSettings {
    /// The collector's OTLP/gRPC address (`http://otel-collector:4317`; `https://` for TLS,
    /// verified against the system's roots); empty: no traces.
    pub otlp_endpoint: String,
    /// The share of traces begun here that are recorded (0 to 1). A caller's `traceparent`
    /// decides for its own trace: sampled there, recorded here.
    pub sample_ratio: f64,
}

impl Default for TracesSettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sample_ratio: 1.0,
        }
    }
}

impl TracesSettings {
    /// Whether traces are exported.
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.trim().is_empty()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return invalid("TRACES__SAMPLE_RATIO", "must be from 0 to 1");
        }
        if self.enabled() {
            let parsed = url::Url::parse(self.otlp_endpoint.trim());
            if !parsed.is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host()) {
                return invalid(
                    "TRACES__OTLP_ENDPOINT",
                    "must be the collector's http:// or https:// address, such as \
                     http://otel-collector:4317 (empty: no traces)",
                );
            }
        }
        Ok(())
    }
}
