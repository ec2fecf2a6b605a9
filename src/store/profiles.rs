//! Profiles (their outbox of versions still to be mirrored into Redis is in `outbox`).
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, StoreError};
use crate::model::{ProfileChanges, ProfileRecord};

/// What an update found.
pub enum UpdateOutcome {
    /// With its row of the profile log (`(id, logged at)`).
    Updated(ProfileRecord, (i64, DateTime<Utc>)),
    VersionMismatch,
    NotFound,
}

/// An update's answer: the profile and its log row.
#[derive(sqlx::FromRow)]
struct Updated {
    #[sqlx(flatten)]
    profile: ProfileRecord,
    logged_id: i64,
    logged_at: DateTime<Utc>,
}

#[derive(Clone, Copy)]
pub struct ProfileRepo<'a>(&'a Db);

impl Db {
    pub fn profiles(&self) -> ProfileRepo<'_> {
        ProfileRepo(self)
    }
}

impl ProfileRepo<'_> {
    pub async fn get(&self, user_id: Uuid) -> Result<Option<ProfileRecord>, StoreError> {
        let query = sqlx::query_as::<_, ProfileRecord>(
            "select user_id, display_name, bio, avatar_url, locale, time_zone, version,
                    created_at, updated_at
             from profiles where user_id = $1",
        )
        .bind(user_id);
        self.0.run(query.fetch_optional(self.0.pool())).await
    }

    /// All the profiles among `user_ids` that exist, in one query.
    pub async fn get_many(&self, user_ids: &[Uuid]) -> Result<Vec<ProfileRecord>, StoreError> {
        let query = sqlx::query_as::<_, ProfileRecord>(
            "select user_id, display_name, bio, avatar_url, locale, time_zone, version,
                    created_at, updated_at
             from profiles where user_id = any($1)",
        )
        .bind(user_ids);
        self.0.run(query.fetch_all(self.0.pool())).await
    }

    /// Applies the changes (and bumps the version) when `expected_version` is `None` or
    /// matches, queueing the new version's cache update in the same statement.
    pub async fn update(
        &self,
        user_id: Uuid,
        changes: &ProfileChanges,
        expected_version: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<UpdateOutcome, StoreError> {
        let query = sqlx::query_as::<_, Updated>(
            "with updated as (
                 update profiles set
                     display_name = coalesce($3, display_name),
                     bio = coalesce($4, bio),
                     avatar_url = coalesce($5, avatar_url),
                     locale = coalesce($6, locale),
                     time_zone = coalesce($7, time_zone),
                     version = version + 1,
                     updated_at = $2
                 where user_id = $1 and ($8::bigint is null or version = $8)
                 returning user_id, display_name, bio, avatar_url, locale, time_zone, version,
                           created_at, updated_at
             ), evented as (
                 insert into change_events (kind, user_id, version)
                 select 'profile_updated', user_id, version from updated
             ), queued as (
                 insert into profile_invalidations (user_id, version, evented)
                 select user_id, version, true from updated
                 returning id, created_at
             )
             select updated.*, queued.id as logged_id, queued.created_at as logged_at
             from updated, queued",
        )
        .bind(user_id)
        .bind(now)
        .bind(&changes.display_name)
        .bind(&changes.bio)
        .bind(&changes.avatar_url)
        .bind(&changes.locale)
        .bind(&changes.time_zone)
        .bind(expected_version);
        if let Some(updated) = self.0.run(query.fetch_optional(self.0.pool())).await? {
            let logged = (updated.logged_id, updated.logged_at);
            return Ok(UpdateOutcome::Updated(updated.profile, logged));
        }
        Ok(match self.get(user_id).await? {
            Some(_) => UpdateOutcome::VersionMismatch,
            None => UpdateOutcome::NotFound,
        })
    }
}
