//! Account deletion, whole: `AuthService::erase_account` runs the transaction and one wait for
//! every instance to drop the sessions and the profile; here, the profile's Redis copy is
//! floored above every version (after the sessions' tombstones, before the wait), so that no
//! instance serves the profile once the call returns.
use tracing::instrument;
use uuid::Uuid;

use super::{ProfileError, ProfileService};
use crate::{
    cache::{Announcement, Log, ProfileWrite},
    store::{DeletedBy, Guard},
};

impl ProfileService {
    /// DeleteAccount: the caller's own account, with its current password (or a recent sign-in);
    /// the sessions revoked.
    #[instrument(skip_all)]
    pub async fn delete_account(
        &self,
        token: &str,
        password: Option<secrecy::SecretString>,
    ) -> Result<usize, ProfileError> {
        let (user_id, guard) = self.auth.deletion_allowed(token, password).await?;
        self.delete(user_id, DeletedBy::User, Some(&guard)).await
    }

    /// AdminService DeleteUser: idempotent (an account deleted before answers OK once its copies
    /// are gone); NOT_FOUND for an account that never was.
    #[instrument(skip_all)]
    pub async fn delete_user(&self, user_id: Uuid) -> Result<usize, ProfileError> {
        self.delete(user_id, DeletedBy::Operator, None).await
    }

    async fn delete(
        &self,
        user_id: Uuid,
        by: DeletedBy,
        guard: Option<&Guard>,
    ) -> Result<usize, ProfileError> {
        let floor = |version, logged: Option<(i64, chrono::DateTime<chrono::Utc>)>| async move {
            let redis = self.cache.redis();
            let stamp = redis.stamp();
            if !self
                .cache
                .raise(&[ProfileWrite::Floor(user_id, version)])
                .await
            {
                return Announcement::default();
            }
            match logged {
                Some(logged) => redis.mark_applied(stamp, Log::Profiles, [logged]),
                None => Announcement::default(),
            }
        };
        let erased = self.auth.erase_account(user_id, by, guard, floor).await?;
        Ok(if erased.now {
            erased.revocation.active
        } else {
            0
        })
    }
}
