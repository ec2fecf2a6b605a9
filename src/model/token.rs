//! Session tokens: 256 bits from the OS CSPRNG, shown to the client once, and only their
//! SHA-256 ([`TokenHash`]) is ever stored, so a leak of PostgreSQL or Redis does not leak usable
//! tokens.
//!
//! A token carries proof that authd minted it: `authd_<43 base64url characters>.<key id>.<22
//! base64url characters>`, the last part a MAC (HMAC-SHA256, cut to 128 bits) of everything
//! before it under the signing key `<key id>`. A made-up token is refused by that check alone,
//! before any lookup, so it costs no PostgreSQL and no Redis work (`auth::keys`). Tokens minted
//! before the keys existed (`authd_<43 characters>`, [`Proof::Legacy`]) are accepted for a
//! bounded transition.
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const TOKEN_PREFIX: &str = "authd_";
const TOKEN_BYTES: usize = 32;
/// 32 bytes in unpadded base64.
const ENCODED_LEN: usize = 43;
/// The MAC is cut to 128 bits: 22 characters of unpadded base64.
const TAG_BYTES: usize = 16;
const TAG_LEN: usize = 22;
/// A key id is a decimal `u32`, without leading zeros.
const KEY_ID_MAX_LEN: usize = 10;

/// SHA-256 of a token: the only form in which tokens are stored or used as keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({}…)", &self.to_hex()[..8])
    }
}

impl TokenHash {
    fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// The hash of a well-formed token (its proof unchecked).
    pub fn of_token(token: &str) -> Option<Self> {
        Token::parse(token).map(|t| t.hash)
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

/// A signing key: its id (in the token) and its secret (never printed).
#[derive(Clone)]
pub struct SigningKey {
    pub id: u32,
    secret: [u8; 32],
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.id)
    }
}

impl SigningKey {
    /// A key of 32 bytes; `None` for any other length.
    pub fn new(id: u32, secret: &[u8]) -> Option<Self> {
        Some(Self {
            id,
            secret: secret.try_into().ok()?,
        })
    }

    /// A new random secret.
    pub fn random_secret() -> [u8; 32] {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret)
            .expect("the operating system's random number generator failed");
        secret
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes a key of any length")
    }

    /// Whether `tag` is this key's MAC of `signed` (in constant time).
    fn verifies(&self, signed: &str, tag: &[u8; TAG_BYTES]) -> bool {
        let mut mac = self.mac();
        mac.update(signed.as_bytes());
        mac.verify_truncated_left(tag).is_ok()
    }
}

/// What a well-formed token says about where it came from; checked by `auth::keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof<'a> {
    /// Minted before signing keys existed: nothing to check without a lookup.
    Legacy,
    /// Minted under key `key_id`: `tag` must be its MAC of `signed`.
    Minted {
        key_id: u32,
        signed: &'a str,
        tag: [u8; TAG_BYTES],
    },
}

/// A token whose shape is right (nothing checked yet but its form): its hash and its proof.
#[derive(Debug, Clone)]
pub struct Token<'a> {
    pub hash: TokenHash,
    pub proof: Proof<'a>,
}

impl<'a> Token<'a> {
    /// Checks the token's shape without any I/O, so garbage never reaches a store.
    pub fn parse(token: &'a str) -> Option<Self> {
        let body = token.strip_prefix(TOKEN_PREFIX)?;
        let proof = match body.split_once('.') {
            None => {
                decode_random(body)?;
                Proof::Legacy
            }
            Some((random, rest)) => {
                decode_random(random)?;
                let (key_id, tag) = rest.split_once('.')?;
                let canonical = !key_id.is_empty()
                    && key_id.len() <= KEY_ID_MAX_LEN
                    && key_id.bytes().all(|b| b.is_ascii_digit())
                    && (key_id == "0" || !key_id.starts_with('0'));
                if !canonical || tag.len() != TAG_LEN {
                    return None;
                }
                let mut raw = [0u8; TAG_BYTES];
                match URL_SAFE_NO_PAD.decode_slice(tag, &mut raw) {
                    Ok(TAG_BYTES) => {}
                    _ => return None,
                }
                Proof::Minted {
                    key_id: key_id.parse().ok()?,
                    signed: &token[..token.len() - TAG_LEN - 1],
                    tag: raw,
                }
            }
        };
        Some(Token {
            hash: TokenHash::of(token),
            proof,
        })
    }

    /// Whether `key` (the key this token names) minted it.
    pub fn minted_by(&self, key: &SigningKey) -> bool {
        match &self.proof {
            Proof::Minted {
                key_id,
                signed,
                tag,
            } => *key_id == key.id && key.verifies(signed, tag),
            Proof::Legacy => false,
        }
    }
}

fn decode_random(encoded: &str) -> Option<()> {
    if encoded.len() != ENCODED_LEN {
        return None;
    }
    let mut raw = [0u8; TOKEN_BYTES];
    match URL_SAFE_NO_PAD.decode_slice(encoded, &mut raw) {
        Ok(TOKEN_BYTES) => Some(()),
        _ => None,
    }
}

/// A new random token minted under `key`, and its hash.
pub fn generate(key: &SigningKey) -> (String, TokenHash) {
    let mut raw = [0u8; TOKEN_BYTES];
    // The OS CSPRNG failing is not something a request can recover from.
    getrandom::fill(&mut raw).expect("the operating system's random number generator failed");
    let signed = format!("{TOKEN_PREFIX}{}.{}", URL_SAFE_NO_PAD.encode(raw), key.id);
    let mut mac = key.mac();
    mac.update(signed.as_bytes());
    let tag = mac.finalize().into_bytes();
    let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&tag[..TAG_BYTES]));
    let hash = TokenHash::of(&token);
    (token, hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u32) -> SigningKey {
        SigningKey::new(id, &SigningKey::random_secret()).unwrap()
    }

    #[test]
    fn minted_tokens_are_well_formed_distinct_and_proven_by_their_key_only() {
        let (k1, k2) = (key(1), key(2));
        let (a, ha) = generate(&k1);
        let (b, hb) = generate(&k1);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_ne!(a, b);
        assert_ne!(ha, hb);
        let parsed = Token::parse(&a).unwrap();
        assert_eq!(parsed.hash, ha);
        assert!(parsed.minted_by(&k1));
        assert!(!parsed.minted_by(&k2), "another key");
        let forged = SigningKey::new(1, &SigningKey::random_secret()).unwrap();
        assert!(
            !parsed.minted_by(&forged),
            "another secret under the same id"
        );
        // Any change of the random part or the tag breaks the proof.
        let mut chars: Vec<char> = a.chars().collect();
        let i = TOKEN_PREFIX.len();
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let flipped: String = chars.into_iter().collect();
        assert!(!Token::parse(&flipped).unwrap().minted_by(&k1));
        let mut chars: Vec<char> = a.chars().collect();
        let i = a.len() - TAG_LEN;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let other_tag: String = chars.into_iter().collect();
        assert!(!Token::parse(&other_tag).unwrap().minted_by(&k1));
    }

    #[test]
    fn legacy_tokens_still_parse() {
        let legacy = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode([7u8; 32]));
        let parsed = Token::parse(&legacy).unwrap();
        assert_eq!(parsed.proof, Proof::Legacy);
        assert!(!parsed.minted_by(&key(1)));
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let (good, _) = generate(&key(12));
        let body = &good[TOKEN_PREFIX.len()..];
        let random = &body[..ENCODED_LEN];
        let tag = &good[good.len() - TAG_LEN..];
        for bad in [
            String::new(),
            "authd_".to_owned(),
            body.to_owned(),
            format!("other_{body}"),
            format!("{good}A"),
            good[..good.len() - 1].to_owned(),
            format!("authd_{}!", &random[..42]),
            format!("authd_{}=", &random[..42]),
            format!("authd_{random}.012.{tag}"),
            format!("authd_{random}..{tag}"),
            format!("authd_{random}.+1.{tag}"),
            format!("authd_{random}.99999999999.{tag}"),
            format!("authd_{random}.1"),
            format!("authd_{random}.1.{tag}.x"),
            format!("authd_{random}.1.{}", &tag[..21]),
        ] {
            assert!(Token::parse(&bad).is_none(), "{bad:?}");
        }
    }
}
