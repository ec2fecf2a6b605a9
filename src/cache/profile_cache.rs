//! The Redis profile cache: `<prefix>profile:v1:<user_id>` holds `<version>|<profile JSON>`, or
//! `0|` for a user that does not exist (cached briefly), or `<version>|` as a floor (the profile
//! is at least at that version; read PostgreSQL).
//!
//! Every write goes through one guarded script that never replaces a newer version with an older
//! one. A read that fetched version N from PostgreSQL just before an update to N+1 can therefore
//! not put N back after the update wrote N+1, whichever reaches Redis first.
use std::sync::LazyLock;

use fred::{interfaces::KeysInterface, types::scripts::Script};
use uuid::Uuid;

use super::Redis;
use crate::{config::ProfileCacheSettings, profile::ProfileRecord};

/// KEYS: profile keys. ARGV: version, payload, TTL ms for each key, in order.
static STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "local written = 0
         for i, key in ipairs(KEYS) do
           local version = tonumber(ARGV[3 * i - 2])
           local payload = ARGV[3 * i - 1]
           local cur = redis.call('GET', key)
           local newer = true
           if cur then
             local sep = string.find(cur, '|', 1, true) or 0
             local cur_version = tonumber(string.sub(cur, 1, sep - 1)) or -1
             newer = cur_version < version
               or (cur_version == version and sep == #cur and payload ~= '')
           end
           if newer then
             redis.call('SET', key, version .. '|' .. payload, 'PX', ARGV[3 * i])
             written = written + 1
           end
         end
         return written",
    )
});

/// What Redis knows about a profile.
#[derive(Debug)]
pub enum CachedProfile {
    Hit(ProfileRecord),
    /// Cached as "no such user".
    NotFound,
    Miss,
    /// A newer version than some cached copies exists (an update whose Redis write failed):
    /// read PostgreSQL, and do not share a read that may have started before it.
    Floor,
    Unavailable,
}

/// One write: a profile, "not found", or a version floor.
pub enum Entry<'a> {
    Profile(&'a ProfileRecord),
    NotFound(Uuid),
    Floor(Uuid, i64),
}

#[derive(Clone)]
pub struct ProfileCache {
    redis: Redis,
    settings: ProfileCacheSettings,
}

impl ProfileCache {
    pub fn new(redis: Redis, settings: ProfileCacheSettings) -> Self {
        Self { redis, settings }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn key(&self, user_id: &Uuid) -> Option<String> {
        self.redis.key("profile", &user_id.to_string())
    }

    fn decode(value: Option<String>) -> CachedProfile {
        let Some(value) = value else {
            return CachedProfile::Miss;
        };
        match value.split_once('|') {
            Some(("0", "")) => CachedProfile::NotFound,
            Some((_, "")) => CachedProfile::Floor,
            Some((_, json)) => match serde_json::from_str(json) {
                Ok(profile) => CachedProfile::Hit(profile),
                Err(error) => {
                    tracing::warn!(%error, "unreadable cached profile; reading PostgreSQL");
                    CachedProfile::Miss
                }
            },
            None => CachedProfile::Miss,
        }
    }

    fn count(&self, cached: &CachedProfile) {
        let result = match cached {
            CachedProfile::Hit(_) => "hit",
            CachedProfile::NotFound => "negative",
            CachedProfile::Miss | CachedProfile::Floor => "miss",
            CachedProfile::Unavailable => "unavailable",
        };
        let lookups = &self.redis.metrics().cache_lookups;
        lookups.with_label_values(&["profiles", result]).inc();
    }

    /// One GET.
    pub async fn get(&self, user_id: &Uuid) -> CachedProfile {
        let cached = match (self.key(user_id), self.redis.connected()) {
            (Some(key), Some(client)) => {
                match self
                    .redis
                    .observe(client.get::<Option<String>, _>(key).await)
                {
                    Some(value) => Self::decode(value),
                    None => CachedProfile::Unavailable,
                }
            }
            _ => CachedProfile::Unavailable,
        };
        if self.redis.is_enabled() {
            self.count(&cached);
        }
        cached
    }

    /// One MGET for all of `user_ids`; `None` when Redis is unavailable.
    pub async fn get_many(&self, user_ids: &[Uuid]) -> Option<Vec<CachedProfile>> {
        let keys: Vec<String> = user_ids
            .iter()
            .map(|id| self.key(id))
            .collect::<Option<_>>()?;
        let client = self.redis.connected()?;
        let values: Vec<Option<String>> = self.redis.observe(client.mget(keys).await)?;
        let cached: Vec<CachedProfile> = values.into_iter().map(Self::decode).collect();
        cached.iter().for_each(|c| self.count(c));
        Some(cached)
    }

    /// The entry's lifetime: the TTL plus up to `jitter` of it, so entries filled together do
    /// not expire together.
    fn ttl_ms(&self, entry: &Entry<'_>) -> String {
        let base = match entry {
            Entry::NotFound(_) => self.settings.negative_ttl,
            Entry::Profile(_) | Entry::Floor(..) => self.settings.ttl,
        };
        let jitter = base.mul_f64(self.settings.jitter * fastrand::f64());
        (base + jitter).as_millis().max(1).to_string()
    }

    /// Writes all entries in one round trip (never an older version over a newer one). `false`
    /// when Redis could not confirm.
    pub async fn store(&self, entries: &[Entry<'_>]) -> bool {
        if !self.redis.is_enabled() || entries.is_empty() {
            return true;
        }
        let mut keys = Vec::with_capacity(entries.len());
        let mut args = Vec::with_capacity(entries.len() * 3);
        for entry in entries {
            let (user_id, version, payload) = match entry {
                Entry::Profile(p) => match serde_json::to_string(p) {
                    Ok(json) => (p.user_id, p.version, json),
                    Err(error) => {
                        tracing::error!(%error, "cannot serialise a profile");
                        continue;
                    }
                },
                Entry::NotFound(id) => (*id, 0, String::new()),
                Entry::Floor(id, version) => (*id, *version, String::new()),
            };
            let Some(key) = self.key(&user_id) else {
                return true;
            };
            keys.push(key);
            args.extend([version.to_string(), payload, self.ttl_ms(entry)]);
        }
        let Some(client) = self.redis.connected() else {
            return false;
        };
        let result = STORE
            .evalsha_with_reload::<i64, _, _>(client, keys, args)
            .await;
        self.redis.observe(result).is_some()
    }
}
