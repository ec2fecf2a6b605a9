//! Short-lived JWTs minted from a session (`IssueJwt`), for services that verify a credential
//! offline with a standard library, and the keys that sign them, published as a JWKS.
//!
//! Keys live in PostgreSQL (`jwt_keys`) and rotate as the session tokens' keys do (`keys`):
//! every instance reloads them every [`KEY_REFRESH`]; the first to find the newest key of
//! `JWT__ALGORITHM` older than `JWT__KEY_ROTATION` less [`KEY_LEAD`] (or none) makes the next.
//! A new key is published at once and signs only [`KEY_LEAD`] later; the newest key that has
//! activated signs, whatever its algorithm.
//!
//! - **Published before it signs.** An instance answers the JWKS only while its last successful
//!   reload is younger than [`JWKS_FRESH`], and says `Cache-Control: max-age` [`JWKS_MAX_AGE`]:
//!   a verifier's copy is then never older than [`KEY_LEAD`] less [`SKEW`] behind PostgreSQL,
//!   so it holds every key before the key signs.
//! - **Signs only with what every instance publishes.** An instance signs only while its last
//!   successful reload is younger than [`KEY_LEAD`] less [`SKEW`]: no key it does not know can
//!   have activated meanwhile, so it never signs with a key its successor has replaced.
//! - **Published until its JWTs expire.** A key is published until [`MAX_TTL_CEILING`] (the
//!   longest `JWT__MAX_TTL` any instance may have) plus [`SKEW`] after its successor activated,
//!   and deleted a day later at the earliest (`purge_jwt_keys`).
//!
//! A revoked session mints nothing (the session is validated as `ValidateSession` does, under
//! the same guarantee); a JWT minted before the revocation lives until its `exp`, which a
//! verifier closes by denying the JWT's `sid` from the event stream (README "Short-lived JWTs").
use std::{
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, TimeDelta, Utc};
use jsonwebtoken::{
    Algorithm, Header,
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
use sha2::{Digest, Sha256};

use super::{
    AuthError, AuthService,
    input::{FieldViolation, Violations},
    keys::{KEY_LEAD, KEY_REFRESH},
};
use crate::{
    clock::{Clock, boot_us},
    config::{JWT_MAX_TTL_CEILING as MAX_TTL_CEILING, JwtAlgorithm, JwtSettings},
    store::{Db, NewJwtKey, StoreError, StoredJwtKey},
};

/// How long a verifier may keep its copy of the JWKS (`Cache-Control: max-age`).
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(5 * 60);
/// Allowed between the clocks of authd's instances, PostgreSQL and verifiers.
pub const SKEW: Duration = Duration::from_secs(60);
/// An instance answers the JWKS while its last successful reload is younger than this: a copy
/// served then, kept [`JWKS_MAX_AGE`], is at most [`KEY_LEAD`] less [`SKEW`] old.
pub const JWKS_FRESH: Duration =
    Duration::from_secs(KEY_LEAD.as_secs() - JWKS_MAX_AGE.as_secs() - SKEW.as_secs());
const _: () = assert!(JWKS_FRESH.as_secs() >= 3 * KEY_REFRESH.as_secs());
/// An instance signs while its last successful reload is younger than this.
const SIGNING_FRESH: Duration = Duration::from_secs(KEY_LEAD.as_secs() - SKEW.as_secs());

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
    /// When the session was created, in microseconds since the epoch (as exact as the event
    /// stream's cutoffs): `SessionsRevoked` revokes the user's sessions created at or before
    /// its `cutoff`.
    sid_created_us: i64,
    iat: i64,
    exp: i64,
    jti: String,
    /// How the session was authenticated (RFC 8176): `pwd`, and `otp` for a second factor.
    amr: &'static [&'static str],
}

enum Signer {
    Ed25519(Ed25519KeyPair),
    P256(EcdsaKeyPair),
}

struct SigningKey {
    id: i32,
    algorithm: JwtAlgorithm,
    /// The base64url of the JWS header (`alg`, `typ`, `kid`): the same for every JWT of the key.
    header: String,
    signer: Signer,
    jwk: Jwk,
    activates_at: DateTime<Utc>,
    /// When the next key that parses activates (`None`: none yet).
    successor_at: Option<DateTime<Utc>>,
}

impl SigningKey {
    /// Published and used until then: every JWT it signed has expired.
    fn retires_at(&self) -> Option<DateTime<Utc>> {
        let after = TimeDelta::from_std(MAX_TTL_CEILING + SKEW).unwrap_or_default();
        self.successor_at.map(|at| at + after)
    }

    fn retired(&self, now: DateTime<Utc>) -> bool {
        self.retires_at().is_some_and(|at| at <= now)
    }
}

/// The keys as last loaded, and when.
#[derive(Default)]
struct Loaded {
    /// The keys that parse, oldest first.
    keys: Vec<SigningKey>,
    /// The newest id in the table, parsed or not (0: none).
    newest_id: i32,
    /// When the load that made this began ([`boot_us`]).
    at: Option<u64>,
}

pub struct JwtKeys {
    loaded: RwLock<Arc<Loaded>>,
    db: Arc<Db>,
    clock: Arc<Clock>,
    settings: JwtSettings,
    rng: SystemRandom,
    /// The last time a stale reload was logged.
    stale_logged: Mutex<Option<Instant>>,
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

/// The key's RFC 7638 thumbprint (base64url of the SHA-256 of its required members, in
/// lexicographic order): its `kid`, the same wherever the key is, and never another key's.
fn thumbprint(members: &[(&str, &str)]) -> String {
    let json = members
        .iter()
        .map(|(name, value)| format!("\"{name}\":\"{value}\""))
        .collect::<Vec<_>>()
        .join(",");
    URL_SAFE_NO_PAD.encode(Sha256::digest(format!("{{{json}}}")))
}

/// The stored key, ready to sign and to publish; `None` when it does not parse.
fn parse(stored: &StoredJwtKey) -> Option<SigningKey> {
    let algorithm = [JwtAlgorithm::EdDSA, JwtAlgorithm::ES256]
        .into_iter()
        .find(|a| a.name() == stored.algorithm)?;
    let (signer, parameters, kid) = match algorithm {
        JwtAlgorithm::EdDSA => {
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&stored.private_key).ok()?;
            let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
            let kid = thumbprint(&[("crv", "Ed25519"), ("kty", "OKP"), ("x", &x)]);
            let parameters = AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                key_type: OctetKeyPairType::OctetKeyPair,
                curve: EllipticCurve::Ed25519,
                x,
            });
            (Signer::Ed25519(pair), parameters, kid)
        }
        JwtAlgorithm::ES256 => {
            let pair = EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &stored.private_key,
                &SystemRandom::new(),
            )
            .ok()?;
            // The uncompressed point: 0x04, x, y.
            let (x, y) = pair.public_key().as_ref().get(1..)?.split_at_checked(32)?;
            let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
            let kid = thumbprint(&[("crv", "P-256"), ("kty", "EC"), ("x", &x), ("y", &y)]);
            let parameters = AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                key_type: EllipticCurveKeyType::EC,
                curve: EllipticCurve::P256,
                x,
                y,
            });
            (Signer::P256(pair), parameters, kid)
        }
    };
    let (header_algorithm, key_algorithm) = match algorithm {
        JwtAlgorithm::EdDSA => (Algorithm::EdDSA, KeyAlgorithm::EdDSA),
        JwtAlgorithm::ES256 => (Algorithm::ES256, KeyAlgorithm::ES256),
    };
    let mut header = Header::new(header_algorithm);
    header.kid = Some(kid.clone());
    let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).ok()?);
    let jwk = Jwk {
        common: CommonParameters {
            public_key_use: Some(PublicKeyUse::Signature),
            key_algorithm: Some(key_algorithm),
            key_id: Some(kid),
            ..CommonParameters::default()
        },
        algorithm: parameters,
    };
    Some(SigningKey {
        id: stored.id,
        algorithm,
        header,
        signer,
        jwk,
        activates_at: stored.activates_at,
        successor_at: None,
    })
}

impl JwtKeys {
    pub fn new(db: Arc<Db>, clock: Arc<Clock>, settings: JwtSettings) -> Self {
        Self {
            loaded: RwLock::new(Arc::new(Loaded::default())),
            db,
            clock,
            settings,
            rng: SystemRandom::new(),
            stale_logged: Mutex::new(None),
        }
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The keys, if the last successful reload is younger than `fresh`; UNAVAILABLE otherwise
    /// (a key this instance has not loaded may be in use).
    fn keys(&self, fresh: Duration) -> Result<Arc<Loaded>, AuthError> {
        let loaded = self.loaded();
        let age = |at: u64| Duration::from_micros(boot_us().saturating_sub(at));
        if loaded.at.is_some_and(|at| age(at) < fresh) {
            return Ok(loaded);
        }
        let mut logged = self.stale_logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.is_none_or(|at| at.elapsed() > KEY_REFRESH) {
            *logged = Some(Instant::now());
            tracing::error!(
                "the JWT signing keys could not be reloaded from PostgreSQL for too long: \
                 IssueJwt and the JWKS answer UNAVAILABLE until a reload succeeds"
            );
        }
        Err(AuthError::Store(StoreError::Unavailable(None)))
    }

    /// Reloads, makes the next key when due, deletes keys no JWT can name any more, and
    /// reloads again if it changed anything; nothing when JWTs are off. Startup runs it before
    /// serving, so there is always a key to sign with.
    pub async fn refresh(&self) -> Result<(), AuthError> {
        if !self.settings.enabled {
            return Ok(());
        }
        // The decisions are made on what loaded (a reload that failed leaves the last view).
        let reloaded = self.reload().await;
        match self.maintain().await {
            Ok(true) => self.reload().await,
            Ok(false) => reloaded,
            Err(error) => Err(error),
        }
    }

    /// Whether it made or deleted a key.
    async fn maintain(&self) -> Result<bool, AuthError> {
        let repo = self.db.jwt_keys();
        let loaded = self.loaded();
        let now = self.clock.now();
        let configured = self.settings.algorithm.name();
        let young = TimeDelta::from_std(self.settings.key_rotation.saturating_sub(KEY_LEAD))
            .unwrap_or_default();
        // Due when no key of the configured algorithm that parses is younger than the rotation
        // less the lead (a key that does not parse is no key).
        let due = !loaded
            .keys
            .iter()
            .any(|k| k.algorithm == self.settings.algorithm && k.activates_at + young > now);
        let mut changed = false;
        if due {
            let private_key = generate(self.settings.algorithm)?;
            let key = NewJwtKey {
                algorithm: configured,
                private_key: &private_key,
            };
            if let Some(activates_at) = repo.rotate(key, loaded.newest_id, KEY_LEAD).await? {
                changed = true;
                tracing::info!(
                    algorithm = configured,
                    %activates_at,
                    "made the next JWT signing key (published now, signing from activates_at)"
                );
            }
        }
        // Only keys a key that parses retired, and only once their JWTs have expired.
        let retired: Vec<i32> = loaded
            .keys
            .iter()
            .filter(|k| k.retired(now))
            .map(|k| k.id)
            .collect();
        let purged = repo.purge(&retired, MAX_TTL_CEILING + SKEW).await?;
        if purged > 0 {
            changed = true;
            tracing::info!(
                purged,
                "deleted JWT signing keys older than every JWT they signed"
            );
        }
        Ok(changed)
    }

    async fn reload(&self) -> Result<(), AuthError> {
        // Stamped before the query: the keys are at least this fresh.
        let at = boot_us();
        let stored = self.db.jwt_keys().load().await?;
        let mut keys = Vec::with_capacity(stored.len());
        // Only a key that parses retires its predecessor: one that does not is never used.
        let mut successor: Option<DateTime<Utc>> = None;
        for key in stored.iter().rev() {
            match parse(key) {
                Some(mut parsed) => {
                    parsed.successor_at = successor;
                    successor = Some(parsed.activates_at);
                    keys.push(parsed);
                }
                None => tracing::error!(
                    id = key.id,
                    algorithm = %key.algorithm,
                    "a JWT signing key in PostgreSQL does not parse; ignored"
                ),
            }
        }
        keys.reverse();
        let loaded = Loaded {
            keys,
            newest_id: stored.last().map_or(0, |k| k.id),
            at: Some(at),
        };
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        Ok(())
    }

    /// The published keys: every loaded key not retired, those that do not sign yet included.
    pub fn jwks(&self) -> Result<JwkSet, AuthError> {
        if !self.settings.enabled {
            return Err(AuthError::NotEnabled("JWTs"));
        }
        let now = self.clock.now();
        let loaded = self.keys(JWKS_FRESH)?;
        Ok(JwkSet {
            keys: loaded
                .keys
                .iter()
                .filter(|k| !k.retired(now))
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
        let loaded = self.keys(SIGNING_FRESH)?;
        // The newest that activated (within the clocks' skew: the first key of a new database
        // activates at PostgreSQL's now, which this instance may read a hair behind).
        let skew = TimeDelta::from_std(SKEW).unwrap_or_default();
        let usable = || loaded.keys.iter().rev().filter(|k| !k.retired(now));
        let key = usable()
            .find(|k| k.activates_at <= now)
            .or_else(|| usable().find(|k| k.activates_at <= now + skew))
            .ok_or_else(|| AuthError::Internal("no JWT signing key is active".into()))?;
        let wanted = now + TimeDelta::from_std(ttl).unwrap_or_default();
        // A JWT never outlives its session's current deadline; one that would expire within
        // the second is not worth minting (the session is as good as expired).
        let expires_at = wanted.min(view.expires_at);
        if expires_at.timestamp() <= now.timestamp() {
            return Err(AuthError::InvalidSession);
        }
        let record = &view.record;
        let claims = Claims {
            iss: &self.settings.issuer,
            sub: record.user_id.to_string(),
            aud: audience,
            sid: record.id.to_string(),
            sid_created_us: record.created_at.timestamp_micros(),
            iat: now.timestamp(),
            exp: expires_at.timestamp(),
            jti: uuid::Uuid::new_v4().to_string(),
            amr: if record.aal >= 2 {
                &["pwd", "otp"]
            } else {
                &["pwd"]
            },
        };
        let claims_json = serde_json::to_vec(&claims)
            .map_err(|e| AuthError::Internal(format!("could not write a JWT's claims: {e}")))?;
        let mut jwt = format!("{}.{}", key.header, URL_SAFE_NO_PAD.encode(claims_json));
        let failed = |_| AuthError::Internal("could not sign a JWT".into());
        let signature = match &key.signer {
            Signer::Ed25519(pair) => pair.sign(jwt.as_bytes()).as_ref().to_vec(),
            // The fixed encoding is JWS's: r and s, 32 bytes each.
            Signer::P256(pair) => pair
                .sign(&self.rng, jwt.as_bytes())
                .map_err(failed)?
                .as_ref()
                .to_vec(),
        };
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut jwt);
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
        // Read before the validation: the JWT's life is counted from a moment the session was
        // valid at, never from after a revocation that ran meanwhile.
        let now = self.clock.now();
        let view = self.validate(token).await?;
        // Checked after the token: who holds no session learns nothing of the audiences.
        let (audience, ttl) = self
            .jwt
            .request(audience, ttl)
            .map_err(AuthError::InvalidInput)?;
        self.jwt.sign(&view, audience, ttl, now)
    }

    /// The JWKS: the keys JWTs are verified with.
    pub fn jwks(&self) -> Result<JwkSet, AuthError> {
        self.jwt.jwks()
    }
}
