//! Applying revocations: the tombstones this instance's cache may lack, then the wait until no
//! instance's in-process cache holds a copy (see `crate::local`), and what a revoking statement
//! must return for that (`since`).
use chrono::{DateTime, Utc};

use super::{AuthError, AuthService, security, token::TokenHash};
use crate::{
    cache::{Announcement, Log},
    local::Keys,
    store::{Invalidation, Revocation, Since},
};

impl AuthService {
    /// Writes the tombstones of what `revocation` returned that this instance's cache may lack,
    /// then waits until no instance's in-process cache holds a copy of any session it covers
    /// (see `crate::local`), whoever revoked them: an error only when that cannot be known.
    /// `reason` labels the new revocations in metrics.
    pub(super) async fn invalidate(
        &self,
        reason: Option<&str>,
        revocation: &Revocation,
    ) -> Result<(), AuthError> {
        self.invalidate_with(reason, revocation, None).await
    }

    /// [`Self::invalidate`], with one more session whose in-process copies are to be dropped
    /// (one that changed without being revoked).
    pub(super) async fn invalidate_with(
        &self,
        reason: Option<&str>,
        revocation: &Revocation,
        changed: Option<&TokenHash>,
    ) -> Result<(), AuthError> {
        let hashes = revocation.pending.iter().map(|i| i.token_hash.as_slice());
        let mut keys = Keys::sessions(hashes.chain(changed.map(TokenHash::as_bytes)));
        keys.partial = revocation.truncated;
        self.invalidate_keys(reason, revocation, keys).await
    }

    /// Writes the tombstones of what `revocation` returned that this instance's cache may lack,
    /// then waits until no instance's in-process cache holds a copy of `keys`.
    pub(super) async fn invalidate_keys(
        &self,
        reason: Option<&str>,
        revocation: &Revocation,
        keys: Keys,
    ) -> Result<(), AuthError> {
        let nothing = async { Announcement::default() };
        self.invalidate_keys_and(reason, revocation, keys, nothing)
            .await
    }

    /// [`Self::invalidate_keys`], with more keys (a deleted account's profile) whose copies
    /// `also` writes to Redis after the tombstones: one wait for all of them.
    pub(super) async fn invalidate_keys_and(
        &self,
        reason: Option<&str>,
        revocation: &Revocation,
        keys: Keys,
        also: impl Future<Output = Announcement>,
    ) -> Result<(), AuthError> {
        self.count_revoked(reason, revocation);
        // Rows before this cache's log position reached it through the follower already.
        let position = self.cache.redis().log_position();
        let unapplied: Vec<Invalidation> = revocation
            .pending
            .iter()
            .filter(|i| position.is_none_or(|p| i.created_at > p))
            .cloned()
            .collect();
        let written = async { self.apply(&unapplied).await.1.merge(also.await) };
        self.local.invalidate(keys, written).await?;
        Ok(())
    }

    fn count_revoked(&self, reason: Option<&str>, revocation: &Revocation) {
        if let Some(reason) = reason {
            let revoked = self.metrics().sessions_revoked.with_label_values(&[reason]);
            revoked.inc_by(revocation.revoked as u64);
            // The sessions concerned are one account's (its own rows come first among them).
            let user_id = revocation.pending.first().map(|i| i.user_id);
            if let Some(user_id) = user_id.filter(|_| revocation.revoked > 0) {
                security::sessions_revoked(user_id, reason, revocation.revoked);
            }
        }
    }

    /// Writes these tombstones (concurrently), but for those this instance's cache already
    /// took (or heard another instance took); `true` when Redis confirmed all of them (`false`
    /// when Redis is disabled: such an instance has no cache to invalidate, and the log keeps
    /// every row for the instances that have one), with the rows it wrote, to announce.
    pub async fn apply(&self, invalidations: &[Invalidation]) -> (bool, Announcement) {
        let redis = self.cache.redis();
        if !redis.is_enabled() {
            return (false, Announcement::default());
        }
        let rows: Vec<(i64, DateTime<Utc>)> =
            invalidations.iter().map(|i| (i.id, i.created_at)).collect();
        let stamp = redis.stamp();
        let todo = redis.unapplied(stamp, Log::Sessions, &rows);
        let now = self.clock.now();
        let writes = invalidations.iter().zip(todo).filter(|(_, todo)| *todo);
        let confirmed = futures::future::join_all(writes.map(|(invalidation, _)| async move {
            let Some(hash) = TokenHash::from_bytes(&invalidation.token_hash) else {
                tracing::error!(
                    id = invalidation.id,
                    "invalidation with a malformed token hash"
                );
                return (invalidation, true);
            };
            let confirmed = match (invalidation.expires_at - now).to_std() {
                Ok(ttl) if !ttl.is_zero() => {
                    self.cache.bury(&hash, &invalidation.user_id, ttl).await
                }
                // Expired anyway: no copy can outlive it, and none would be accepted.
                _ => true,
            };
            (invalidation, confirmed)
        }))
        .await;
        let all = confirmed.iter().all(|(_, c)| *c);
        // After Redis: a fill that read the old copy before this cannot keep it. Every row, the
        // ones another instance wrote too: the previous release waits for nobody, and its
        // revocations reach this instance's memory through here within README's bound (the
        // model's `follower_drops_only_what_it_writes`).
        let hashes = invalidations.iter().map(|i| i.token_hash.as_slice());
        self.local.forget(&Keys::sessions(hashes));
        let done = confirmed.into_iter().filter(|(_, c)| *c);
        let announcement = redis.mark_applied(
            stamp,
            Log::Sessions,
            done.map(|(i, _)| (i.id, i.created_at)),
        );
        (all, announcement)
    }

    /// What a revoking statement needs to return every invalidation of what it covers that an
    /// instance may still hold in memory (logged within the wait horizon, whoever logged it) or
    /// this instance's cache may still lack (logged after its log position): see `store::Since`.
    pub(super) fn since(&self) -> Since {
        // Before PostgreSQL's clock was first read, this host's may be off by anything: every
        // earlier row (at most 1000, beyond which the wait covers every holder).
        let horizon = if self.clock.calibrated() {
            self.clock.now() - self.local.horizon()
        } else {
            DateTime::<Utc>::UNIX_EPOCH
        };
        let position = self.cache.redis().log_position();
        Since {
            idle: self.policy.idle_timeout,
            pending_after: position.map_or(horizon, |p| p.min(horizon)),
        }
    }
}
