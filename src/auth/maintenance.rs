//! Background work every instance does: re-applying queued invalidations to Redis, and purging
//! sessions that ended long ago.
use std::time::Duration;

use super::AuthService;
use crate::store::StoreError;

/// At most this many queued invalidations are applied per drain pass.
const DRAIN_BATCH: i64 = 500;
/// Rows deleted per purge statement: small enough to never hold locks for long.
const PURGE_BATCH: i64 = 1000;

impl AuthService {
    /// One pass over the session invalidations queued by any instance (only instances with
    /// Redis run it); `true` when everything queued has reached Redis.
    pub async fn drain_invalidations(&self) -> Result<bool, StoreError> {
        let pending = self.db.outbox().pending_sessions(DRAIN_BATCH).await?;
        let complete = self.apply(&pending).await;
        Ok(complete && (pending.len() as i64) < DRAIN_BATCH)
    }

    /// Deletes sessions revoked or expired more than `retention` ago, in small batches; returns
    /// how many.
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
        Ok(total)
    }
}
