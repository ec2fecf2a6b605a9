//! Reading the PEM files named by settings (TLS certificates, keys and roots), with errors that
//! name the setting.
use std::{fs, path::Path};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// A setting that cannot work, and why.
#[derive(Debug)]
pub struct Invalid {
    pub setting: &'static str,
    pub reason: String,
}

impl From<Invalid> for crate::config::ConfigError {
    fn from(error: Invalid) -> Self {
        Self::invalid(error.setting, error.reason)
    }
}

pub fn invalid(setting: &'static str, reason: impl Into<String>) -> Invalid {
    Invalid {
        setting,
        reason: reason.into(),
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, Invalid> {
    fs::read(path).map_err(|e| invalid(setting, format!("cannot read {}: {e}", path.display())))
}

/// Every certificate in a PEM file (at least one).
pub fn certificates(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, Invalid> {
    let pem = read(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(setting, format!("{} is not PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            setting,
            format!("{} holds no certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn private_key(setting: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, Invalid> {
    let pem = read(setting, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        invalid(
            setting,
            format!("{} holds no usable private key: {e}", path.display()),
        )
    })
}
