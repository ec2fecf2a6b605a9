//! TLS on the gRPC port: the server's certificate and key, and optionally the roots client
//! certificates are checked with (mutual TLS). The files are looked at every
//! `GRPC__TLS__RELOAD_INTERVAL`; when they changed (cert-manager rotated them) a new
//! configuration is built and used for new connections, while open connections keep theirs. A
//! change that does not load (a half-written file, a key that does not fit) is logged and the
//! configuration in force stays.
use std::sync::{Arc, RwLock};

use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::{
    config::GrpcTlsSettings,
    tls_files::{Invalid, certificates, invalid, private_key},
};

pub struct TlsServer {
    settings: GrpcTlsSettings,
    current: RwLock<(Arc<ServerConfig>, [u8; 32])>,
}

/// A digest of the files' contents (missing files count as empty).
fn digest(settings: &GrpcTlsSettings) -> [u8; 32] {
    let mut hash = Sha256::new();
    for path in [
        &settings.cert_file,
        &settings.key_file,
        &settings.client_ca_file,
    ]
    .into_iter()
    .flatten()
    {
        let bytes = std::fs::read(path).unwrap_or_default();
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(&bytes);
    }
    hash.finalize().into()
}

fn build(settings: &GrpcTlsSettings) -> Result<ServerConfig, Invalid> {
    let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) else {
        return Err(invalid(
            "GRPC__TLS__CERT_FILE",
            "GRPC__TLS__CERT_FILE and GRPC__TLS__KEY_FILE go together",
        ));
    };
    let chain = certificates("GRPC__TLS__CERT_FILE", cert)?;
    let key = private_key("GRPC__TLS__KEY_FILE", key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("GRPC__TLS__CERT_FILE", e.to_string()))?;
    let builder = match &settings.client_ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("GRPC__TLS__CLIENT_CA_FILE", path)? {
                roots.add(cert).map_err(|e| {
                    invalid(
                        "GRPC__TLS__CLIENT_CA_FILE",
                        format!("holds an unusable certificate: {e}"),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if settings.require_client_cert {
                verifier.build()
            } else {
                verifier.allow_unauthenticated().build()
            }
            .map_err(|e| invalid("GRPC__TLS__CLIENT_CA_FILE", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        invalid(
            "GRPC__TLS__KEY_FILE",
            format!("does not fit the certificate: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

impl TlsServer {
    /// Loads the files; `Err` names the setting whose file is wrong.
    pub fn load(settings: &GrpcTlsSettings) -> Result<Self, Invalid> {
        let stamp = digest(settings);
        let config = build(settings)?;
        Ok(Self {
            settings: settings.clone(),
            current: RwLock::new((Arc::new(config), stamp)),
        })
    }

    /// For one new connection, with the configuration in force.
    pub fn acceptor(&self) -> TlsAcceptor {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(current.0.clone())
    }

    /// Loads the files again if they changed; `true` when a new configuration is in force.
    pub fn reload(&self) -> bool {
        let stamp = digest(&self.settings);
        if stamp == self.current.read().unwrap_or_else(|e| e.into_inner()).1 {
            return false;
        }
        match build(&self.settings) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) =
                    (Arc::new(config), stamp);
                tracing::info!("gRPC TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::error!(
                    setting = e.setting,
                    reason = %e.reason,
                    "gRPC TLS files changed but do not load; the certificate in force stays"
                );
                false
            }
        }
    }
}
