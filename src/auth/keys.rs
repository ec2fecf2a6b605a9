//! The signing keys of session tokens, held in memory: a token whose MAC does not check under
//! the key it names is refused before any lookup, so a made-up token costs nothing but the MAC.
//!
//! Keys live in PostgreSQL (`token_keys`); every instance reloads them every
//! [`KEY_REFRESH`], and the first to find the newest older than `TOKENS__KEY_ROTATION` less
//! [`KEY_LEAD`] makes the next, which activates [`KEY_LEAD`] later — by then every running
//! instance has loaded it, so a token is never minted under a key another instance does not
//! know. (An instance cut off from PostgreSQL for longer still learns a newer key from the first
//! token that names one: it reloads, at most once per [`RELOAD_GAP`] whatever the tokens say.)
//! A key verifies tokens until `SESSION__ABSOLUTE_TIMEOUT` after its successor activated: every
//! session it minted has reached its absolute expiry by then.
//!
//! Tokens of an earlier release carry no MAC ([`Proof::Legacy`]): they are looked up while a
//! live session without a key exists (`store::KeyState::legacy_until`: their remaining
//! lifetime) and before `TOKENS__LEGACY_UNTIL`; a miss of one is an unknown lookup, paid from
//! the caller's budget (`limits`).
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};

use super::{
    AuthError,
    token::{Proof, SigningKey, Token, TokenHash},
};
use crate::{clock::Clock, config::TokenSettings, store::Db};

/// How often every instance reloads the keys (and makes the next when due).
pub const KEY_REFRESH: Duration = Duration::from_secs(60);
/// How long a new key waits before tokens are minted under it: many reloads.
pub const KEY_LEAD: Duration = Duration::from_secs(10 * 60);
/// A token naming a key this instance does not know (or of an earlier release, while none is
/// known to live) makes it reload at most this often.
const RELOAD_GAP: Duration = Duration::from_secs(5);

/// A token that passed the check.
#[derive(Debug, Clone, Copy)]
pub struct Checked {
    pub hash: TokenHash,
    /// Minted by authd (its MAC checked); `false` for a token of an earlier release, whose
    /// lookups that find nothing are paid from the caller's budget.
    pub proven: bool,
}

struct Key {
    key: SigningKey,
    activates_at: DateTime<Utc>,
    /// Tokens under it are refused from then on (its successor's activation plus the absolute
    /// session lifetime).
    retires_at: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct Ring {
    keys: BTreeMap<u32, Key>,
    legacy_until: Option<DateTime<Utc>>,
}

pub struct TokenKeys {
    ring: RwLock<Arc<Ring>>,
    db: Arc<Db>,
    clock: Arc<Clock>,
    settings: TokenSettings,
    absolute_timeout: Duration,
    /// When a token last made this instance reload, and whether the reload succeeded.
    reloaded: tokio::sync::Mutex<Option<(Instant, bool)>>,
    /// Whether the legacy window's end was logged.
    legacy_ended: Mutex<bool>,
}

impl TokenKeys {
    pub fn new(
        db: Arc<Db>,
        clock: Arc<Clock>,
        settings: TokenSettings,
        absolute_timeout: Duration,
    ) -> Self {
        Self {
            ring: RwLock::new(Arc::new(Ring::default())),
            db,
            clock,
            settings,
            absolute_timeout,
            reloaded: tokio::sync::Mutex::new(None),
            legacy_ended: Mutex::new(false),
        }
    }

    fn ring(&self) -> Arc<Ring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes the next key when due, deletes keys no token can name any more, and reloads.
    /// Startup runs it before serving, so there is always a key to mint with.
    pub async fn refresh(&self) -> Result<(), AuthError> {
        let repo = self.db.token_keys();
        if repo.rotate(self.settings.key_rotation, KEY_LEAD).await? {
            tracing::info!("made the next token signing key (active in 10 minutes)");
        }
        let purged = repo.purge(self.absolute_timeout).await?;
        if purged > 0 {
            tracing::info!(
                purged,
                "deleted signing keys older than every session they minted"
            );
        }
        self.reload().await
    }

    async fn reload(&self) -> Result<(), AuthError> {
        let state = self.db.token_keys().load().await?;
        let mut keys = BTreeMap::new();
        let lifetime = chrono::TimeDelta::from_std(self.absolute_timeout).unwrap_or_default();
        let mut successor: Option<DateTime<Utc>> = None;
        for stored in state.keys.into_iter().rev() {
            let Some(key) = u32::try_from(stored.id)
                .ok()
                .and_then(|id| SigningKey::new(id, &stored.secret))
            else {
                tracing::error!(
                    id = stored.id,
                    "a token signing key in PostgreSQL is not 32 bytes; ignored"
                );
                continue;
            };
            keys.insert(
                key.id,
                Key {
                    key,
                    activates_at: stored.activates_at,
                    retires_at: successor.map(|at| at + lifetime),
                },
            );
            successor = Some(stored.activates_at);
        }
        let ring = Ring {
            keys,
            legacy_until: state.legacy_until,
        };
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
        Ok(())
    }

    /// The key to mint with: the newest whose activation has come.
    pub fn minting(&self) -> Result<SigningKey, AuthError> {
        let now = self.clock.now();
        let ring = self.ring();
        ring.keys
            .values()
            .rev()
            .find(|k| k.activates_at <= now)
            .or_else(|| ring.keys.values().next())
            .map(|k| k.key.clone())
            .ok_or_else(|| AuthError::Internal("no token signing key is loaded".into()))
    }

    /// The token's hash, if it passes: minted under a key this instance knows and has not
    /// retired, or (during the transition) of an earlier release. Nothing is looked up unless
    /// the token names a key newer than any known (then the keys are reloaded, at most once per
    /// [`RELOAD_GAP`]).
    pub async fn check(&self, token: &str) -> Result<Checked, AuthError> {
        let token = Token::parse(token).ok_or(AuthError::InvalidSession)?;
        let key_id = match token.proof {
            Proof::Legacy => return self.legacy(token.hash).await,
            Proof::Minted { key_id, .. } => key_id,
        };
        let mut ring = self.ring();
        if !ring.keys.contains_key(&key_id)
            && ring
                .keys
                .keys()
                .next_back()
                .is_none_or(|newest| key_id > *newest)
            && self.reload_for_unknown_key().await?
        {
            ring = self.ring();
        }
        let now = self.clock.now();
        match ring.keys.get(&key_id) {
            Some(key) if token.minted_by(&key.key) && key.retires_at.is_none_or(|at| now < at) => {
                Ok(Checked {
                    hash: token.hash,
                    proven: true,
                })
            }
            _ => Err(AuthError::InvalidSession),
        }
    }

    /// Reloads unless a token made it do so within [`RELOAD_GAP`]; whether it did. While the
    /// last reload failed, the answer is that error (UNAVAILABLE), never "no such key": the
    /// token may be valid.
    async fn reload_for_unknown_key(&self) -> Result<bool, AuthError> {
        let mut last = self.reloaded.lock().await;
        if let Some((at, succeeded)) = *last
            && at.elapsed() < RELOAD_GAP
        {
            return match succeeded {
                true => Ok(false),
                false => Err(AuthError::Store(crate::store::StoreError::Unavailable(
                    None,
                ))),
            };
        }
        // Stamped before: a reload cut short counts as failed, and the gap holds.
        *last = Some((Instant::now(), false));
        let reloaded = crate::store::in_background(self.reload()).await;
        *last = Some((Instant::now(), reloaded.is_ok()));
        reloaded.map(|()| true)
    }

    /// A token of an earlier release: looked up while a live session may have one. The window
    /// is read with the keys; a closed one is read again (at most once per [`RELOAD_GAP`]) in
    /// case an instance of the earlier release made such a session since.
    async fn legacy(&self, hash: TokenHash) -> Result<Checked, AuthError> {
        let configured_open = || {
            self.settings
                .legacy_until
                .is_none_or(|until| self.clock.now() < until)
        };
        let open = |ring: &Ring| {
            ring.legacy_until
                .is_some_and(|until| self.clock.now() < until)
                && configured_open()
        };
        let mut ring = self.ring();
        if !open(&ring) && configured_open() && self.reload_for_unknown_key().await? {
            ring = self.ring();
        }
        if !open(&ring) {
            let mut logged = self.legacy_ended.lock().unwrap_or_else(|e| e.into_inner());
            if !*logged {
                *logged = true;
                tracing::info!(
                    "a token of an earlier release (no key id) was refused: their transition is \
                     over (no live session has one, or TOKENS__LEGACY_UNTIL passed)"
                );
            }
            return Err(AuthError::InvalidSession);
        }
        Ok(Checked {
            hash,
            proven: false,
        })
    }
}
