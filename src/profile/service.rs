//! ProfileService rules: reads from the cache (one GET or one MGET), misses from PostgreSQL (one
//! query, coalesced per key on this instance without ever answering a caller with a read older
//! than its call), filled under leases; updates committed to PostgreSQL first and then written to
//! Redis as the new version.
use std::{collections::HashMap, sync::Arc};

use tracing::instrument;
use uuid::Uuid;

use super::{ProfileChanges, ProfileRecord};
use crate::{
    auth::{AuthError, AuthService, FillHook, Found, input::FieldViolation},
    cache::{Announcement, CachedProfile, Log, ProfileCache, ProfileWrite},
    local::{Keys, LocalCache},
    store::{Db, ProfileInvalidation, StoreError, UpdateOutcome, coalesce::Coalescer},
    telemetry::{Tier, traces},
};

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("invalid request")]
    InvalidInput(Vec<FieldViolation>),
    #[error("profile not found")]
    NotFound,
    #[error("the profile has changed since the expected version; read it again and retry")]
    VersionMismatch,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Store(Arc<StoreError>),
}

impl From<StoreError> for ProfileError {
    fn from(error: StoreError) -> Self {
        ProfileError::Store(Arc::new(error))
    }
}

/// BatchGetProfiles' answer.
pub struct BatchProfiles {
    pub profiles: Vec<ProfileRecord>,
    pub not_found: Vec<Uuid>,
}

type Load = Result<Option<ProfileRecord>, Arc<StoreError>>;

pub struct ProfileService {
    db: Arc<Db>,
    pub(super) cache: ProfileCache,
    pub(super) auth: Arc<AuthService>,
    pub(super) local: LocalCache,
    /// Each flight's result, and what answered it.
    flights: Coalescer<Uuid, (Load, Tier)>,
    fill_hook: std::sync::OnceLock<FillHook>,
}

impl ProfileService {
    pub fn new(
        db: Arc<Db>,
        cache: ProfileCache,
        auth: Arc<AuthService>,
        local: LocalCache,
    ) -> Self {
        Self {
            db,
            cache,
            auth,
            local,
            flights: Coalescer::default(),
            fill_hook: std::sync::OnceLock::new(),
        }
    }

    /// Test hook: runs between a miss's PostgreSQL read and its Redis write (with the user id).
    #[doc(hidden)]
    pub fn set_fill_hook(&self, hook: FillHook) {
        let _ = self.fill_hook.set(hook);
    }

    /// The hot read path (no span of its own; the RPC's span covers it): this instance's memory
    /// first (see `crate::local`), then Redis, then PostgreSQL.
    pub async fn get(&self, user_id: Uuid) -> Result<ProfileRecord, ProfileError> {
        if let Some(profile) = self.local.profile(user_id) {
            traces::tier(Tier::Memory);
            return Ok(profile);
        }
        let ticket = self.local.profile_ticket(user_id);
        let profile = self.get_shared(user_id).await?;
        self.local.keep_profile(ticket, &profile);
        Ok(profile)
    }

    async fn get_shared(&self, user_id: Uuid) -> Result<ProfileRecord, ProfileError> {
        let loaded = match self.cache.get(&user_id).await {
            CachedProfile::Hit(profile) => {
                traces::tier(Tier::Redis);
                return Ok(profile);
            }
            // Remembered in this instance's memory (`PROFILE_CACHE__NEGATIVE_TTL`).
            CachedProfile::NotFound => {
                traces::tier(Tier::Memory);
                return Err(ProfileError::NotFound);
            }
            // Concurrent misses for this id share one PostgreSQL read (one begun after them);
            // with Redis down or disabled too (the read then fills nothing). Anyone may ask for
            // any id: each caller pays (waiting for its own address' turn before it joins), and
            // the one whose read runs is charged if it found nothing.
            miss => {
                let fill = matches!(miss, CachedProfile::Miss);
                let paid = self.auth.unknown_lookups().pay().await?;
                let load = || async move {
                    if fill {
                        self.recheck_then_load(user_id).await
                    } else {
                        (self.load(user_id, None).await, Tier::Postgres)
                    }
                };
                let ((loaded, tier), led) = self.flights.run(user_id, load).await;
                // Whoever's flight it was: what answered it.
                traces::tier(tier);
                paid.settle(if led { found(&loaded) } else { Found::Yes });
                loaded
            }
        };
        loaded
            .map_err(ProfileError::Store)?
            .ok_or(ProfileError::NotFound)
    }

    /// A flight first looks at the cache again (the previous flight has usually just filled
    /// it), then reads PostgreSQL under a lease.
    async fn recheck_then_load(&self, user_id: Uuid) -> (Load, Tier) {
        match self.cache.get(&user_id).await {
            CachedProfile::Hit(profile) => (Ok(Some(profile)), Tier::Redis),
            CachedProfile::NotFound => (Ok(None), Tier::Memory),
            CachedProfile::Miss => {
                let lease = self.cache.lease(&user_id).await;
                (self.load(user_id, lease).await, Tier::Postgres)
            }
            CachedProfile::Unavailable => (self.load(user_id, None).await, Tier::Postgres),
        }
    }

    /// Reads PostgreSQL and, holding a lease taken before the read, fills the cache.
    async fn load(&self, user_id: Uuid, lease: Option<crate::cache::Lease>) -> Load {
        let profile = self.db.profiles().get(user_id).await.map_err(Arc::new)?;
        if let Some(hook) = self.fill_hook.get() {
            hook(user_id).await;
        }
        match (&profile, lease) {
            (Some(found), Some(lease)) => self.cache.fill(lease, found).await,
            (None, lease) => self.cache.absent(user_id, lease).await,
            (Some(_), None) => {}
        }
        Ok(profile)
    }

    /// This instance's memory first; for the rest one MGET, one PostgreSQL query for all the
    /// misses (under leases taken before it), one fill per miss. `user_ids` must be distinct;
    /// the answer keeps their order.
    #[instrument(skip_all, fields(count = user_ids.len()))]
    pub async fn batch_get(&self, user_ids: &[Uuid]) -> Result<BatchProfiles, ProfileError> {
        let mut found: HashMap<Uuid, ProfileRecord> = HashMap::with_capacity(user_ids.len());
        let mut rest = Vec::new();
        let mut tickets = HashMap::new();
        for id in user_ids {
            match self.local.profile(*id) {
                Some(profile) => {
                    found.insert(*id, profile);
                }
                None => {
                    tickets.insert(*id, self.local.profile_ticket(*id));
                    rest.push(*id);
                }
            }
        }
        if !rest.is_empty() {
            for profile in self.batch_shared(&rest).await?.into_values() {
                if let Some(ticket) = tickets.get(&profile.user_id) {
                    self.local.keep_profile(*ticket, &profile);
                }
                found.insert(profile.user_id, profile);
            }
        }
        let mut answer = BatchProfiles {
            profiles: Vec::with_capacity(found.len()),
            not_found: Vec::new(),
        };
        for id in user_ids {
            match found.remove(id) {
                Some(p) => answer.profiles.push(p),
                None => answer.not_found.push(*id),
            }
        }
        Ok(answer)
    }

    /// The profiles of `user_ids` found through Redis and PostgreSQL.
    async fn batch_shared(
        &self,
        user_ids: &[Uuid],
    ) -> Result<HashMap<Uuid, ProfileRecord>, ProfileError> {
        let cached = self.cache.get_many(user_ids).await;
        let mut found: HashMap<Uuid, ProfileRecord> = HashMap::with_capacity(user_ids.len());
        let mut misses = Vec::new();
        let mut fill = Vec::new();
        for (id, cached) in user_ids.iter().zip(cached) {
            match cached {
                CachedProfile::Hit(p) => {
                    found.insert(*id, p);
                }
                CachedProfile::NotFound => {}
                CachedProfile::Miss => {
                    misses.push(*id);
                    fill.push(*id);
                }
                CachedProfile::Unavailable => misses.push(*id),
            }
        }
        if !misses.is_empty() {
            // One lookup, paid for unless every id is found (see `get_shared`).
            let paid = self.auth.unknown_lookups().pay().await?;
            let leases = self.cache.lease_many(&fill).await;
            let loaded = self.db.profiles().get_many(&misses).await;
            paid.settle(match &loaded {
                Ok(loaded) if loaded.len() == misses.len() => Found::Yes,
                Ok(_) => Found::No,
                Err(_) => Found::Failed,
            });
            let loaded = loaded?;
            let by_id: HashMap<Uuid, &ProfileRecord> =
                loaded.iter().map(|p| (p.user_id, p)).collect();
            let mut leases: HashMap<Uuid, crate::cache::Lease> = fill
                .iter()
                .zip(leases)
                .filter_map(|(id, lease)| Some((*id, lease?)))
                .collect();
            let by_id = &by_id;
            let fills = misses.iter().map(|id| {
                let lease = leases.remove(id);
                async move {
                    match (by_id.get(id), lease) {
                        (Some(found), Some(lease)) => self.cache.fill(lease, found).await,
                        (None, lease) => self.cache.absent(*id, lease).await,
                        (Some(_), None) => {}
                    }
                }
            });
            futures::future::join_all(fills).await;
            found.extend(loaded.into_iter().map(|p| (p.user_id, p)));
        }
        Ok(found)
    }

    /// Updates the caller's own profile. PostgreSQL commits (and queues the new version) first;
    /// then Redis gets the new version, so no later read on any instance sees an older one.
    #[instrument(skip_all)]
    pub async fn update(
        &self,
        token: &str,
        changes: ProfileChanges,
        expected_version: Option<i64>,
    ) -> Result<ProfileRecord, ProfileError> {
        let session = self.auth.validate(token).await?;
        let user_id = session.record.user_id;
        let outcome = self
            .db
            .profiles()
            .update(user_id, &changes, expected_version, self.auth.clock().now())
            .await?;
        let (profile, logged) = match outcome {
            UpdateOutcome::Updated(profile, logged) => (*profile, logged),
            UpdateOutcome::VersionMismatch => return Err(ProfileError::VersionMismatch),
            UpdateOutcome::NotFound => return Err(ProfileError::NotFound),
        };
        tracing::info!(%user_id, version = profile.version, "profile updated");
        let written = self.publish(profile.clone(), Some(logged));
        self.local
            .invalidate(Keys::profiles([user_id]), written)
            .await?;
        Ok(profile)
    }

    /// Writes a new version of the profile to Redis, and answers it (with its log row, when
    /// given) as applied. Not confirmed (Redis down, disabled, or the replicas late): the log has
    /// it, and every instance with Redis applies it on its next pass.
    pub(super) async fn publish(
        &self,
        profile: ProfileRecord,
        logged: Option<(i64, chrono::DateTime<chrono::Utc>)>,
    ) -> Announcement {
        let redis = self.cache.redis();
        let stamp = redis.stamp();
        if !self.cache.raise(&[ProfileWrite::Updated(&profile)]).await {
            return Announcement::default();
        }
        match logged {
            Some(logged) => redis.mark_applied(stamp, Log::Profiles, [logged]),
            None => Announcement::default(),
        }
    }

    /// Makes these logged versions visible in the cache as floors (older copies are never
    /// served), but for those this instance's cache already took (or heard another instance
    /// took); `true` when Redis confirmed all of them, with the rows it wrote, to announce.
    pub async fn apply(&self, versions: &[ProfileInvalidation]) -> (bool, Announcement) {
        let redis = self.cache.redis();
        if !redis.is_enabled() {
            return (false, Announcement::default());
        }
        let rows: Vec<(i64, chrono::DateTime<chrono::Utc>)> =
            versions.iter().map(|p| (p.id, p.created_at)).collect();
        let stamp = redis.stamp();
        let todo = redis.unapplied(stamp, Log::Profiles, &rows);
        let pending: Vec<&ProfileInvalidation> = versions
            .iter()
            .zip(todo)
            .filter_map(|(p, todo)| todo.then_some(p))
            .collect();
        let writes: Vec<ProfileWrite<'_>> = pending
            .iter()
            .map(|p| ProfileWrite::Floor(p.user_id, p.version))
            .collect();
        let raised = self.cache.raise(&writes).await;
        // After Redis: a fill that read an older version before this cannot keep it (every
        // version, as for sessions: see `AuthService::apply`).
        self.local
            .forget(&Keys::profiles(versions.iter().map(|p| p.user_id)));
        if !raised {
            return (false, Announcement::default());
        }
        let announcement = redis.mark_applied(
            stamp,
            Log::Profiles,
            pending.iter().map(|p| (p.id, p.created_at)),
        );
        (true, announcement)
    }
}

/// What a lookup found, for its caller's budget.
fn found(loaded: &Load) -> Found {
    match loaded {
        Ok(Some(_)) => Found::Yes,
        Ok(None) => Found::No,
        Err(_) => Found::Failed,
    }
}
