//! gRPC health that tells the truth. `liveness` is SERVING while the process can answer at all.
//! `""` and each service are SERVING while PostgreSQL answers (an outage shorter than
//! `HEALTH__DB_GRACE` is tolerated), the schema is usable (this release's migrations applied, the
//! role's privileges granted) and the server is not shutting down. Redis being down does
//! not make authd unhealthy: it is degraded, and `authd_redis_up` says so. On shutdown every
//! open Watch stream is sent the status in force and ended, so watchers (service meshes,
//! clients) do not hold the drain up.
use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::{
    ServingStatus,
    pb::{
        HealthCheckRequest, HealthCheckResponse,
        health_server::{self, HealthServer},
    },
    server::{HealthReporter, HealthService},
};

use crate::{clock::Clock, metrics::Metrics, store::Db};

/// The services whose health follows the dependencies (besides the overall "").
pub const SERVICES: [&str; 2] = ["authd.v1.AuthService", "authd.v1.ProfileService"];
/// Always SERVING while the process answers: for liveness probes.
pub const LIVENESS: &str = "liveness";

#[derive(Default)]
struct State {
    db_down_since: Option<Instant>,
    db_unhealthy: bool,
    /// What keeps the schema from being used (empty: usable).
    schema_problems: Vec<String>,
    draining: bool,
}

pub struct Health {
    reporter: HealthReporter,
    service: Arc<HealthService>,
    /// Cancelled once draining has been published: Watch streams end.
    drained: CancellationToken,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        metrics.db_up.set(1);
        let reporter = HealthReporter::new();
        Self {
            service: Arc::new(HealthService::from_health_reporter(reporter.clone())),
            reporter,
            drained: CancellationToken::new(),
            state: Mutex::new(State::default()),
            metrics,
        }
    }

    /// The `grpc.health.v1.Health` service reporting this health (every port serves the same).
    pub fn server(&self) -> HealthServer<Watched> {
        HealthServer::new(Watched {
            inner: self.service.clone(),
            drained: self.drained.clone(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the current status to every health service name.
    async fn publish(&self) {
        let serving = {
            let s = self.state();
            !s.draining && !s.db_unhealthy && s.schema_problems.is_empty()
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

    /// Shutdown: NOT_SERVING for good (liveness stays SERVING until the process exits); every
    /// Watch stream is sent the status in force and ends.
    pub async fn drain(&self) {
        self.state().draining = true;
        self.publish().await;
        self.drained.cancel();
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

    /// Records what keeps the schema from being used (nothing: usable); NOT_SERVING while
    /// anything does, so traffic goes to instances that can serve it.
    pub async fn record_schema(&self, problems: Vec<String>) {
        let changed = {
            let mut s = self.state();
            let changed = problems != s.schema_problems;
            s.schema_problems = problems;
            changed
        };
        if changed {
            let problems = self.state().schema_problems.join(", ");
            if problems.is_empty() {
                tracing::info!("the database schema is usable again; health is SERVING");
            } else {
                tracing::error!(
                    %problems,
                    "the database schema is not usable by this release (missing privileges of \
                     the role, or migrations not applied); health is NOT_SERVING until it is"
                );
            }
            self.publish().await;
        }
    }

    /// One health pass: read PostgreSQL's clock (which also calibrates the fleet clock) and
    /// record the outcome; look at the schema at the first pass and after a statement it
    /// refused, until it is usable.
    pub async fn check_db(&self, db: &Db, clock: &Clock, grace: Duration) {
        let sent = clock.local();
        let answer = db.clock_timestamp().await;
        if let Ok(database) = answer {
            clock.calibrate(sent, database, clock.local());
            if db.schema_suspect() {
                match db.schema_problems().await {
                    Ok(problems) => self.record_schema(problems).await,
                    Err(error) => tracing::warn!(%error, "could not look at the database schema"),
                }
            }
        }
        self.record_db_check(answer.is_ok(), grace).await;
    }
}

/// tonic-health's service, with Watch streams that end on drain (after the status in force,
/// unless the watcher has it already).
pub struct Watched {
    inner: Arc<HealthService>,
    drained: CancellationToken,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl health_server::Health for Watched {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        health_server::Health::check(self.inner.as_ref(), request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let service = request.get_ref().service.clone();
        let updates = health_server::Health::watch(self.inner.as_ref(), request)
            .await?
            .into_inner();
        let sent = Arc::new(Mutex::new(None::<i32>));
        let seen = sent.clone();
        let updates = updates
            .inspect(move |update| {
                if let Ok(update) = update {
                    *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(update.status);
                }
            })
            .take_until(self.drained.clone().cancelled_owned());
        let inner = self.inner.clone();
        let last = futures::stream::once(async move {
            let now = health_server::Health::check(
                inner.as_ref(),
                Request::new(HealthCheckRequest { service }),
            )
            .await
            .ok()?
            .into_inner();
            let already = *sent.lock().unwrap_or_else(|e| e.into_inner()) == Some(now.status);
            (!already).then_some(Ok(now))
        })
        .filter_map(std::future::ready);
        Ok(Response::new(Box::pin(updates.chain(last))))
    }
}
