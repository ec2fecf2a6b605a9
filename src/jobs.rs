//! Background jobs every instance runs: re-applying queued invalidations to Redis, purging ended
//! sessions, checking PostgreSQL for health. Their queries are not counted as requests' queries.
use std::{future::Future, sync::Arc, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::AuthService,
    cache::Redis,
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
/// cached copies again (see `cache::Redis::trusted`).
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

pub struct Jobs {
    pub auth: Arc<AuthService>,
    pub profiles: Arc<ProfileService>,
    pub redis: Redis,
    pub db: Arc<Db>,
    pub health: Arc<Health>,
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
        } = self;
        let drain = {
            let auth = auth.clone();
            move || drain_invalidations(auth.clone(), profiles.clone(), redis.clone())
        };
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
            let (health, db) = (health.clone(), db.clone());
            async move { health.check_db(&db, grace).await }
        };
        let s = &settings.session;
        vec![
            tokio::spawn(every(s.invalidation_interval, stop.clone(), drain)),
            tokio::spawn(every(s.purge_interval, stop.clone(), purge)),
            tokio::spawn(every(
                settings.health.db_check_interval,
                stop.clone(),
                check,
            )),
        ]
    }
}
