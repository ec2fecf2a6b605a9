//! Profiles (their outbox of versions still to be mirrored into Redis is in `outbox`).
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, StoreError};
use crate::model::{ProfileChanges, ProfileRecord};

/// What an update found.
pub enum UpdateOutcome {
    /// With its row of the profile log (`(id, logged at)`).
    Updated(Box<ProfileRecord>, (i64, DateTime<Utc>)),
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

/// A profile's columns (`p`: the profile row), with the account's email verification.
pub(super) const COLUMNS: &str = "p.user_id, p.display_name, p.bio, p.avatar_url, p.locale, \
    p.time_zone, p.version, p.created_at, p.updated_at, \
    (select u.email_verified_at from users u where u.id = p.user_id) as email_verified_at";

#[derive(Clone, Copy)]
pub struct ProfileRepo<'a>(&'a Db);

impl Db {
    pub fn profiles(&self) -> ProfileRepo<'_> {
        ProfileRepo(self)
    }
}

impl ProfileRepo<'_> {
    pub async fn get(&self, user_id: Uuid) -> Result<Option<ProfileRecord>, StoreError> {
        self.get_in(self.0.pool(), user_id).await
    }

    /// [`Self::get`] on `executor` (a transaction).
    pub(super) async fn get_in(
        &self,
        executor: impl sqlx::PgExecutor<'_>,
        user_id: Uuid,
    ) -> Result<Option<ProfileRecord>, StoreError> {
        let sql = format!("select {COLUMNS} from profiles p where p.user_id = $1");
        let query = sqlx::query_as::<_, ProfileRecord>(sqlx::AssertSqlSafe(sql)).bind(user_id);
        self.0.run(query.fetch_optional(executor)).await
    }

    /// All the profiles among `user_ids` that exist, in one query.
    pub async fn get_many(&self, user_ids: &[Uuid]) -> Result<Vec<ProfileRecord>, StoreError> {
        let sql = format!("select {COLUMNS} from profiles p where p.user_id = any($1)");
        let query = sqlx::query_as::<_, ProfileRecord>(sqlx::AssertSqlSafe(sql)).bind(user_ids);
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
        let mut tx = self.0.run(self.0.pool().begin()).await?;
        // The account's row first, as every transaction that changes what a profile shows of it:
        // an email verification committing meanwhile is waited for, and the new version shows it
        // (read in the update's own snapshot, taken after the wait).
        let account = sqlx::query("select 1 from users where id = $1 for key share").bind(user_id);
        self.0.run(account.execute(&mut *tx)).await?;
        let updated = self
            .update_in(&mut *tx, user_id, changes, expected_version, now)
            .await?;
        self.0.run(tx.commit()).await?;
        if let Some((profile, logged)) = updated {
            return Ok(UpdateOutcome::Updated(Box::new(profile), logged));
        }
        Ok(match self.get(user_id).await? {
            Some(_) => UpdateOutcome::VersionMismatch,
            None => UpdateOutcome::NotFound,
        })
    }

    /// [`Self::update`]'s statement, on `executor` (a transaction that changed what the profile
    /// shows of the account: an empty `changes` only bumps the version); `None` when the profile
    /// is missing or its version is not `expected_version`.
    pub(super) async fn update_in(
        &self,
        executor: impl sqlx::PgExecutor<'_>,
        user_id: Uuid,
        changes: &ProfileChanges,
        expected_version: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<Option<(ProfileRecord, (i64, DateTime<Utc>))>, StoreError> {
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
                           created_at, updated_at,
                           (select u.email_verified_at from users u where u.id = profiles.user_id)
                               as email_verified_at
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
        let updated = self.0.run(query.fetch_optional(executor)).await?;
        Ok(updated.map(|u| (u.profile, (u.logged_id, u.logged_at))))
    }
}
