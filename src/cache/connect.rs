//! From settings to fred's configuration: the deployment (one server, Cluster or Sentinel) and TLS
//! from `REDIS__URL`, credentials from the URL or `REDIS__USERNAME`/`REDIS__PASSWORD` (which
//! win), sentinel credentials, and a rustls client configuration (`REDIS__TLS__*`).
//!
//! fred parses the URL; what it lacks is the comma-separated host list
//! (`redis-cluster://h1:p1,h2:p2`) and the `service_name` parameter that operators write (fred
//! spells them `?node=h2:p2` and `?sentinelServiceName=`): [`normalize_url`] rewrites those.
use std::sync::Arc;

use fred::types::config::{Config, ServerConfig, TlsConfig, TlsConnector, TlsHostMapping};
use rustls::{ClientConfig, RootCertStore};
use secrecy::ExposeSecret;

pub use crate::tls_files::Invalid;
use crate::{
    config::RedisSettings,
    tls_files::{certificates, invalid, private_key},
};

const SCHEMES: [&str; 6] = [
    "redis",
    "rediss",
    "redis-cluster",
    "rediss-cluster",
    "redis-sentinel",
    "rediss-sentinel",
];

/// The deployment a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployment {
    Single,
    Cluster,
    Sentinel,
}

/// Rewrites `scheme://[user:pass@]h1:p1,h2:p2[/db][?service_name=N&…]` into fred's form
/// (`scheme://[user:pass@]h1:p1[/db]?node=h2:p2&sentinelServiceName=N&…`).
pub fn normalize_url(url: &str) -> Result<(String, Deployment, bool), Invalid> {
    let bad = |why: &str| invalid("REDIS__URL", why.to_owned());
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        bad("must be a redis://, rediss://, redis-cluster:// or redis-sentinel:// URL")
    })?;
    if !SCHEMES.contains(&scheme) {
        return Err(bad(
            "must start with redis://, rediss://, redis-cluster://, rediss-cluster://, \
             redis-sentinel:// or rediss-sentinel://",
        ));
    }
    let deployment = match scheme {
        s if s.ends_with("-cluster") => Deployment::Cluster,
        s if s.ends_with("-sentinel") => Deployment::Sentinel,
        _ => Deployment::Single,
    };
    let tls = scheme.starts_with("rediss");
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let mut hosts = hosts.split(',').map(str::trim);
    let first = hosts
        .next()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("names no host"))?;
    let others: Vec<&str> = hosts.collect();
    if others.iter().any(|h| h.is_empty()) {
        return Err(bad("has an empty host in its host list"));
    }
    if deployment == Deployment::Single && !others.is_empty() {
        return Err(bad(
            "lists several hosts: use redis-cluster:// or redis-sentinel:// for those deployments",
        ));
    }
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, query),
        None => (tail, ""),
    };
    let mut params: Vec<String> = others.iter().map(|h| format!("node={h}")).collect();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("service_name", name)) => params.push(format!("sentinelServiceName={name}")),
            _ => params.push(pair.to_owned()),
        }
    }
    if deployment == Deployment::Sentinel
        && !params.iter().any(|p| p.starts_with("sentinelServiceName="))
    {
        return Err(bad("needs ?service_name=NAME for a Sentinel deployment"));
    }
    let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    let path = path.trim_end_matches('/');
    let query = if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    };
    Ok((
        format!("{scheme}://{userinfo}{first}{path}{query}"),
        deployment,
        tls,
    ))
}

/// fred's configuration for these settings; every problem names its setting.
pub fn fred_config(settings: &RedisSettings) -> Result<(Config, Deployment), Invalid> {
    let (url, deployment, tls) = normalize_url(settings.url.expose_secret())?;
    let mut config = Config::from_url(&url).map_err(|e| {
        invalid(
            "REDIS__URL",
            format!("is not a valid Redis URL: {}", e.details()),
        )
    })?;
    if let Some(username) = &settings.username {
        config.username = Some(username.clone());
    }
    if let Some(password) = &settings.password {
        config.password = Some(password.expose_secret().to_owned());
    }
    let sentinel = &settings.sentinel;
    match &mut config.server {
        ServerConfig::Sentinel {
            username, password, ..
        } => {
            if let Some(u) = &sentinel.username {
                *username = Some(u.clone());
            }
            if let Some(p) = &sentinel.password {
                *password = Some(p.expose_secret().to_owned());
            }
        }
        _ if sentinel.username.is_some() || sentinel.password.is_some() => {
            return Err(invalid(
                "REDIS__SENTINEL__USERNAME",
                "sentinel credentials need a redis-sentinel:// URL",
            ));
        }
        _ => {}
    }
    let files = &settings.tls;
    if !tls && (files.ca_file.is_some() || files.cert_file.is_some() || files.key_file.is_some()) {
        return Err(invalid(
            "REDIS__TLS__CA_FILE",
            "REDIS__TLS__* files need a TLS URL (rediss://, rediss-cluster://, rediss-sentinel://)",
        ));
    }
    config.tls = if tls {
        Some(TlsConfig {
            connector: TlsConnector::from(client_tls(settings)?),
            // Cluster nodes announce addresses; verify them against the seed's host name.
            hostnames: match deployment {
                Deployment::Cluster => TlsHostMapping::DefaultHost,
                _ => TlsHostMapping::None,
            },
        })
    } else {
        None
    };
    Ok((config, deployment))
}

/// The rustls client configuration: the CA file's roots or the system's, and the client
/// certificate when one is configured.
fn client_tls(settings: &RedisSettings) -> Result<ClientConfig, Invalid> {
    let files = &settings.tls;
    let mut roots = RootCertStore::empty();
    match &files.ca_file {
        Some(path) => {
            for cert in certificates("REDIS__TLS__CA_FILE", path)? {
                roots.add(cert).map_err(|e| {
                    invalid(
                        "REDIS__TLS__CA_FILE",
                        format!("holds an unusable certificate: {e}"),
                    )
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(invalid(
                    "REDIS__TLS__CA_FILE",
                    "is needed: the system has no root certificates",
                ));
            }
        }
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("REDIS__TLS__CA_FILE", e.to_string()))?
            .with_root_certificates(roots);
    match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => {
            let chain = certificates("REDIS__TLS__CERT_FILE", cert)?;
            let key = private_key("REDIS__TLS__KEY_FILE", key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                invalid(
                    "REDIS__TLS__KEY_FILE",
                    format!("does not fit the certificate: {e}"),
                )
            })
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(_), None) => Err(invalid(
            "REDIS__TLS__KEY_FILE",
            "is needed with REDIS__TLS__CERT_FILE",
        )),
        (None, Some(_)) => Err(invalid(
            "REDIS__TLS__CERT_FILE",
            "is needed with REDIS__TLS__KEY_FILE",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `config` only parses; what only fred can judge is judged here, at startup, naming the
    /// setting (an unusable URL used to be found by `Settings::load`).
    #[test]
    fn a_url_fred_cannot_use_is_an_invalid_setting_naming_it() {
        for url in ["http://x", "redis://a:1,b:2", "memcached://h:11211"] {
            let settings = crate::config::RedisSettings {
                url: url.to_owned().into(),
                ..Default::default()
            };
            let error = crate::cache::Redis::check(&settings)
                .unwrap_err()
                .to_string();
            assert!(
                error.starts_with("invalid setting REDIS__URL: "),
                "{url}: {error}"
            );
        }
        let off = crate::config::RedisSettings {
            url: "http://x".to_owned().into(),
            enabled: false,
            ..Default::default()
        };
        assert!(
            crate::cache::Redis::check(&off).is_ok(),
            "Redis off: the URL is not used"
        );
    }

    #[test]
    fn host_lists_and_service_names_become_fred_parameters() {
        let (url, d, tls) = normalize_url("redis-cluster://a:1,b:2,c:3").unwrap();
        assert_eq!(
            (url.as_str(), d, tls),
            (
                "redis-cluster://a:1?node=b:2&node=c:3",
                Deployment::Cluster,
                false
            )
        );
        let (url, d, tls) =
            normalize_url("rediss-sentinel://u:p@s1:26379,s2:26379/?service_name=mymaster")
                .unwrap();
        assert_eq!(
            (url.as_str(), d, tls),
            (
                "rediss-sentinel://u:p@s1:26379?node=s2:26379&sentinelServiceName=mymaster",
                Deployment::Sentinel,
                true
            )
        );
        let (url, d, _) = normalize_url("redis://:pw@h:6380/2").unwrap();
        assert_eq!(
            (url.as_str(), d),
            ("redis://:pw@h:6380/2", Deployment::Single)
        );
        for bad in [
            "http://h",
            "h:6379",
            "redis://",
            "redis://a:1,b:2",
            "redis-cluster://a:1,,b:2",
            "redis-sentinel://s1:26379",
        ] {
            assert!(normalize_url(bad).is_err(), "{bad}");
        }
    }
}
