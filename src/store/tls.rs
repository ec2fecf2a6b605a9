//! `DATABASE__URL`'s TLS parameters, and what authd says about them: messages name the
//! parameters (`sslmode`, `sslrootcert`), never the URL, which is a secret.
use std::{net::IpAddr, str::FromStr, time::Duration};

use sqlx::{
    Connection,
    postgres::{PgConnectOptions, PgConnection, PgSslMode},
};

use super::StoreError;

const SSL_MODE: &[&str] = &["sslmode", "ssl-mode"];
const SSL_ROOT_CERT: &[&str] = &["sslrootcert", "ssl-root-cert", "ssl-ca"];
const SSL_CERT: &[&str] = &["sslcert", "ssl-cert"];
const SSL_KEY: &[&str] = &["sslkey", "ssl-key"];

/// For [`Db::check`](super::Db::check): an `sslmode` sqlx knows and certificate files that can be read,
/// so that a typo stops startup naming the parameter rather than failing at the handshake.
pub fn check_url(url: &str) -> Result<(), String> {
    if let Some(mode) = param(url, SSL_MODE)
        && PgSslMode::from_str(&mode).is_err()
    {
        return Err(format!(
            "sslmode={mode} is not one of disable, allow, prefer, require, verify-ca, verify-full"
        ));
    }
    for names in [SSL_ROOT_CERT, SSL_CERT, SSL_KEY] {
        if let Some(path) = param(url, names)
            && let Err(error) = std::fs::File::open(&path)
        {
            return Err(format!("{}={path} cannot be read: {error}", names[0]));
        }
    }
    Ok(())
}

fn param(url: &str, names: &[&str]) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    let (_, value) = url
        .query_pairs()
        .find(|(k, _)| names.contains(&k.as_ref()))?;
    Some(value.into_owned())
}

pub struct UrlTls {
    mode: PgSslMode,
    root_cert: Option<String>,
    local: bool,
}

impl UrlTls {
    pub fn new(url: &str, options: &PgConnectOptions) -> Self {
        let host = options.get_host();
        Self {
            mode: options.get_ssl_mode(),
            // sqlx reads the same environment variable when the URL does not say.
            root_cert: param(url, SSL_ROOT_CERT).or_else(|| std::env::var("PGSSLROOTCERT").ok()),
            local: options.get_socket().is_some()
                || host == "localhost"
                || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()),
        }
    }

    pub fn required(&self) -> bool {
        !matches!(
            self.mode,
            PgSslMode::Disable | PgSslMode::Allow | PgSslMode::Prefer
        )
    }

    /// `require` encrypts but accepts any certificate (sqlx ignores `sslrootcert` with it,
    /// unlike libpq); `prefer` and below may not even encrypt, which only a local server
    /// excuses.
    pub fn warn_if_unverified(&self) {
        let sslmode = self.mode_name();
        if matches!(self.mode, PgSslMode::Require) {
            tracing::warn!(
                sslmode,
                "DATABASE__URL has sslmode=require: the connection to PostgreSQL is encrypted \
                 but the server is not verified{}; use sslmode=verify-full with \
                 sslrootcert=<CA file>",
                match self.root_cert {
                    Some(_) => " (sslrootcert is used only by verify-ca and verify-full)",
                    None => "",
                }
            );
        } else if !self.required() && !self.local {
            tracing::warn!(
                sslmode,
                "DATABASE__URL has sslmode={sslmode}: the connection to PostgreSQL is not \
                 verified and may not be encrypted; use sslmode=verify-full with \
                 sslrootcert=<CA file>"
            );
        }
    }

    /// Makes one connection: a TLS failure is returned, explained; anything else (PostgreSQL
    /// not up yet) is left to the pool, as without TLS.
    pub async fn probe(
        &self,
        options: &PgConnectOptions,
        within: Duration,
    ) -> Result<(), StoreError> {
        match tokio::time::timeout(within, PgConnection::connect_with(options)).await {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
                Ok(())
            }
            Ok(Err(error)) if self.cause(&error).is_some() => Err(self.explain(error)),
            Ok(Err(_)) | Err(_) => Ok(()),
        }
    }

    /// A TLS failure becomes a message an operator can act on (which sslmode and CA file were
    /// in force, and what was wrong with the certificate), told apart from a network failure.
    pub fn explain(&self, error: sqlx::Error) -> StoreError {
        let Some(cause) = self.cause(&error) else {
            return error.into();
        };
        let root_cert = match &self.root_cert {
            Some(path) => format!(", sslrootcert={path}"),
            None => String::new(),
        };
        // InvalidArgument displays just the message (the other variants repeat their cause).
        StoreError::Unavailable(Some(sqlx::Error::InvalidArgument(format!(
            "TLS with PostgreSQL failed (DATABASE__URL has sslmode={}{root_cert}): {cause}",
            self.mode_name()
        ))))
    }

    /// sqlx reports a failed handshake as an I/O error carrying the rustls error.
    fn cause(&self, error: &sqlx::Error) -> Option<String> {
        use rustls::{CertificateError as C, Error as E};
        let tls = match error {
            sqlx::Error::Tls(cause) => return Some(cause.to_string()),
            sqlx::Error::Io(io) => io.get_ref()?.downcast_ref::<E>()?,
            _ => return None,
        };
        let hint = match (tls, &self.root_cert) {
            (E::InvalidCertificate(C::UnknownIssuer), Some(_)) => {
                "the server's certificate is not signed by a CA in sslrootcert"
            }
            (E::InvalidCertificate(C::UnknownIssuer), None) => {
                "the server's certificate is not signed by a CA of the system; name its CA \
                 with sslrootcert"
            }
            (E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }), _) => {
                "the server's certificate does not name the host of DATABASE__URL"
            }
            _ => return Some(tls.to_string()),
        };
        Some(format!("{tls} ({hint})"))
    }

    fn mode_name(&self) -> &'static str {
        match self.mode {
            PgSslMode::Disable => "disable",
            PgSslMode::Allow => "allow",
            PgSslMode::Prefer => "prefer",
            PgSslMode::Require => "require",
            PgSslMode::VerifyCa => "verify-ca",
            PgSslMode::VerifyFull => "verify-full",
        }
    }
}
