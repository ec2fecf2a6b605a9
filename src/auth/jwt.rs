//! Short-lived JWTs minted from a session (`IssueJwt`), for services that verify a credential
//! offline with a standard library, and the keys that sign them, published as a JWKS.
//!
//! Keys live in PostgreSQL (`jwt_keys`) and rotate as the session tokens' keys do (`keys`):
//! every instance reloads them every [`KEY_REFRESH`]; the first to find the newest key of
//! `JWT__ALGORITHM` older than `JWT__KEY_ROTATION` less [`KEY_LEAD`] (or none) makes the next.
//! The newest active key signs, whatever its algorithm. A new key is published at once and signs only [`KEY_LEAD`] later: every instance
//! has loaded it by then, and every verifier that refreshes its copy of the JWKS as often as the
//! document's `Cache-Control` asks ([`JWKS_MAX_AGE`]) holds it before a JWT names it. A key is
//! published until `JWT__MAX_TTL` (plus [`SKEW`]) after its successor began signing: every JWT
//! it signed has expired by then.
//!
//! A revoked session mints nothing (the session is validated as `ValidateSession` does, under
//! the same guarantee); a JWT minted before the revocation lives until its `exp`, which a
//! verifier closes by denying the JWT's `sid` from the event stream (README "Short-lived JWTs").
use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, TimeDelta, Utc};
use jsonwebtoken::{
    Algorithm, EncodingKey, Header,
    jwk::{
        AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
        EllipticCurveKeyType, Jwk, JwkSet, KeyAlgorithm, OctetKeyPairParameters, OctetKeyPairType,
        PublicKeyUse,
    },
};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair},
};
use serde::Serialize;

use super::{
    AuthError, AuthService,
    input::{FieldViolation, Violations},
    keys::{KEY_LEAD, KEY_REFRESH},
};
use crate::{
    clock::Clock,
    config::{JwtAlgorithm, JwtSettings},
    store::{Db, NewJwtKey, StoredJwtKey},
};

/// How long a verifier may keep its copy of the JWKS (`Cache-Control: max-age`): less than
/// [`KEY_LEAD`] less [`KEY_REFRESH`], so a new key reaches every verifier before it signs.
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(5 * 60);
const _: () = assert!(JWKS_MAX_AGE.as_secs() + KEY_REFRESH.as_secs() < KEY_LEAD.as_secs());

/// Added to a key's publication beyond the last `exp` it signed: verifiers' clocks differ.
pub const SKEW: Duration = Duration::from_secs(60);

/// A JWT as IssueJwt returns it.
pub struct MintedJwt {
    pub jwt: String,
    pub expires_at: DateTime<Utc>,
}

/// The claims of a minted JWT.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    /// The user's id.
    sub: String,
    aud: &'a str,
    /// The session's id: what the event stream names when the session is revoked.
    sid: String,
    /// When the session was created (seconds, rounded down): `SessionsRevoked` revokes the
    /// user's sessions created at or before its cutoff.
    sid_iat: i64,
    iat: i64,
    exp: i64,
    jti: String,
}

struct SigningKey {
    kid: String,
    algorithm: Algorithm,
    encoding: EncodingKey,
    jwk: Jwk,
    activates_at: DateTime<Utc>,
    /// Published until then (`None`: no successor signs yet).
    retires_at: Option<DateTime<Utc>>,
}

pub struct JwtKeys {
    keys: RwLock<Arc<Vec<SigningKey>>>,
    db: Arc<Db>,
    clock: Arc<Clock>,
    settings: JwtSettings,
}

/// A new key pair: its PKCS#8 document.
fn generate(algorithm: JwtAlgorithm) -> Result<Vec<u8>, AuthError> {
    let rng = SystemRandom::new();
    let document = match algorithm {
        JwtAlgorithm::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng),
        JwtAlgorithm::ES256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng),
    }
    .map_err(|_| AuthError::Internal("could not generate a JWT signing key".into()))?;
    Ok(document.as_ref().to_vec())
}

/// The stored key, ready to sign and to publish; `None` when it does not parse.
fn parse(stored: &StoredJwtKey, retires_at: Option<DateTime<Utc>>) -> Option<SigningKey> {
    let kid = stored.id.to_string();
    let common = |algorithm| CommonParameters {
        public_key_use: Some(PublicKeyUse::Signature),
        key_algorithm: Some(algorithm),
        key_id: Some(kid.clone()),
        ..CommonParameters::default()
    };
    let (algorithm, encoding, jwk) = match stored.algorithm.as_str() {
        "EdDSA" => {
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&stored.private_key).ok()?;
            let jwk = Jwk {
                common: common(KeyAlgorithm::EdDSA),
                algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                    key_type: OctetKeyPairType::OctetKeyPair,
                    curve: EllipticCurve::Ed25519,
                    x: URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
                }),
            };
            let encoding = EncodingKey::from_ed_der(&stored.private_key);
            (Algorithm::EdDSA, encoding, jwk)
        }
        "ES256" => {
            let pair = EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &stored.private_key,
                &SystemRandom::new(),
            )
            .ok()?;
            // The uncompressed point: 0x04, x, y.
            let point = pair.public_key().as_ref();
            let (x, y) = point.get(1..)?.split_at_checked(32)?;
            let jwk = Jwk {
                common: common(KeyAlgorithm::ES256),
                algorithm: AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                    key_type: EllipticCurveKeyType::EC,
                    curve: EllipticCurve::P256,
                    x: URL_SAFE_NO_PAD.encode(x),
                    y: URL_SAFE_NO_PAD.encode(y),
                }),
            };
            let encoding = EncodingKey::from_ec_der(&stored.private_key);
            (Algorithm::ES256, encoding, jwk)
        }
        _ => return None,
    };
    Some(SigningKey {
        kid,
        algorithm,
        encoding,
        jwk,
        activates_at: stored.activates_at,
        retires_at,
    })
}

impl JwtKeys {
    pub fn new(db: Arc<Db>, clock: Arc<Clock>, settings: JwtSettings) -> Self {
        Self {
            keys: RwLock::new(Arc::new(Vec::new())),
            db,
            clock,
            settings,
        }
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    fn keys(&self) -> Arc<Vec<SigningKey>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How long a key stays published after its successor began signing.
    fn publication_after_successor(&self) -> Duration {
        self.settings.max_ttl + SKEW
    }

    /// Makes the next key when due, deletes keys no JWT can name any more, and reloads; nothing
    /// when JWTs are off. Startup runs it before serving, so there is always a key to sign with.
    pub async fn refresh(&self) -> Result<(), AuthError> {
        if !self.settings.enabled {
            return Ok(());
        }
        let repo = self.db.jwt_keys();
        let private_key = generate(self.settings.algorithm)?;
        let key = NewJwtKey {
            algorithm: self.settings.algorithm.name(),
            private_key: &private_key,
        };
        if let Some(activates_at) = repo
            .rotate(key, self.settings.key_rotation, KEY_LEAD)
            .await?
        {
            tracing::info!(
                algorithm = self.settings.algorithm.name(),
                %activates_at,
                "made the next JWT signing key (published now, signing from activates_at)"
            );
        }
        let purged = repo.purge(self.publication_after_successor()).await?;
        if purged > 0 {
            tracing::info!(
                purged,
                "deleted JWT signing keys older than every JWT they signed"
            );
        }
        self.reload().await
    }

    async fn reload(&self) -> Result<(), AuthError> {
        let stored = self.db.jwt_keys().load().await?;
        let after = TimeDelta::from_std(self.publication_after_successor()).unwrap_or_default();
        let mut keys = Vec::with_capacity(stored.len());
        let mut successor: Option<DateTime<Utc>> = None;
        for key in stored.iter().rev() {
            match parse(key, successor.map(|at| at + after)) {
                Some(parsed) => keys.push(parsed),
                None => tracing::error!(
                    id = key.id,
                    algorithm = %key.algorithm,
                    "a JWT signing key in PostgreSQL does not parse; ignored"
                ),
            }
            successor = Some(key.activates_at);
        }
        keys.reverse();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(())
    }

    /// The published keys: every loaded key not retired, those that do not sign yet included.
    pub fn jwks(&self) -> Result<JwkSet, AuthError> {
        if !self.settings.enabled {
            return Err(AuthError::NotEnabled("JWTs"));
        }
        let now = self.clock.now();
        let keys = self.keys();
        Ok(JwkSet {
            keys: keys
                .iter()
                .filter(|k| k.retires_at.is_none_or(|at| now < at))
                .map(|k| k.jwk.clone())
                .collect(),
        })
    }

    /// The audience and lifetime a caller asked for, checked against the settings.
    fn request(
        &self,
        audience: &str,
        ttl: Option<Duration>,
    ) -> Result<(&str, Duration), Vec<FieldViolation>> {
        let mut v = Violations::default();
        let audience = v.check(
            "audience",
            match self.settings.audiences.iter().find(|a| *a == audience) {
                Some(found) => Ok(found.as_str()),
                None if audience.is_empty() => Err("is required".to_owned()),
                None => Err("is not one of the audiences this server mints for \
                             (JWT__AUDIENCES)"
                    .to_owned()),
            },
        );
        let max = self.settings.max_ttl;
        let ttl = v.check(
            "ttl",
            match ttl {
                None => Ok(max),
                Some(ttl) if ttl >= Duration::from_secs(1) && ttl <= max => Ok(ttl),
                Some(_) => Err(format!(
                    "must be at least 1s and at most {}s (JWT__MAX_TTL)",
                    max.as_secs()
                )),
            },
        );
        v.finish(|| Some((audience?, ttl?)))
    }

    /// A JWT for the session, from `now` (taken before the session was validated).
    fn sign(
        &self,
        view: &super::SessionView,
        audience: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<MintedJwt, AuthError> {
        let keys = self.keys();
        let key = keys
            .iter()
            .rev()
            .find(|k| k.activates_at <= now)
            .or_else(|| keys.first())
            .ok_or_else(|| AuthError::Internal("no JWT signing key is loaded".into()))?;
        let wanted = now + TimeDelta::from_std(ttl).unwrap_or_default();
        // A JWT never outlives its session's current deadline.
        let expires_at = wanted.min(view.expires_at);
        let record = &view.record;
        let claims = Claims {
            iss: &self.settings.issuer,
            sub: record.user_id.to_string(),
            aud: audience,
            sid: record.id.to_string(),
            sid_iat: record.created_at.timestamp(),
            iat: now.timestamp(),
            exp: expires_at.timestamp(),
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let mut header = Header::new(key.algorithm);
        header.kid = Some(key.kid.clone());
        let jwt = jsonwebtoken::encode(&header, &claims, &key.encoding)
            .map_err(|e| AuthError::Internal(format!("could not sign a JWT: {e}")))?;
        Ok(MintedJwt {
            jwt,
            // What the JWT says (whole seconds).
            expires_at: DateTime::from_timestamp(claims.exp, 0).unwrap_or(expires_at),
        })
    }
}

impl AuthService {
    /// A JWT for the session of `token`, for `audience`, living `ttl` (`JWT__MAX_TTL` when
    /// `None`) or until the session's deadline if that comes first. Refused as ValidateSession
    /// refuses: a revoked or expired session mints nothing.
    pub async fn issue_jwt(
        &self,
        token: &str,
        audience: &str,
        ttl: Option<Duration>,
    ) -> Result<MintedJwt, AuthError> {
        if !self.jwt.enabled() {
            return Err(AuthError::NotEnabled("JWTs"));
        }
        let (audience, ttl) = self
            .jwt
            .request(audience, ttl)
            .map_err(AuthError::InvalidInput)?;
        // Read before the validation: the JWT's life is counted from a moment the session was
        // valid at, never from after a revocation that ran meanwhile.
        let now = self.clock.now();
        let view = self.validate(token).await?;
        self.jwt.sign(&view, audience, ttl, now)
    }

    /// The JWKS: the keys JWTs are verified with.
    pub fn jwks(&self) -> Result<JwkSet, AuthError> {
        self.jwt.jwks()
    }
}
