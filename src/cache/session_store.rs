//! The Redis session store: a copy of each live session keyed by its token hash
//! (`<prefix>session:v1:<sha256>`), a per-user index of the user's token hashes
//! (`<prefix>user_sessions:v1:<user_id>`), and tombstones for revoked sessions.
//!
//! A tombstone is what makes revocation stick: it is written over the cached copy when a session
//! is revoked, and the only write that creates a cached copy (the fill script) refuses to replace
//! one. A validation that read the session from PostgreSQL just before a revocation therefore
//! cannot put it back after the revocation, whichever of the two reaches Redis first.
use std::{sync::LazyLock, time::Duration};

use fred::{prelude::KeysInterface, types::scripts::Script};

use super::Redis;
use crate::{
    auth::{session::SessionRecord, token::TokenHash},
    store::Invalidation,
};

const TOMBSTONE: &str = "revoked";

/// KEYS: session key, user index. ARGV: record JSON, TTL ms, member, index TTL s.
static FILL: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "if redis.call('GET', KEYS[1]) == 'revoked' then return 0 end
         redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
         redis.call('SADD', KEYS[2], ARGV[3])
         redis.call('EXPIRE', KEYS[2], ARGV[4])
         return 1",
    )
});

/// KEYS: session key, user index. ARGV: TTL ms, member.
static BURY: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "redis.call('SET', KEYS[1], 'revoked', 'PX', ARGV[1])
         redis.call('SREM', KEYS[2], ARGV[2])
         return 1",
    )
});

/// What Redis knows about a token.
#[derive(Debug)]
pub enum Cached {
    Hit(SessionRecord),
    Revoked,
    /// Not cached: read PostgreSQL, then fill.
    Miss,
    /// Redis is disabled or did not answer: read PostgreSQL, do not try to fill.
    Unavailable,
}

#[derive(Clone)]
pub struct SessionStore {
    redis: Redis,
    /// Lifetime of the per-user index: no member outlives it.
    index_ttl: Duration,
}

impl SessionStore {
    pub fn new(redis: Redis, absolute_timeout: Duration) -> Self {
        Self {
            redis,
            index_ttl: absolute_timeout,
        }
    }

    fn session_key(&self, hash: &TokenHash) -> Option<String> {
        self.redis.key("session", &hash.to_hex())
    }

    fn index_key(&self, user_id: &uuid::Uuid) -> Option<String> {
        self.redis.key("user_sessions", &user_id.to_string())
    }

    /// One GET; never waits for a disconnected Redis.
    pub async fn get(&self, hash: &TokenHash) -> Cached {
        let cached = match (self.session_key(hash), self.redis.connected()) {
            (Some(key), Some(client)) => {
                match self
                    .redis
                    .observe(client.get::<Option<String>, _>(key).await)
                {
                    None => Cached::Unavailable,
                    Some(None) => Cached::Miss,
                    Some(Some(value)) if value == TOMBSTONE => Cached::Revoked,
                    Some(Some(json)) => match serde_json::from_str(&json) {
                        Ok(record) => Cached::Hit(record),
                        Err(error) => {
                            // Another schema under the same key: treat as absent, it will be
                            // replaced.
                            tracing::warn!(%error, "unreadable cached session; reading PostgreSQL");
                            Cached::Miss
                        }
                    },
                }
            }
            _ => Cached::Unavailable,
        };
        if self.redis.is_enabled() {
            let result = match cached {
                Cached::Hit(_) => "hit",
                Cached::Revoked => "negative",
                Cached::Miss => "miss",
                Cached::Unavailable => "unavailable",
            };
            let lookups = &self.redis.metrics().cache_lookups;
            lookups.with_label_values(&["sessions", result]).inc();
        }
        cached
    }

    /// Caches `record` for `ttl` unless the session was revoked meanwhile (tombstone present).
    pub async fn put(&self, hash: &TokenHash, record: &SessionRecord, ttl: Duration) {
        let (Some(key), Some(index)) = (self.session_key(hash), self.index_key(&record.user_id))
        else {
            return;
        };
        let Some(client) = self.redis.connected() else {
            return;
        };
        let json = match serde_json::to_string(record) {
            Ok(json) => json,
            Err(error) => return tracing::error!(%error, "cannot serialise a session"),
        };
        let args = vec![
            json,
            ttl.as_millis().max(1).to_string(),
            hash.to_hex(),
            self.index_ttl.as_secs().max(1).to_string(),
        ];
        let result = FILL
            .evalsha_with_reload::<i64, _, _>(client, vec![key, index], args)
            .await;
        self.redis.observe(result);
    }

    /// Writes the tombstone of a revoked session. `false` when Redis could not confirm it (the
    /// invalidation then stays queued in PostgreSQL and is retried).
    pub async fn bury(
        &self,
        invalidation: &Invalidation,
        now: chrono::DateTime<chrono::Utc>,
    ) -> bool {
        if !self.redis.is_enabled() {
            return true;
        }
        let Some(hash) = TokenHash::from_bytes(&invalidation.token_hash) else {
            tracing::error!(
                id = invalidation.id,
                "invalidation with a malformed token hash"
            );
            return true;
        };
        let Ok(ttl) = (invalidation.expires_at - now).to_std() else {
            return true; // expired anyway: nothing can serve it
        };
        let (Some(key), Some(index)) = (
            self.session_key(&hash),
            self.index_key(&invalidation.user_id),
        ) else {
            return true;
        };
        let Some(client) = self.redis.connected() else {
            return false;
        };
        let args = vec![ttl.as_millis().max(1).to_string(), hash.to_hex()];
        let result = BURY
            .evalsha_with_reload::<i64, _, _>(client, vec![key, index], args)
            .await;
        self.redis.observe(result).is_some()
    }
}

impl SessionStore {
    pub fn redis(&self) -> &Redis {
        &self.redis
    }
}
