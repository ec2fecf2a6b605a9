//! ProfileService rules: reads from the cache (one GET or one MGET), misses from PostgreSQL (one
//! query, coalesced per key on this instance), updates committed to PostgreSQL first and then
//! written to Redis as the new version.
use std::{collections::HashMap, sync::Arc};

use async_singleflight::UnaryGroup;
use tracing::instrument;
use uuid::Uuid;

use super::{ProfileChanges, ProfileRecord};
use crate::{
    auth::{AuthError, AuthService, FillHook, input::FieldViolation, session},
    cache::{CachedProfile, Entry, ProfileCache},
    store::{Db, StoreError, UpdateOutcome},
};

/// At most this many queued profile versions are applied per drain pass.
const DRAIN_BATCH: i64 = 500;

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
    cache: ProfileCache,
    auth: Arc<AuthService>,
    flights: UnaryGroup<Uuid, Load>,
    fill_hook: std::sync::OnceLock<FillHook>,
}

impl ProfileService {
    pub fn new(db: Arc<Db>, cache: ProfileCache, auth: Arc<AuthService>) -> Self {
        Self {
            db,
            cache,
            auth,
            flights: UnaryGroup::new(),
            fill_hook: std::sync::OnceLock::new(),
        }
    }

    /// Test hook: runs between a miss's PostgreSQL read and its Redis write (with the user id).
    #[doc(hidden)]
    pub fn set_fill_hook(&self, hook: FillHook) {
        let _ = self.fill_hook.set(hook);
    }

    /// The hot read path (no span of its own; the RPC's span covers it).
    pub async fn get(&self, user_id: Uuid) -> Result<ProfileRecord, ProfileError> {
        let trusted = self.cache.redis().trusted();
        let loaded = match self.cache.get(&user_id).await {
            CachedProfile::Hit(profile) if trusted => return Ok(profile),
            CachedProfile::NotFound if trusted => return Err(ProfileError::NotFound),
            // A true miss: concurrent misses for this id share one PostgreSQL read.
            CachedProfile::Miss if trusted => {
                self.flights
                    .work(&user_id, self.recheck_then_load(user_id))
                    .await
            }
            // Redis down, not trusted since a failure, or a floor: read PostgreSQL for this
            // caller alone.
            _ => self.load_and_fill(user_id).await,
        };
        loaded
            .map_err(ProfileError::Store)?
            .ok_or(ProfileError::NotFound)
    }

    /// A new flight's leader looks at the cache once more: a caller whose GET missed just before
    /// the previous flight filled the cache finds the copy instead of reading PostgreSQL again.
    async fn recheck_then_load(&self, user_id: Uuid) -> Load {
        match self.cache.get(&user_id).await {
            CachedProfile::Hit(profile) => Ok(Some(profile)),
            CachedProfile::NotFound => Ok(None),
            _ => self.load_and_fill(user_id).await,
        }
    }

    async fn load_and_fill(&self, user_id: Uuid) -> Load {
        let profile = self.db.profiles().get(user_id).await.map_err(Arc::new)?;
        if let Some(hook) = self.fill_hook.get() {
            hook(user_id).await;
        }
        let entry = match &profile {
            Some(p) => Entry::Profile(p),
            None => Entry::NotFound(user_id),
        };
        self.cache.store(&[entry]).await;
        Ok(profile)
    }

    /// One MGET for every id, one PostgreSQL query for all the misses, one write for all fills.
    /// `user_ids` must be distinct; the answer keeps their order.
    #[instrument(skip_all, fields(count = user_ids.len()))]
    pub async fn batch_get(&self, user_ids: &[Uuid]) -> Result<BatchProfiles, ProfileError> {
        let trusted = self.cache.redis().trusted();
        let cached = match self.cache.get_many(user_ids).await {
            Some(cached) if trusted => cached,
            _ => user_ids
                .iter()
                .map(|_| CachedProfile::Unavailable)
                .collect(),
        };
        let mut found: HashMap<Uuid, ProfileRecord> = HashMap::with_capacity(user_ids.len());
        let mut known_missing = Vec::new();
        let mut misses = Vec::new();
        for (id, cached) in user_ids.iter().zip(cached) {
            match cached {
                CachedProfile::Hit(p) => {
                    found.insert(*id, p);
                }
                CachedProfile::NotFound => known_missing.push(*id),
                CachedProfile::Miss | CachedProfile::Floor | CachedProfile::Unavailable => {
                    misses.push(*id)
                }
            }
        }
        if !misses.is_empty() {
            let loaded = self.db.profiles().get_many(&misses).await?;
            let mut entries: Vec<Entry<'_>> = loaded.iter().map(Entry::Profile).collect();
            let loaded_ids: Vec<Uuid> = loaded.iter().map(|p| p.user_id).collect();
            entries.extend(
                misses
                    .iter()
                    .filter(|id| !loaded_ids.contains(id))
                    .map(|id| Entry::NotFound(*id)),
            );
            self.cache.store(&entries).await;
            found.extend(loaded.into_iter().map(|p| (p.user_id, p)));
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
            .update(user_id, &changes, expected_version, session::now())
            .await?;
        let (profile, invalidation_id) = match outcome {
            UpdateOutcome::Updated {
                profile,
                invalidation_id,
            } => (profile, invalidation_id),
            UpdateOutcome::VersionMismatch => return Err(ProfileError::VersionMismatch),
            UpdateOutcome::NotFound => return Err(ProfileError::NotFound),
        };
        tracing::info!(%user_id, version = profile.version, "profile updated");
        if self.cache.store(&[Entry::Profile(&profile)]).await {
            self.forget(&[invalidation_id]).await;
        }
        Ok(profile)
    }

    async fn forget(&self, ids: &[i64]) {
        if let Err(error) = self.db.profiles().delete_invalidations(ids).await {
            tracing::warn!(%error, "could not clear applied profile versions; they will be re-applied");
        }
    }

    /// One pass over the profile versions queued by any instance: each becomes a floor in
    /// Redis, so an older cached copy is never served. `true` when all of them reached Redis.
    pub async fn drain_invalidations(&self) -> Result<bool, StoreError> {
        // A caller that gave up while leading a read leaves its key behind in the single-flight
        // map; sweep those so ids nobody asks for again cannot accumulate.
        self.flights.purge_stale().await;
        let pending = self
            .db
            .profiles()
            .pending_invalidations(DRAIN_BATCH)
            .await?;
        if pending.is_empty() {
            return Ok(true);
        }
        let entries: Vec<Entry<'_>> = pending
            .iter()
            .map(|p| Entry::Floor(p.user_id, p.version))
            .collect();
        if !self.cache.store(&entries).await {
            return Ok(false);
        }
        let ids: Vec<i64> = pending.iter().map(|p| p.id).collect();
        self.forget(&ids).await;
        Ok(pending.len() < DRAIN_BATCH.unsigned_abs() as usize)
    }
}
