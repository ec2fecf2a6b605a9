//! `JWT__*`: short-lived JWTs minted from a session (`AuthService/IssueJwt`), and the keys that
//! sign them (published as a JWKS).
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{ConfigError, invalid};

/// The signature algorithm of new keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    /// Ed25519 (RFC 8037).
    EdDSA,
    /// ECDSA on P-256 with SHA-256 (RFC 7518).
    ES256,
}

impl JwtAlgorithm {
    /// The name JWS headers and JWKs use (`alg`).
    pub fn name(self) -> &'static str {
        match self {
            Self::EdDSA => "EdDSA",
            Self::ES256 => "ES256",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    /// Whether IssueJwt mints and the JWKS is published (off unless asked for).
    pub enabled: bool,
    /// The algorithm of the keys made from now on (a change takes effect with a new key, made
    /// at once and signing after the lead).
    pub algorithm: JwtAlgorithm,
    /// The `iss` claim.
    pub issuer: String,
    /// The audiences a caller may ask for (`aud`): a comma-separated list.
    #[serde(deserialize_with = "comma_list")]
    pub audiences: Vec<String>,
    /// The longest lifetime of a JWT (and the lifetime of one whose caller asks for none).
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// A new signing key this often.
    #[serde(with = "humantime_serde")]
    pub key_rotation: Duration,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            algorithm: JwtAlgorithm::EdDSA,
            issuer: "authd".into(),
            audiences: Vec::new(),
            max_ttl: Duration::from_secs(5 * 60),
            key_rotation: Duration::from_secs(24 * 3600),
        }
    }
}

/// A comma-separated string (as an environment variable gives it) or a list (TOML).
fn comma_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        One(String),
        Many(Vec<String>),
    }
    let items = match List::deserialize(deserializer)? {
        List::One(joined) => joined.split(',').map(str::to_owned).collect(),
        List::Many(items) => items,
    };
    Ok(items
        .into_iter()
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .collect())
}

/// The longest `JWT__MAX_TTL`: a key stays published this long (and a minute) after its
/// successor began signing, whatever the instances' settings.
pub const MAX_TTL_CEILING: Duration = Duration::from_secs(3600);

/// At most this many audiences, each at most [`MAX_CLAIM`] bytes, as is the issuer.
const MAX_AUDIENCES: usize = 64;
const MAX_CLAIM: usize = 256;

impl JwtSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let printable =
            |s: &str| !s.is_empty() && s.len() <= MAX_CLAIM && !s.chars().any(char::is_control);
        if !printable(&self.issuer) {
            return invalid(
                "JWT__ISSUER",
                "must be 1 to 256 bytes without control characters",
            );
        }
        if self.enabled && self.audiences.is_empty() {
            return invalid(
                "JWT__AUDIENCES",
                "must name at least one audience (comma-separated) when JWT__ENABLED is true",
            );
        }
        if self.audiences.len() > MAX_AUDIENCES || !self.audiences.iter().all(|a| printable(a)) {
            return invalid(
                "JWT__AUDIENCES",
                "must be at most 64 audiences of 1 to 256 bytes without control characters or \
                 commas",
            );
        }
        if !(Duration::from_secs(10)..=MAX_TTL_CEILING).contains(&self.max_ttl) {
            return invalid(
                "JWT__MAX_TTL",
                "must be 10s to 1h: these JWTs are short-lived",
            );
        }
        if self.key_rotation < Duration::from_secs(3600) {
            return invalid("JWT__KEY_ROTATION", "must be at least 1h");
        }
        Ok(())
    }
}
