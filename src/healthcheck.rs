//! `authd healthcheck`: asks a running authd's gRPC health service, for container health checks
//! and operators — in plain text, or over TLS (optionally with a client certificate).
use std::{path::PathBuf, time::Duration};

use crate::grpc::status::chain;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// TLS towards the server.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// PEM roots the server is verified with (otherwise the system's).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for a server that asks for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry (otherwise the address' host).
    pub server_name: Option<String>,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// `Ok` when `service` is SERVING at `addr` (`host:port`); otherwise a one-line reason.
pub async fn check(
    addr: &str,
    service: &str,
    tls: Option<&Tls>,
    timeout: Duration,
) -> Result<(), String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("invalid address {addr:?}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if let Some(tls) = tls {
        let mut config = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &tls.ca_file {
            config = config.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => return Err("--cert-file and --key-file go together".into()),
        }
        if let Some(name) = &tls.server_name {
            config = config.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| format!("TLS configuration: {e}"))?;
    }
    // Plain text to a port that speaks TLS reads the TLS alert as HTTP/2 ("h2 protocol
    // error"): say what to try.
    let hint = match tls {
        None => " (if the server serves TLS on this port, add --tls)",
        Some(_) => "",
    };
    let channel = endpoint
        .connect()
        .await
        // With its causes: a TLS failure is a cause of the transport error.
        .map_err(|e| format!("cannot connect to {addr}: {}{hint}", chain(&e)))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| match s.code() {
            // What a TLS port's alert, read as HTTP/2, ends as: a protocol error, a reset or a
            // cancelled stream, depending on timing.
            tonic::Code::Internal
            | tonic::Code::Unknown
            | tonic::Code::Unavailable
            | tonic::Code::Cancelled => {
                format!("health check failed: {:?}: {}{hint}", s.code(), s.message())
            }
            code => format!("health check failed: {code:?}: {}", s.message()),
        })?;
    match response.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("service {service:?} is {}", other.as_str_name())),
    }
}
