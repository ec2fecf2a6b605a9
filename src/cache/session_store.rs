//! The Redis session store: a copy of each live session keyed by its token hash
//! (`<prefix>session:v2:<sha256>`), a per-user index of the user's token hashes
//! (`<prefix>user_sessions:v2:<user_id>`), and tombstones for revoked sessions.
//!
//! A tombstone is what makes revocation stick: it is written over whatever the key holds when a
//! session is revoked, it is honoured in every generation, and the only writes that create a copy
//! (a fill under a lease, see [`SessionStore::lease`]) need the key to still hold their lease. A
//! validation that read the session from PostgreSQL just before a revocation therefore cannot put
//! it back afterwards, whichever of the two reaches Redis first, and neither can one that read it
//! before Redis lost its data.
use std::time::Duration;

use fred::{
    prelude::{KeysInterface, SetsInterface},
    types::Expiration,
};

use super::{
    Redis,
    values::{self, FORGET, INDEX, LEASE, REFRESH, RELEASE, SWAP, Value},
};
use crate::model::{SessionRecord, TokenHash};

/// What Redis knows about a token.
#[derive(Debug)]
pub enum Cached {
    /// A copy of the generation being served.
    Hit(SessionRecord),
    Revoked,
    /// Nothing servable is cached: read PostgreSQL, and fill under a lease.
    Miss,
    /// Redis is disabled or did not answer: read PostgreSQL, do not try to fill.
    Unavailable,
}

/// The right to fill one key, taken before the PostgreSQL read.
#[derive(Debug)]
pub struct Lease {
    key: String,
    generation: u64,
    value: String,
}

#[derive(Clone)]
pub struct SessionStore {
    redis: Redis,
    /// Lifetime of the per-user index: no member outlives it.
    index_ttl: Duration,
    /// How long a lease holds a key for a fill.
    lease_ttl: Duration,
}

impl SessionStore {
    pub fn new(redis: Redis, absolute_timeout: Duration, lease_ttl: Duration) -> Self {
        Self {
            redis,
            index_ttl: absolute_timeout,
            lease_ttl,
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
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
                    .observe(client.get::<Option<String>, _>(&key).await)
                {
                    None => Cached::Unavailable,
                    Some(None) => Cached::Miss,
                    Some(Some(raw)) => match self.judge(&raw) {
                        // Its tombstone failed to reach Redis: the copy may be stale.
                        Cached::Hit(_) if self.redis.is_pending(&key) => Cached::Miss,
                        judged => judged,
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

    /// A tombstone counts whatever its generation; a copy only when its generation is the one
    /// served now (judged after the reply arrived).
    fn judge(&self, raw: &str) -> Cached {
        match values::decode(raw) {
            Value::Tombstone => Cached::Revoked,
            Value::Session(generation, json)
                if Some(generation) == self.redis.serving_generation() =>
            {
                match serde_json::from_str(json) {
                    Ok(record) => Cached::Hit(record),
                    Err(error) => {
                        tracing::warn!(%error, "unreadable cached session; reading PostgreSQL");
                        Cached::Miss
                    }
                }
            }
            _ => Cached::Miss,
        }
    }

    /// Takes the right to fill this token's key, before reading PostgreSQL. `None` when no
    /// generation is established, Redis does not answer, or the key holds a tombstone or someone
    /// else's copy or lease.
    pub async fn lease(&self, hash: &TokenHash) -> Option<Lease> {
        let key = self.session_key(hash)?;
        self.redis.take_lease(key, self.lease_ttl, false).await
    }

    /// Writes `record` for `ttl` if `lease` still holds the key (nothing revoked, flushed or
    /// replaced it since it was taken), and adds it to the user's index.
    pub async fn fill(
        &self,
        lease: Lease,
        hash: &TokenHash,
        record: &SessionRecord,
        ttl: Duration,
    ) {
        let Some(value) = encode(lease.generation, record) else {
            return;
        };
        if self.redis.swap(&lease, value, ttl).await {
            self.index(hash, record).await;
        }
    }

    /// Gives up a lease whose fill has nothing to write (the token is unknown or revoked), so a
    /// stream of bad tokens leaves no keys behind.
    pub async fn release(&self, lease: Lease) {
        self.redis.release(&lease).await;
    }

    /// Replaces the live copy of the session with `record` (after activity was recorded, or the
    /// session re-authenticated). Nothing is written where no live copy of the current
    /// generation is: a flushed or revoked key stays so.
    pub async fn refresh(&self, hash: &TokenHash, record: &SessionRecord, ttl: Duration) {
        let (Some(key), Some(client)) = (self.session_key(hash), self.redis.connected()) else {
            return;
        };
        let generation = self.redis.write_generation();
        let Some(value) = encode(generation, record) else {
            return;
        };
        let args = vec![
            format!("{generation}|S|"),
            value,
            ttl.as_millis().max(1).to_string(),
        ];
        let result = REFRESH
            .evalsha_with_reload::<i64, _, _>(client, vec![key], args)
            .await;
        self.redis.observe(result);
    }

    /// Drops the copy of a session that changed without being revoked, and any fill's lease on
    /// it (a fill that read the old row cannot write it then): the next read fills it from
    /// PostgreSQL. A tombstone stays. `false` when Redis did not answer.
    pub async fn forget(&self, hash: &TokenHash) -> bool {
        let (Some(key), Some(client)) = (self.session_key(hash), self.redis.connected()) else {
            return !self.redis.is_enabled();
        };
        let result = FORGET
            .evalsha_with_reload::<i64, _, _>(client, vec![key], Vec::<String>::new())
            .await;
        self.redis.observe(result).is_some()
    }

    async fn index(&self, hash: &TokenHash, record: &SessionRecord) {
        let (Some(index), Some(client)) = (self.index_key(&record.user_id), self.redis.connected())
        else {
            return;
        };
        let args = vec![hash.to_hex(), self.index_ttl.as_secs().max(1).to_string()];
        let result = INDEX
            .evalsha_with_reload::<i64, _, _>(client, vec![index], args)
            .await;
        self.redis.observe(result);
    }

    /// Writes the tombstone of a revoked session, for `ttl` (until it would have expired
    /// anyway), with the previous release's tombstone and the index update alongside. `false`
    /// when Redis is disabled or did not take it: the log keeps the revocation for the follower
    /// to write again.
    pub async fn bury(&self, hash: &TokenHash, user_id: &uuid::Uuid, ttl: Duration) -> bool {
        let (Some(key), Some(index)) = (self.session_key(hash), self.index_key(user_id)) else {
            return false;
        };
        let Some(client) = self.redis.connected() else {
            self.redis.invalidation_failed(&key);
            return false;
        };
        let tombstone = values::tombstone(self.redis.write_generation());
        let px = Expiration::PX(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1));
        // Instances of the previous release read `session:v1:` keys; until none runs, they get
        // the tombstone in their format too (a rolling upgrade). Remove with the next schema.
        let v1 = self.redis.key_v1("session", &hash.to_hex());
        let (buried, compat, _) = futures::join!(
            client.set::<(), _, _>(&key, tombstone, Some(px.clone()), None, false),
            async {
                match v1 {
                    Some(v1) => {
                        client
                            .set::<(), _, _>(v1, "revoked", Some(px), None, false)
                            .await
                    }
                    None => Ok(()),
                }
            },
            // The index is a convenience; a member left behind expires with it.
            async {
                self.redis
                    .observe(client.srem::<i64, _, _>(index, hash.to_hex()).await)
            },
        );
        if self.redis.observe(buried).is_none() || self.redis.observe(compat).is_none() {
            self.redis.invalidation_failed(&key);
            return false;
        }
        self.redis.invalidation_written(&key);
        true
    }
}

fn encode(generation: u64, record: &SessionRecord) -> Option<String> {
    match serde_json::to_string(record) {
        Ok(json) => Some(values::session(generation, &json)),
        Err(error) => {
            tracing::error!(%error, "cannot serialise a session");
            None
        }
    }
}

impl Redis {
    /// Takes a fill lease on `key` in the established generation. `replace_floor`: a floor of that
    /// generation may be replaced (profiles).
    pub(super) async fn take_lease(
        &self,
        key: String,
        ttl: Duration,
        replace_floor: bool,
    ) -> Option<Lease> {
        let generation = self.write_generation();
        if generation == 0 {
            return None;
        }
        let client = self.connected()?;
        let value = values::lease(generation, fastrand::u64(..));
        let args = vec![
            generation.to_string(),
            value.clone(),
            ttl.as_millis().max(1).to_string(),
            if replace_floor { "1" } else { "0" }.to_owned(),
        ];
        let taken = LEASE
            .evalsha_with_reload::<i64, _, _>(client, vec![key.clone()], args)
            .await;
        (self.observe(taken)? == 1).then_some(Lease {
            key,
            generation,
            value,
        })
    }

    /// Deletes the key if it still holds `lease`.
    pub(super) async fn release(&self, lease: &Lease) {
        let Some(client) = self.connected() else {
            return;
        };
        let released = RELEASE
            .evalsha_with_reload::<i64, _, _>(
                client,
                vec![lease.key.clone()],
                vec![lease.value.clone()],
            )
            .await;
        self.observe(released);
    }

    /// Replaces `lease` with `value` if the key still holds it. `true` when written.
    pub(super) async fn swap(&self, lease: &Lease, value: String, ttl: Duration) -> bool {
        let Some(client) = self.connected() else {
            return false;
        };
        let args = vec![
            lease.value.clone(),
            value,
            ttl.as_millis().max(1).to_string(),
        ];
        let swapped = SWAP
            .evalsha_with_reload::<i64, _, _>(client, vec![lease.key.clone()], args)
            .await;
        self.observe(swapped) == Some(1)
    }
}

impl Lease {
    pub fn generation(&self) -> u64 {
        self.generation
    }
}
