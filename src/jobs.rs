//! Background jobs every instance runs: establishing the Redis generation, re-applying queued
//! invalidations to Redis, purging ended sessions, checking PostgreSQL for health (and reading
//! its clock). Their queries are not counted as requests' queries.
use std::{future::Future, sync::Arc, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::AuthService,
    cache::Redis,
    clock::Clock,
    config::Settings,
    health::Health,
    profile::ProfileService,
    store::{self, Db},
};

/// Runs `job` every `period` until `stop`.
async fn every<F, Fut>(period: Duration, stop: CancellationToken, job: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = store::in_background(job()) => {}
        }
    }
}

/// Re-applies, to Redis, revocations and profile versions whose Redis step failed on any
/// instance. When everything queued before the pass began has been applied, this instance trusts
/// cached copies again (see `cache::Redis::serving_generation`). Only instances with Redis run
/// it: the queue is theirs to empty.
async fn drain_invalidations(auth: Arc<AuthService>, profiles: Arc<ProfileService>, redis: Redis) {
    let mark = redis.failure_mark();
    let sessions = auth.drain_invalidations().await;
    let profiles = profiles.drain_invalidations().await;
    match (sessions, profiles) {
        (Ok(true), Ok(true)) => redis.trust(mark),
        (Ok(_), Ok(_)) => {}
        (Err(error), _) | (_, Err(error)) => {
            tracing::debug!(%error, "could not drain queued invalidations; retrying");
        }
    }
}

/// Stops serving copies, reads the identity of the Redis servers now connected, binds it to a
/// generation in PostgreSQL and serves that generation's copies (see `cache::generation`).
pub async fn establish_generation(redis: &Redis, db: &Db) -> Result<(), String> {
    redis.begin_establishing().await;
    let fingerprint = redis.fingerprint().await.map_err(|e| e.to_string())?;
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
async fn keep_generation(redis: Redis, db: Arc<Db>, period: Duration, stop: CancellationToken) {
    loop {
        let ok = if redis.needs_generation() {
            store::in_background(establish_generation(&redis, &db)).await
        } else {
            match store::in_background(redis.fingerprint()).await {
                Ok(now) if Some(&now) == redis.established().as_ref() => Ok(()),
                Ok(_) => {
                    tracing::warn!("the redis servers changed identity; starting a new generation");
                    store::in_background(establish_generation(&redis, &db)).await
                }
                Err(error) => Err(error.to_string()),
            }
        };
        if let Err(error) = &ok {
            tracing::debug!(%error, "cannot establish the redis generation; retrying");
        }
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

pub struct Jobs {
    pub auth: Arc<AuthService>,
    pub profiles: Arc<ProfileService>,
    pub redis: Redis,
    pub db: Arc<Db>,
    pub health: Arc<Health>,
    pub clock: Arc<Clock>,
}

impl Jobs {
    /// Starts every job; they stop when `stop` is cancelled.
    pub fn spawn(self, settings: &Settings, stop: &CancellationToken) -> Vec<JoinHandle<()>> {
        let Jobs {
            auth,
            profiles,
            redis,
            db,
            health,
            clock,
        } = self;
        let mut jobs = Vec::new();
        if redis.is_enabled() {
            let drain = {
                let (auth, redis) = (auth.clone(), redis.clone());
                move || drain_invalidations(auth.clone(), profiles.clone(), redis.clone())
            };
            let s = &settings.session;
            jobs.push(tokio::spawn(every(
                s.invalidation_interval,
                stop.clone(),
                drain,
            )));
            jobs.push(tokio::spawn(keep_generation(
                redis,
                db.clone(),
                settings.redis.check_interval,
                stop.clone(),
            )));
        }
        let retention = settings.session.retention;
        let purge = move || {
            let auth = auth.clone();
            async move {
                if let Err(error) = auth.purge_sessions(retention).await {
                    tracing::warn!(%error, "session purge failed; retrying next time");
                }
            }
        };
        let grace = settings.health.db_grace;
        let check = move || {
            let (health, db, clock) = (health.clone(), db.clone(), clock.clone());
            async move { health.check_db(&db, &clock, grace).await }
        };
        jobs.push(tokio::spawn(every(
            settings.session.purge_interval,
            stop.clone(),
            purge,
        )));
        jobs.push(tokio::spawn(every(
            settings.health.db_check_interval,
            stop.clone(),
            check,
        )));
        jobs
    }
}
