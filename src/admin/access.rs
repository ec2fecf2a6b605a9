//! Who may call AdminService: a client certificate (mutual TLS) with a SAN — a URI such as a
//! SPIFFE ID, or a DNS name — listed in `ADMIN__ALLOWED_CLIENTS`, or `authorization: Bearer
//! <key>` with a key whose SHA-256 is listed in `ADMIN__API_KEYS_FILE`. The file holds hashes
//! only (never a key) and is re-read when it changes, so keys rotate without a restart.
use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AdminSettings;

/// Longest bearer key looked at (a longer one is simply not allowed).
const KEY_MAX_BYTES: usize = 512;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    /// Lower-case hex of the key's SHA-256.
    sha256: String,
}

struct ApiKey {
    name: String,
    sha256: [u8; 32],
}

/// The keys as last read, and a digest of the file they came from.
struct Keys {
    keys: Vec<ApiKey>,
    file_digest: [u8; 32],
}

/// The outcome of looking at a caller's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Admitted as `caller` (`uri:<SAN>`, `dns:<SAN>` or `key:<name>`).
    Admitted { caller: String },
    /// No credential at all.
    Unauthenticated,
    /// A credential that is not allowed; `caller` says which (never the key itself).
    Denied { caller: String },
}

pub struct Access {
    sans: HashSet<San>,
    file: Option<PathBuf>,
    keys: RwLock<Arc<Keys>>,
}

fn parse_keys(text: &str) -> Result<Vec<ApiKey>, String> {
    let file: KeysFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
    let mut names = HashSet::new();
    file.key
        .into_iter()
        .map(|entry| {
            let mut sha256 = [0u8; 32];
            let valid = entry.sha256.len() == 64
                && entry
                    .sha256
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                && hex::decode_to_slice(&entry.sha256, &mut sha256).is_ok();
            if !valid {
                return Err(format!(
                    "key {:?}: sha256 must be 64 lower-case hex digits",
                    entry.name
                ));
            }
            if entry.name.is_empty() || !names.insert(entry.name.clone()) {
                return Err(format!(
                    "key names must be non-empty and unique: {:?}",
                    entry.name
                ));
            }
            Ok(ApiKey {
                name: entry.name,
                sha256,
            })
        })
        .collect()
}

fn read_keys(path: &PathBuf) -> Result<Keys, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = String::from_utf8(bytes.clone()).map_err(|_| "not UTF-8".to_owned())?;
    Ok(Keys {
        keys: parse_keys(&text)?,
        file_digest: Sha256::digest(&bytes).into(),
    })
}

/// A subject alternative name of a client certificate, by type: an allowed entry with a `:` (a
/// scheme: `spiffe://…`, `urn:…`; DNS names have none) is a URI and matches URI SANs only; any
/// other is a DNS name and matches DNS SANs
/// only (compared in lower case, without a trailing dot). A CA that lets workloads pick their
/// DNS names therefore cannot grant the URI identities it pins, or the reverse.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum San {
    Uri(String),
    Dns(String),
}

impl San {
    fn allowed(entry: &str) -> San {
        if entry.contains(':') {
            San::Uri(entry.to_owned())
        } else {
            San::Dns(dns(entry))
        }
    }

    /// How the audit names a caller admitted (or refused) by it.
    fn caller(&self) -> String {
        match self {
            San::Uri(uri) => format!("uri:{uri}"),
            San::Dns(name) => format!("dns:{name}"),
        }
    }
}

fn dns(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The URI and DNS SANs of a DER certificate.
pub fn sans(certificate: &CertificateDer<'_>) -> Vec<San> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(certificate.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(San::Uri((*uri).to_owned())),
            GeneralName::DNSName(name) => Some(San::Dns(dns(name))),
            _ => None,
        })
        .collect()
}

impl Access {
    /// `None` when AdminService is not configured (neither setting given); `Err` names what is
    /// wrong with the keys file.
    pub fn from_settings(settings: &AdminSettings) -> Result<Option<Self>, String> {
        if !settings.served() {
            return Ok(None);
        }
        let sans: HashSet<San> = settings.allowed_clients().map(San::allowed).collect();
        let file = settings.api_keys_file.clone();
        let keys = match &file {
            // Not there (yet): no key is admitted until it appears (the reload reads it then).
            Some(path) if !path.exists() => {
                tracing::warn!(
                    path = %path.display(),
                    "ADMIN__API_KEYS_FILE does not exist: no API key is admitted until it does"
                );
                Keys {
                    keys: Vec::new(),
                    file_digest: [0; 32],
                }
            }
            Some(path) => read_keys(path)?,
            None => Keys {
                keys: Vec::new(),
                file_digest: [0; 32],
            },
        };
        Ok(Some(Self {
            sans,
            file,
            keys: RwLock::new(Arc::new(keys)),
        }))
    }

    fn keys(&self) -> Arc<Keys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the keys file if it changed. A file that cannot be parsed, or is empty, is logged
    /// and the keys already loaded stay in force (a half-written file locks nobody out); a file
    /// that is gone admits no key any more (deleting it revokes every key). `true` when the keys
    /// changed.
    pub fn reload(&self) -> bool {
        let Some(path) = &self.file else {
            return false;
        };
        let current = self.keys();
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) => {
                if !current.keys.is_empty() {
                    tracing::error!(%error, "ADMIN__API_KEYS_FILE cannot be read: no API key is admitted until it can");
                    *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Keys {
                        keys: Vec::new(),
                        file_digest: [0; 32],
                    });
                    return true;
                }
                return false;
            }
        };
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if digest == current.file_digest {
            return false;
        }
        if bytes.iter().all(u8::is_ascii_whitespace) && !current.keys.is_empty() {
            // `cat new > keys.toml` truncates first: an empty file is one being written.
            tracing::error!(
                "ADMIN__API_KEYS_FILE is empty (being rewritten in place?); the keys read before \
                 stay in force (to revoke every key, delete the file)"
            );
            return false;
        }
        let parsed = String::from_utf8(bytes)
            .map_err(|_| "not UTF-8".to_owned())
            .and_then(|text| parse_keys(&text));
        match parsed {
            Ok(keys) => {
                tracing::info!(
                    count = keys.len(),
                    "admin API keys reloaded from ADMIN__API_KEYS_FILE"
                );
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Keys {
                    keys,
                    file_digest: digest,
                });
                true
            }
            Err(error) => {
                tracing::error!(%error, "ADMIN__API_KEYS_FILE could not be reloaded; the keys read before stay in force");
                false
            }
        }
    }

    /// Looks at the caller's client certificate (if any) and `authorization` metadata (if
    /// any). Either credential admits on its own.
    pub fn admit(
        &self,
        certificate: Option<&CertificateDer<'_>>,
        authorization: Option<&[u8]>,
    ) -> Admission {
        let names = certificate.map(sans).unwrap_or_default();
        if let Some(allowed) = names.iter().find(|n| self.sans.contains(*n)) {
            return Admission::Admitted {
                caller: allowed.caller(),
            };
        }
        // Only a bearer key is a credential here (another scheme is as good as none).
        let bearer = authorization
            .and_then(|value| {
                value
                    .strip_prefix(b"Bearer ")
                    .or_else(|| value.strip_prefix(b"bearer "))
            })
            .filter(|key| !key.is_empty());
        if let Some(key) = bearer.filter(|key| key.len() <= KEY_MAX_BYTES) {
            let presented: [u8; 32] = Sha256::digest(key).into();
            let keys = self.keys();
            // Every stored hash is compared, in constant time each: no early exit.
            let mut matched: Option<&ApiKey> = None;
            for stored in &keys.keys {
                if bool::from(stored.sha256.ct_eq(&presented)) {
                    matched = Some(stored);
                }
            }
            if let Some(key) = matched {
                return Admission::Admitted {
                    caller: format!("key:{}", key.name),
                };
            }
        }
        match (names.first(), bearer) {
            (None, None) if certificate.is_none() => Admission::Unauthenticated,
            (Some(name), _) => Admission::Denied {
                caller: name.caller(),
            },
            (None, Some(_)) => Admission::Denied {
                caller: "key:unknown".to_owned(),
            },
            (None, None) => Admission::Denied {
                caller: "certificate without an allowed SAN".to_owned(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(keys: &str, sans: &str) -> (Access, tempfile::NamedTempFile) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), keys).unwrap();
        let settings = AdminSettings {
            allowed_clients: sans.to_owned(),
            api_keys_file: Some(file.path().to_owned()),
            ..AdminSettings::default()
        };
        (Access::from_settings(&settings).unwrap().unwrap(), file)
    }

    fn entry(name: &str, key: &str) -> String {
        format!(
            "[[key]]\nname = \"{name}\"\nsha256 = \"{}\"\n",
            hex::encode(Sha256::digest(key))
        )
    }

    #[test]
    fn keys_admit_by_name_and_rotate_when_the_file_changes() {
        let (access, file) = access(&entry("ops", "s3cret-one"), "");
        let admitted = |key: &str| access.admit(None, Some(format!("Bearer {key}").as_bytes()));
        assert_eq!(
            admitted("s3cret-one"),
            Admission::Admitted {
                caller: "key:ops".into()
            }
        );
        assert!(matches!(admitted("wrong"), Admission::Denied { .. }));
        assert_eq!(access.admit(None, None), Admission::Unauthenticated);
        assert!(matches!(
            access.admit(None, Some(b"Basic abc")),
            Admission::Unauthenticated
        ));
        std::fs::write(file.path(), entry("ops-2", "s3cret-two")).unwrap();
        assert!(access.reload());
        assert!(matches!(admitted("s3cret-one"), Admission::Denied { .. }));
        assert!(matches!(admitted("s3cret-two"), Admission::Admitted { .. }));
        // A broken file keeps the keys in force.
        std::fs::write(file.path(), "[[key]]\nname = 1\n").unwrap();
        assert!(!access.reload());
        assert!(matches!(admitted("s3cret-two"), Admission::Admitted { .. }));
    }

    fn certificate(dns: &[&str], uris: &[&str]) -> CertificateDer<'static> {
        use rcgen::{CertificateParams, KeyPair, SanType};
        let mut params = CertificateParams::default();
        for name in dns {
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into().unwrap()));
        }
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn sans_match_only_their_own_type() {
        let (access, _file) = access(
            "",
            "spiffe://example.org/ns/ops/sa/admin, Admin.Example.org, urn:example:ops-console",
        );
        let admit = |dns: &[&str], uris: &[&str]| access.admit(Some(&certificate(dns, uris)), None);
        // A URI without `//` (a URN) is a URI too.
        assert_eq!(
            admit(&[], &["urn:example:ops-console"]),
            Admission::Admitted {
                caller: "uri:urn:example:ops-console".into()
            }
        );
        assert_eq!(
            admit(&[], &["spiffe://example.org/ns/ops/sa/admin"]),
            Admission::Admitted {
                caller: "uri:spiffe://example.org/ns/ops/sa/admin".into()
            }
        );
        assert_eq!(
            admit(&["admin.example.org."], &[]),
            Admission::Admitted {
                caller: "dns:admin.example.org".into()
            }
        );
        // A DNS name spelled like the SPIFFE ID, and a URI spelled like the DNS name: refused.
        assert!(matches!(
            admit(&["spiffe://example.org/ns/ops/sa/admin"], &[]),
            Admission::Denied { .. }
        ));
        assert!(matches!(
            admit(&[], &["admin.example.org"]),
            Admission::Denied { .. }
        ));
    }

    #[test]
    fn a_deleted_keys_file_admits_no_key() {
        let (access, file) = access(&entry("ops", "s3cret-one"), "");
        let admitted = || access.admit(None, Some(b"Bearer s3cret-one"));
        assert!(matches!(admitted(), Admission::Admitted { .. }));
        std::fs::remove_file(file.path()).unwrap();
        assert!(access.reload());
        assert!(matches!(admitted(), Admission::Denied { .. }));
    }

    /// Review found: `cat new > keys.toml` truncates the file first, and a reload in between
    /// read it as no keys — every operator locked out. Now an empty file keeps the keys in force
    /// until the new content is there.
    #[test]
    fn a_file_rewritten_in_place_locks_nobody_out() {
        let (access, file) = access(&entry("ops", "s3cret-one"), "");
        let admitted = |key: &str| {
            let header = format!("Bearer {key}");
            matches!(
                access.admit(None, Some(header.as_bytes())),
                Admission::Admitted { .. }
            )
        };
        assert!(admitted("s3cret-one"));
        std::fs::write(file.path(), "").unwrap();
        assert!(!access.reload());
        assert!(admitted("s3cret-one"), "the truncated file keeps the keys");
        std::fs::write(file.path(), "\n  \n").unwrap();
        assert!(!access.reload());
        assert!(admitted("s3cret-one"));
        std::fs::write(file.path(), entry("ops", "s3cret-two")).unwrap();
        assert!(access.reload());
        assert!(admitted("s3cret-two") && !admitted("s3cret-one"));
    }

    /// Review found: a missing keys file stopped startup (exit 2), so pods whose optional Secret
    /// was absent crash-looped, while README said a missing file admits no key. Now it admits
    /// none, says so, and the keys are read once the file appears.
    #[test]
    fn a_missing_keys_file_at_startup_admits_none_until_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let settings = AdminSettings {
            api_keys_file: Some(path.clone()),
            ..AdminSettings::default()
        };
        let access = Access::from_settings(&settings).unwrap().unwrap();
        let admitted = || {
            matches!(
                access.admit(None, Some(b"Bearer s3cret-one")),
                Admission::Admitted { .. }
            )
        };
        assert!(!admitted());
        assert!(!access.reload());
        std::fs::write(&path, entry("ops", "s3cret-one")).unwrap();
        assert!(access.reload());
        assert!(admitted());
    }

    #[test]
    fn a_bad_keys_file_is_refused_at_startup() {
        for bad in [
            "[[key]]\nname = \"a\"\nsha256 = \"ABC\"\n",
            "[[key]]\nname = \"a\"\nsha256 = \"abc\"\nkey = \"plain\"\n",
            &format!("{}{}", entry("a", "x"), entry("a", "y")),
        ] {
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), bad).unwrap();
            let settings = AdminSettings {
                api_keys_file: Some(file.path().to_owned()),
                ..AdminSettings::default()
            };
            assert!(Access::from_settings(&settings).is_err(), "{bad}");
        }
    }
}
