//! Keeping a Redis generation established (see `cache::generation`).
use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    cache::{Fingerprint, Redis},
    store::{self, Db},
};

/// Stops serving copies, reads the identity of the Redis servers now connected and serves the
/// generation that fits it: the one already established when the servers' history merely
/// continued (a reconnection to the same servers, a replica attached: no PostgreSQL needed),
/// else the one bound to it in PostgreSQL.
pub async fn establish(redis: &Redis, db: &Db) -> Result<(), String> {
    let previous = redis.established_any();
    redis.begin_establishing().await;
    let fingerprint = match redis.fingerprint().await {
        Ok(fingerprint) => fingerprint.with_history(db.history_key()),
        Err(error) => {
            redis.explain_identity_failure(&error);
            return Err(error.to_string());
        }
    };
    if let Some((generation, earlier)) = &previous
        && fingerprint.continues(earlier)
    {
        redis.adopt(*generation, fingerprint.clone());
        // Recorded for instances that start later (best effort: this one needs nothing more).
        let _ = db
            .redis_generation(&fingerprint.text(), i64::try_from(*generation).ok())
            .await;
        return Ok(());
    }
    let generation = bind(db, &fingerprint).await?;
    redis.adopt(generation, fingerprint);
    Ok(())
}

/// The generation of `fingerprint` in PostgreSQL: already bound, or continuing a recent one, or
/// new.
async fn bind(db: &Db, fingerprint: &Fingerprint) -> Result<u64, String> {
    let text = fingerprint.text();
    let recent = db.recent_fingerprints().await.map_err(|e| e.to_string())?;
    let continued = recent
        .iter()
        .filter(|(earlier, _)| *earlier != text)
        .filter(|(earlier, _)| {
            Fingerprint::parse(earlier).is_some_and(|earlier| fingerprint.continues(&earlier))
        })
        .map(|(_, generation)| *generation)
        .max();
    let generation = db
        .redis_generation(&text, continued)
        .await
        .map_err(|e| e.to_string())?;
    Ok(generation.unsigned_abs())
}

/// Keeps a generation established: at once after every reconnection, and every `period`
/// compares the servers' identity with the established one (a restart or failover that no
/// reconnection revealed still starts a new generation), publishing each primary's figures on
/// the way.
pub async fn keep(redis: Redis, db: Arc<Db>, period: Duration, stop: CancellationToken) {
    loop {
        // With Sentinel, a client still on a demoted-to-be primary moves first (its
        // reconnection then makes this pass establish the new generation).
        redis.follow_sentinels().await;
        let ok = if redis.needs_generation() {
            store::in_background(establish(&redis, &db)).await
        } else {
            let now = store::in_background(redis.fingerprint()).await;
            match now.map(|f| f.with_history(db.history_key())) {
                Ok(now) if Some(&now) == redis.established().as_ref() => Ok(()),
                Ok(now)
                    if redis
                        .established()
                        .is_some_and(|earlier| now.continues(&earlier)) =>
                {
                    if let Some((generation, _)) = redis.established_any() {
                        redis.adopt(generation, now);
                    }
                    Ok(())
                }
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
        redis.survey().await;
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
