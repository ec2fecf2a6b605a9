//! Background work every instance does: purging sessions that ended long ago. (Following the
//! outbox logs is `jobs::follow`.)
use std::time::Duration;

use super::{AuthError, AuthService};
use crate::store::StoreError;

/// Rows deleted per purge statement: small enough to never hold locks for long.
const PURGE_BATCH: i64 = 1000;

impl AuthService {
    /// Deletes sessions revoked or expired more than `retention` ago, in small batches (returns
    /// how many), clients no longer trusted, and account flow codes that expired.
    pub async fn purge_sessions(&self, retention: Duration) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let deleted = self
                .db
                .sessions()
                .purge(retention, self.policy.idle_timeout, PURGE_BATCH)
                .await?;
            total += deleted;
            if deleted < PURGE_BATCH.unsigned_abs() {
                break;
            }
            tokio::task::yield_now().await;
        }
        if total > 0 {
            tracing::info!(deleted = total, "purged ended sessions");
        }
        self.db
            .users()
            .purge_trusted(self.limits.trusted_client_ttl)
            .await?;
        while self.db.codes().purge(PURGE_BATCH).await? >= PURGE_BATCH.unsigned_abs() {
            tokio::task::yield_now().await;
        }
        Ok(total)
    }

    /// The budget of lookups that find nothing (profile reads pay it too).
    pub fn unknown_lookups(&self) -> &super::UnknownLookups {
        &self.unknown
    }

    /// Makes the next token and JWT signing keys when due and reloads them (see `keys` and
    /// `jwt`); both are tried whatever becomes of the other.
    pub async fn refresh_keys(&self) -> Result<(), AuthError> {
        let tokens = self.keys.refresh().await;
        let jwts = self.jwt.refresh().await;
        tokens.and(jwts)
    }

    /// Drops in-process rate-limit buckets that hold no information any more, and writes to
    /// Redis the attempts it could not count when they were made.
    pub async fn sweep_limits(&self) {
        self.limiter.sweep();
        self.unknown.sweep();
        self.settle_limits().await;
    }

    /// Writes to Redis the attempts it could not count when they were made.
    pub async fn settle_limits(&self) {
        self.limiter.settle().await;
    }

    /// Resolves when attempts are owed to a Redis that takes writes again.
    pub async fn limits_owing(&self) {
        self.limiter.owing().await;
    }
}
