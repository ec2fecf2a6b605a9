//! gRPC health that tells the truth. `liveness` is SERVING while the process can answer at all.
//! `""` and each service are SERVING while PostgreSQL answers (an outage shorter than
//! `HEALTH__DB_GRACE` is tolerated) and the server is not shutting down. Redis being down does
//! not make authd unhealthy: it is degraded, and `authd_redis_up` says so.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{clock::Clock, metrics::Metrics, store::Db};

/// The services whose health follows the dependencies (besides the overall "").
pub const SERVICES: [&str; 2] = ["authd.v1.AuthService", "authd.v1.ProfileService"];
/// Always SERVING while the process answers: for liveness probes.
pub const LIVENESS: &str = "liveness";

#[derive(Default)]
struct State {
    db_down_since: Option<Instant>,
    db_unhealthy: bool,
    draining: bool,
}

pub struct Health {
    reporter: HealthReporter,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

impl Health {
    pub fn new(reporter: HealthReporter, metrics: Arc<Metrics>) -> Self {
        metrics.db_up.set(1);
        Self {
            reporter,
            state: Mutex::new(State::default()),
            metrics,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the current status to every health service name.
    async fn publish(&self) {
        let serving = {
            let s = self.state();
            !s.draining && !s.db_unhealthy
        };
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in std::iter::once("").chain(SERVICES) {
            self.reporter.set_service_status(service, status).await;
        }
    }

    pub async fn start_serving(&self) {
        self.reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        self.publish().await;
    }

    /// Shutdown: NOT_SERVING for good (liveness stays SERVING until the process exits).
    pub async fn drain(&self) {
        self.state().draining = true;
        self.publish().await;
    }

    /// Records one PostgreSQL check; flips health when the outage passes `grace` or ends.
    pub async fn record_db_check(&self, ok: bool, grace: Duration) {
        let changed = {
            let mut s = self.state();
            let now = Instant::now();
            if ok {
                s.db_down_since = None;
            } else if s.db_down_since.is_none() {
                s.db_down_since = Some(now);
            }
            let unhealthy = s
                .db_down_since
                .is_some_and(|since| now.duration_since(since) >= grace);
            let changed = unhealthy != s.db_unhealthy;
            s.db_unhealthy = unhealthy;
            changed
        };
        if changed {
            let up = !self.state().db_unhealthy;
            self.metrics.db_up.set(i64::from(up));
            if up {
                tracing::info!("PostgreSQL answers again; health is SERVING");
            } else {
                tracing::error!(
                    ?grace,
                    "PostgreSQL unreachable beyond the grace period; health is NOT_SERVING"
                );
            }
            self.publish().await;
        }
    }

    /// One health pass: read PostgreSQL's clock (which also calibrates the fleet clock) and
    /// record the outcome.
    pub async fn check_db(&self, db: &Db, clock: &Clock, grace: Duration) {
        let sent = clock.local();
        let answer = db.clock_timestamp().await;
        if let Ok(database) = answer {
            clock.calibrate(sent, database, clock.local());
        }
        self.record_db_check(answer.is_ok(), grace).await;
    }
}
