//! The Redis profile cache: `<prefix>profile:v2:<user_id>` holds a copy of the profile with its
//! version, a floor (the profile is at least at that version; read PostgreSQL) or a fill lease —
//! each in its generation (see `values`).
//!
//! "No such user" is remembered in process only, in a bounded map, for
//! `PROFILE_CACHE__NEGATIVE_TTL`: unknown ids cost the caller a PostgreSQL read now and then, and
//! never a Redis key (a stream of random ids would otherwise fill Redis). User ids are made by
//! the server at registration and known only once it committed, so an id remembered as unknown
//! cannot turn into a user within that time.
//!
//! Reads fill under a lease taken before their PostgreSQL read; updates replace older versions
//! and leases (never a newer version, never an absent key). A read that fetched version N just
//! before an update to N+1 can therefore not put N back after the update, whichever reaches Redis
//! first, and neither can one that read it before Redis lost its data.
use std::collections::HashMap;

use fred::{
    interfaces::{ClientLike, ClusterInterface, KeysInterface},
    types::Expiration,
};
use futures::future::join_all;
use uuid::Uuid;

use super::{
    Lease, Redis,
    values::{self, GET_MANY, RAISE, Value},
};
use crate::{config::ProfileCacheSettings, model::ProfileRecord};

/// The values of `keys` on a cluster: the keys grouped by the node that owns their slot, one
/// [`GET_MANY`] per node, all at once.
async fn get_by_node(
    client: &fred::clients::Client,
    keys: Vec<String>,
) -> Result<Vec<Option<String>>, fred::error::Error> {
    let state = client.cached_cluster_state().ok_or_else(|| {
        fred::error::Error::new(fred::error::ErrorKind::Cluster, "no cluster state yet")
    })?;
    let mut groups: HashMap<Option<&fred::types::config::Server>, Vec<usize>> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        let owner = state.get_server(fred::util::redis_keyslot(key.as_bytes()));
        groups.entry(owner).or_default().push(i);
    }
    let reads = groups.into_values().map(|positions| {
        let group: Vec<String> = positions.iter().map(|&i| keys[i].clone()).collect();
        async move {
            let route = vec![group[0].clone()];
            let values: Vec<Option<String>> =
                GET_MANY.evalsha_with_reload(client, route, group).await?;
            Ok::<_, fred::error::Error>((positions, values))
        }
    });
    let mut out = vec![None; keys.len()];
    for read in join_all(reads).await {
        let (positions, values) = read?;
        for (i, value) in positions.into_iter().zip(values) {
            out[i] = value;
        }
    }
    Ok(out)
}

/// What Redis knows about a profile.
#[derive(Debug)]
pub enum CachedProfile {
    /// A copy of the generation being served.
    Hit(ProfileRecord),
    /// Cached as "no such user".
    NotFound,
    /// Nothing servable: read PostgreSQL, and fill under a lease.
    Miss,
    Unavailable,
}

/// A version PostgreSQL committed, to be made visible in Redis.
pub enum ProfileWrite<'a> {
    /// The new profile, written in full where the key holds an older copy.
    Updated(&'a ProfileRecord),
    /// Only the version: older copies become floors (drains of the outbox).
    Floor(Uuid, i64),
}

#[derive(Clone)]
pub struct ProfileCache {
    redis: Redis,
    settings: ProfileCacheSettings,
    /// How long a lease holds a key for a fill.
    lease_ttl: std::time::Duration,
    /// Ids PostgreSQL answered "no such user" for, recently.
    absent: moka::sync::Cache<Uuid, ()>,
}

/// Unknown ids remembered at most (about 100 bytes each).
const ABSENT_MAX: u64 = 100_000;

impl ProfileCache {
    pub fn new(
        redis: Redis,
        settings: ProfileCacheSettings,
        lease_ttl: std::time::Duration,
    ) -> Self {
        let absent = moka::sync::Cache::builder()
            .max_capacity(ABSENT_MAX)
            .time_to_live(settings.negative_ttl)
            .build();
        Self {
            redis,
            settings,
            lease_ttl,
            absent,
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn key(&self, user_id: &Uuid) -> Option<String> {
        self.redis.key("profile", &user_id.to_string())
    }

    /// `serving`: the generation served now, read once per reply. A copy whose key had an
    /// update fail to reach Redis here is not served.
    fn judge(&self, key: &str, raw: Option<String>, serving: Option<u64>) -> CachedProfile {
        let Some(raw) = raw else {
            return CachedProfile::Miss;
        };
        match values::decode(&raw) {
            Value::Profile(..) if self.redis.is_pending(key) => CachedProfile::Miss,
            Value::Profile(generation, json) if Some(generation) == serving => {
                match serde_json::from_str(json) {
                    Ok(profile) => CachedProfile::Hit(profile),
                    Err(error) => {
                        tracing::warn!(%error, "unreadable cached profile; reading PostgreSQL");
                        CachedProfile::Miss
                    }
                }
            }
            _ => CachedProfile::Miss,
        }
    }

    fn count(&self, cached: &CachedProfile) {
        let result = match cached {
            CachedProfile::Hit(_) => "hit",
            CachedProfile::NotFound => "negative",
            CachedProfile::Miss => "miss",
            CachedProfile::Unavailable => "unavailable",
        };
        let lookups = &self.redis.metrics().cache_lookups;
        lookups.with_label_values(&["profiles", result]).inc();
    }

    /// Remembered as unknown, or one GET.
    pub async fn get(&self, user_id: &Uuid) -> CachedProfile {
        if self.absent.contains_key(user_id) {
            self.count(&CachedProfile::NotFound);
            return CachedProfile::NotFound;
        }
        let cached = match (self.key(user_id), self.redis.connected()) {
            (Some(key), Some(client)) => {
                match self
                    .redis
                    .observe(client.get::<Option<String>, _>(&key).await)
                {
                    Some(value) => self.judge(&key, value, self.redis.serving_generation()),
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

    /// All of `user_ids` in one round trip: one MGET, or on a cluster (where an MGET cannot
    /// span slots) one read per node, sent to the nodes concurrently. Ids remembered as absent
    /// are [`CachedProfile::NotFound`] whether Redis answers or not; the others
    /// [`CachedProfile::Unavailable`] when it does not.
    pub async fn get_many(&self, user_ids: &[Uuid]) -> Vec<CachedProfile> {
        let mut read = self.read_many(user_ids).await.map(Vec::into_iter);
        let cached: Vec<CachedProfile> = user_ids
            .iter()
            .map(|id| {
                let from_redis = read.as_mut().and_then(Iterator::next);
                if self.absent.contains_key(id) {
                    CachedProfile::NotFound
                } else {
                    from_redis.unwrap_or(CachedProfile::Unavailable)
                }
            })
            .collect();
        if self.redis.is_enabled() {
            cached.iter().for_each(|c| self.count(c));
        }
        cached
    }

    /// What Redis holds for `user_ids`, judged; `None` when it is unavailable.
    async fn read_many(&self, user_ids: &[Uuid]) -> Option<Vec<CachedProfile>> {
        let keys: Vec<String> = user_ids
            .iter()
            .map(|id| self.key(id))
            .collect::<Option<_>>()?;
        let client = self.redis.connected()?;
        let values: Vec<Option<String>> = if client.is_clustered() {
            let by_node = get_by_node(client, keys.clone()).await;
            match by_node {
                // Redis before 7 does not know script flags: read key by key (fred pipelines
                // the GETs on each node's connection).
                Err(e) if e.details().contains("compiling script") => {
                    let gets = keys.iter().map(|k| client.get::<Option<String>, _>(k));
                    let replies: Result<Vec<_>, _> = join_all(gets).await.into_iter().collect();
                    self.redis.observe(replies)?
                }
                other => self.redis.observe(other)?,
            }
        } else {
            self.redis.observe(client.mget(keys.clone()).await)?
        };
        let serving = self.redis.serving_generation();
        Some(
            keys.iter()
                .zip(values)
                .map(|(key, v)| self.judge(key, v, serving))
                .collect(),
        )
    }

    /// Takes the right to fill `user_id`'s key, before reading PostgreSQL.
    pub async fn lease(&self, user_id: &Uuid) -> Option<Lease> {
        let key = self.key(user_id)?;
        self.redis.take_lease(key, self.lease_ttl, true).await
    }

    /// Leases for several keys at once (concurrent commands, pipelined on the connection).
    pub async fn lease_many(&self, user_ids: &[Uuid]) -> Vec<Option<Lease>> {
        join_all(user_ids.iter().map(|id| self.lease(id))).await
    }

    /// Fills a leased key with what PostgreSQL answered.
    pub async fn fill(&self, lease: Lease, profile: &ProfileRecord) {
        let value = match serde_json::to_string(profile) {
            Ok(json) => values::profile(lease.generation(), profile.version, &json),
            Err(error) => {
                let user_id = profile.user_id;
                return tracing::error!(%error, %user_id, "cannot serialise a profile");
            }
        };
        let ttl = self.jittered(self.settings.ttl);
        self.redis.swap(&lease, value, ttl).await;
    }

    /// PostgreSQL has no such user: remembered here, and the lease (if any) given back, so the
    /// id leaves nothing in Redis.
    pub async fn absent(&self, user_id: Uuid, lease: Option<Lease>) {
        self.absent.insert(user_id, ());
        if let Some(lease) = lease {
            self.redis.release(&lease).await;
        }
    }

    /// The entry's lifetime: the TTL plus up to `jitter` of it, so entries filled together do
    /// not expire together.
    fn jittered(&self, base: std::time::Duration) -> std::time::Duration {
        base + base.mul_f64(self.settings.jitter * fastrand::f64())
    }

    /// Makes committed versions visible: each replaces older versions, "not found" and leases
    /// where its key holds them (never a newer version, never an absent key). `false` when Redis
    /// is disabled or could not confirm every write.
    pub async fn raise(&self, writes: &[ProfileWrite<'_>]) -> bool {
        if writes.is_empty() {
            return self.redis.is_enabled();
        }
        let results = join_all(writes.iter().map(|w| self.raise_one(w))).await;
        results.into_iter().all(|confirmed| confirmed)
    }

    async fn raise_one(&self, write: &ProfileWrite<'_>) -> bool {
        let (user_id, version, json) = match write {
            ProfileWrite::Updated(p) => match serde_json::to_string(p) {
                Ok(json) => (p.user_id, p.version, json),
                Err(error) => {
                    tracing::error!(%error, "cannot serialise a profile");
                    (p.user_id, p.version, String::new())
                }
            },
            ProfileWrite::Floor(id, version) => (*id, *version, String::new()),
        };
        let Some(key) = self.key(&user_id) else {
            return false;
        };
        let Some(client) = self.redis.connected() else {
            self.redis.invalidation_failed(&key);
            return false;
        };
        let args = vec![
            self.redis.write_generation().to_string(),
            version.to_string(),
            json,
            self.jittered(self.settings.ttl)
                .as_millis()
                .max(1)
                .to_string(),
        ];
        let result = RAISE
            .evalsha_with_reload::<i64, _, _>(client, vec![key.clone()], args)
            .await;
        if self.redis.observe(result).is_none() {
            self.redis.invalidation_failed(&key);
            return false;
        }
        // Instances of the previous release read `profile:v1:` keys (`<version>|<json>`); until
        // none runs, they get a floor in their format ("at least this version: read PostgreSQL").
        if let Some(v1) = self.redis.key_v1("profile", &user_id.to_string()) {
            let ttl = self.jittered(self.settings.ttl);
            let px = Expiration::PX(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1));
            let floor = format!("{version}|");
            let compat = client
                .set::<(), _, _>(v1, floor, Some(px), None, false)
                .await;
            if self.redis.observe(compat).is_none() {
                self.redis.invalidation_failed(&key);
                return false;
            }
        }
        self.redis.invalidation_written(&key);
        true
    }
}
