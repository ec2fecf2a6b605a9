//! Background jobs every instance runs: establishing the Redis generation, following the outbox
//! logs into Redis, purging ended sessions and old log rows, counting live sessions, checking
//! PostgreSQL for health (and reading its clock). Their queries are not counted as requests'
//! queries.
pub mod follow;
pub mod generation;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{Access, AdminService},
    auth::AuthService,
    cache::Redis,
    clock::Clock,
    config::Settings,
    health::Health,
    metrics::Metrics,
    store::{self, Db},
};

/// Runs `job` every `period` until `stop`.
async fn every<F, Fut>(period: Duration, stop: CancellationToken, job: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    every_or_when(period, stop, std::future::pending, job).await;
}

/// [`every`], and also as soon as `wake` resolves.
async fn every_or_when<F, Fut, W, WFut>(period: Duration, stop: CancellationToken, wake: W, job: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
    W: Fn() -> WFut,
    WFut: Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
            () = wake() => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = store::in_background(job()) => {}
        }
    }
}

/// One pass over the outbox logs, tried again soon (100 ms, then twice as long each time, while
/// under `period`) when it did not complete: a pass that met a reconnection not yet looked at,
/// or a write that failed, counts for nothing, and nothing of the generation is served until
/// one completes — waiting for the next tick would leave the cache unused for a whole
/// `SESSION__INVALIDATION_INTERVAL` after a failover (the wake on adoption had been spent on
/// that pass). An instance with a long interval served from PostgreSQL alone, for good, after a
/// Cluster failover one run in three under load (`deployments::a_cluster_failover_to_a_replica_…`).
async fn follow_until_complete(follower: &follow::Follower, period: Duration) {
    let mut retry = FOLLOW_RETRY;
    loop {
        match follower.pass().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(error) => tracing::debug!(%error, "could not follow the outbox logs; retrying"),
        }
        if retry >= period {
            return;
        }
        tokio::time::sleep(retry).await;
        retry *= 2;
    }
}

/// The first wait before an incomplete pass over the outbox logs is tried again.
const FOLLOW_RETRY: Duration = Duration::from_millis(100);

/// How often refused AdminService calls over the audit's row rate are written, summed up.
const AUDIT_FLUSH_INTERVAL: Duration = Duration::from_secs(10);

/// How often live sessions are counted (a full count: not too often).
const LIVE_COUNT_INTERVAL: Duration = Duration::from_secs(30);

pub struct Jobs {
    pub auth: Arc<AuthService>,
    pub follower: Arc<follow::Follower>,
    pub redis: Redis,
    pub db: Arc<Db>,
    pub health: Arc<Health>,
    pub clock: Arc<Clock>,
    pub metrics: Arc<Metrics>,
    /// Reloads the gRPC port's TLS files when they rotated (every
    /// `GRPC__TLS__RELOAD_INTERVAL`).
    pub reload_tls: Option<Arc<dyn Fn() + Send + Sync>>,
    /// AdminService (its keys file to watch).
    pub admin: Option<Arc<AdminService>>,
    /// Other callers' admission lists (EventService's subscribers, AccountService's notifiers):
    /// their keys files to watch, each at its reload interval.
    pub access_lists: Vec<(Arc<Access>, Duration)>,
}

impl Jobs {
    /// Starts every job; they stop when `stop` is cancelled.
    pub fn spawn(self, settings: &Settings, stop: &CancellationToken) -> Vec<JoinHandle<()>> {
        let Jobs {
            auth,
            follower,
            redis,
            db,
            health,
            clock,
            metrics,
            reload_tls,
            admin,
            access_lists,
        } = self;
        let mut jobs = Vec::new();
        if let Some(reload_tls) = reload_tls {
            let reload = move || {
                reload_tls();
                async {}
            };
            jobs.push(tokio::spawn(every(
                settings.grpc.tls.reload_interval,
                stop.clone(),
                reload,
            )));
        }
        for (access, interval) in access_lists {
            let reload = move || {
                access.reload();
                async {}
            };
            jobs.push(tokio::spawn(every(interval, stop.clone(), reload)));
        }
        if let Some(admin) = admin {
            let keys = admin.clone();
            let reload = move || {
                keys.access.reload();
                async {}
            };
            jobs.push(tokio::spawn(every(
                settings.admin.reload_interval,
                stop.clone(),
                reload,
            )));
            // Not `every`: a flush in progress is not cancelled by the stop (it would lose
            // what it had taken); what was summed up since is written on the way out.
            let stopped = stop.clone();
            jobs.push(tokio::spawn(async move {
                let mut ticker = tokio::time::interval(AUDIT_FLUSH_INTERVAL);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stopped.cancelled() => break,
                        _ = ticker.tick() => {}
                    }
                    store::in_background(admin.flush_refused()).await;
                }
                store::in_background(admin.flush_refused()).await;
            }));
        }
        if redis.is_enabled() {
            let period = settings.session.invalidation_interval;
            let pass = move || {
                let follower = follower.clone();
                async move { follow_until_complete(&follower, period).await }
            };
            // At once when a new generation was adopted: nothing of it is served before a pass
            // in it (`cache::Redis::adopt`).
            let adopted = redis.clone();
            jobs.push(tokio::spawn(every_or_when(
                settings.session.invalidation_interval,
                stop.clone(),
                move || {
                    let adopted = adopted.clone();
                    async move { adopted.new_generation().await }
                },
                pass,
            )));
            jobs.push(tokio::spawn(generation::keep(
                redis,
                db.clone(),
                settings.redis.check_interval,
                stop.clone(),
            )));
        }
        let retention = settings.session.retention;
        let pc = &settings.profile_cache;
        // No cached profile outlives its TTL; keep log rows twice that (settings may differ
        // between instances), and at least a day.
        let profile_log = (pc.ttl.mul_f64(1.0 + pc.jitter) * 2).max(Duration::from_secs(86_400));
        let cursor_retention = settings.session.absolute_timeout;
        let audit_retention = settings.audit.retention;
        let event_retention = settings.events.retention;
        let purge = {
            let (auth, db) = (auth.clone(), db.clone());
            move || {
                let (auth, db) = (auth.clone(), db.clone());
                async move {
                    if let Err(error) = auth.purge_sessions(retention).await {
                        tracing::warn!(%error, "session purge failed; retrying next time");
                    }
                    if let Err(error) = db.outbox().purge(profile_log, cursor_retention).await {
                        tracing::warn!(%error, "outbox purge failed; retrying next time");
                    }
                    // Written by every change, whether any instance serves the stream or not;
                    // in batches, until nothing old is left.
                    loop {
                        match db.events().purge(event_retention).await {
                            Ok(store::EVENT_PURGE_BATCH) => continue,
                            Ok(_) => break,
                            Err(error) => {
                                tracing::warn!(%error, "event log purge failed; retrying next time");
                                break;
                            }
                        }
                    }
                    // In batches, until nothing old is left.
                    loop {
                        match db.admin().purge_audit(audit_retention, 1000).await {
                            Ok(1000) => continue,
                            Ok(_) => break,
                            Err(error) => {
                                tracing::warn!(%error, "audit purge failed; retrying next time");
                                break;
                            }
                        }
                    }
                }
            }
        };
        let sweep = {
            let auth = auth.clone();
            move || {
                let auth = auth.clone();
                async move { auth.sweep_limits().await }
            }
        };
        let keys = {
            let auth = auth.clone();
            move || {
                let auth = auth.clone();
                async move {
                    if let Err(error) = auth.refresh_keys().await {
                        tracing::warn!(
                            %error,
                            "could not make or reload the token or JWT signing keys; retrying"
                        );
                    }
                }
            }
        };
        jobs.push(tokio::spawn(every(
            crate::auth::keys::KEY_REFRESH,
            stop.clone(),
            keys,
        )));
        jobs.push(tokio::spawn(every(
            LIVE_COUNT_INTERVAL,
            stop.clone(),
            sweep,
        )));
        // Attempts owed to Redis are written as soon as it takes writes again.
        let owing = {
            let (auth, stop) = (auth.clone(), stop.clone());
            async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = auth.limits_owing() => {}
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = store::in_background(auth.settle_limits()) => {}
                    }
                }
            }
        };
        jobs.push(tokio::spawn(owing));
        let idle = settings.session.idle_timeout;
        let count = {
            let db = db.clone();
            move || {
                let (db, metrics) = (db.clone(), metrics.clone());
                async move {
                    if let Ok(live) = db.sessions().count_live(idle).await {
                        metrics.sessions_live.set(live);
                    }
                }
            }
        };
        jobs.push(tokio::spawn(every(
            LIVE_COUNT_INTERVAL,
            stop.clone(),
            count,
        )));
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
