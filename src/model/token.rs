//! Session tokens: 256 bits from the OS CSPRNG, shown to the client once as
//! `authd_<43 base64url characters>`. Only their SHA-256 ([`TokenHash`]) is ever stored, so a
//! leak of PostgreSQL or Redis does not leak usable tokens.
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

pub const TOKEN_PREFIX: &str = "authd_";
const TOKEN_BYTES: usize = 32;
/// 32 bytes in unpadded base64.
const ENCODED_LEN: usize = 43;

/// SHA-256 of a token: the only form in which tokens are stored or used as keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({}…)", &self.to_hex()[..8])
    }
}

impl TokenHash {
    /// Checks the token's shape without any I/O, so garbage never reaches a store.
    pub fn of_token(token: &str) -> Option<Self> {
        let encoded = token.strip_prefix(TOKEN_PREFIX)?;
        if encoded.len() != ENCODED_LEN {
            return None;
        }
        let mut raw = [0u8; TOKEN_BYTES];
        match URL_SAFE_NO_PAD.decode_slice(encoded, &mut raw) {
            Ok(TOKEN_BYTES) => Some(Self(Sha256::digest(token.as_bytes()).into())),
            _ => None,
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The 32 bytes themselves (the in-process caches' key).
    pub fn key(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// A new random token and its hash.
pub fn generate() -> (String, TokenHash) {
    let mut raw = [0u8; TOKEN_BYTES];
    // The OS CSPRNG failing is not something a request can recover from.
    getrandom::fill(&mut raw).expect("the operating system's random number generator failed");
    let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw));
    let hash = TokenHash::of_token(&token).expect("a generated token is well-formed");
    (token, hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_well_formed_and_distinct() {
        let (a, ha) = generate();
        let (b, hb) = generate();
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + ENCODED_LEN);
        assert_ne!(a, b);
        assert_ne!(ha, hb);
        assert_eq!(TokenHash::of_token(&a), Some(ha));
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let (good, _) = generate();
        let body = &good[TOKEN_PREFIX.len()..];
        for bad in [
            String::new(),
            "authd_".to_owned(),
            body.to_owned(),
            format!("other_{body}"),
            format!("{good}A"),
            good[..good.len() - 1].to_owned(),
            format!("authd_{}!", &body[..42]),
            format!("authd_{}=", &body[..42]),
        ] {
            assert_eq!(TokenHash::of_token(&bad), None, "{bad:?}");
        }
    }
}
