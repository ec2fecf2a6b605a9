//! Keeping a Redis generation established (see `cache::generation`).
use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    cache::Redis,
    store::{self, Db},
};

/// Stops serving copies, reads the identity of the Redis servers now connected and serves the
/// generation bound to it: the one already established when the identity has not changed (a
/// reconnection to the same servers; no PostgreSQL needed), else one bound in PostgreSQL.
pub async fn establish(redis: &Redis, db: &Db) -> Result<(), String> {
    let previous = redis.established_any();
    redis.begin_establishing().await;
    let fingerprint = match redis.fingerprint().await {
        Ok(fingerprint) => fingerprint,
        Err(error) => {
            redis.explain_identity_failure(&error);
            return Err(error.to_string());
        }
    };
    if let Some((generation, same)) = previous
        && same == fingerprint
    {
        redis.adopt(generation, fingerprint);
        return Ok(());
    }
    let generation = db
        .redis_generation(&fingerprint.0)
        .await
        .map_err(|e| e.to_string())?;
    redis.adopt(generation.unsigned_abs(), fingerprint);
    Ok(())
}

/// Keeps a generation established: at once after every reconnection or topology change, and
/// every `period` compares the servers' identity with the established one (a restart or failover
/// that no reconnection revealed still starts a new generation).
pub async fn keep(redis: Redis, db: Arc<Db>, period: Duration, stop: CancellationToken) {
    loop {
        let ok = if redis.needs_generation() {
            store::in_background(establish(&redis, &db)).await
        } else {
            match store::in_background(redis.fingerprint()).await {
                Ok(now) if Some(&now) == redis.established().as_ref() => Ok(()),
                Ok(_) => {
                    tracing::warn!("the redis servers changed identity; starting a new generation");
                    store::in_background(establish(&redis, &db)).await
                }
                Err(error) => {
                    redis.explain_identity_failure(&error);
                    Err(error.to_string())
                }
            }
        };
        let wait = match ok {
            Ok(()) => period,
            Err(_) => Duration::from_millis(100).min(period),
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = redis.changed() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}
