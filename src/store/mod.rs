//! PostgreSQL, the source of truth: the pool, the migrations and one repository per table family.
//!
//! Every operation goes through [`Db::run`], which bounds it in time and classifies its error, so
//! an outage answers UNAVAILABLE within `DATABASE__QUERY_TIMEOUT` instead of hanging.
mod generations;
mod outbox;
mod profiles;
mod sessions;
mod users;

use std::{
    future::Future,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use sqlx::{
    PgPool,
    migrate::MigrateDatabase,
    postgres::{PgConnectOptions, PgPoolOptions},
};

pub use outbox::{Cursor, Invalidation, OutboxRepo, ProfileInvalidation, Revocation, in_flight};
pub use profiles::{ProfileRepo, UpdateOutcome};
pub use sessions::{NewSession, SessionRepo, Since, StoredSession};
pub use users::{Credentials, EMAIL_UNIQUE, NewUser, UserRepo};

use crate::{config::DatabaseSettings, metrics::Metrics};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// PostgreSQL could not be reached, or did not answer in time.
    #[error("database unavailable")]
    Unavailable(#[source] Option<sqlx::Error>),
    /// A unique constraint rejected the write.
    #[error("unique constraint {constraint} violated")]
    Conflict { constraint: String },
    /// A deadlock or serialization failure that persisted through the retries: retryable.
    #[error("database contention")]
    Contention(#[source] sqlx::Error),
    #[error("database error")]
    Other(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match error {
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
                StoreError::Unavailable(Some(error))
            }
            E::Database(ref db) => {
                let code = db.code().unwrap_or_default();
                if db.is_unique_violation() {
                    StoreError::Conflict {
                        constraint: db.constraint().unwrap_or_default().to_owned(),
                    }
                } else if code == "40P01" || code == "40001" {
                    StoreError::Contention(error)
                } else if is_unavailable_sqlstate(&code) {
                    StoreError::Unavailable(Some(error))
                } else {
                    StoreError::Other(error)
                }
            }
            other => StoreError::Other(other),
        }
    }
}

/// Connection exceptions (08), operator intervention such as a restart (57P01..57P03),
/// statement timeouts (57014) and "too many connections" (53300) are all passing conditions.
fn is_unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57P") || code == "57014" || code == "53300"
}

tokio::task_local! {
    /// Set for background jobs, whose queries are not counted as requests' queries.
    static BACKGROUND: ();
}

/// Runs `job` as background work: its queries are left out of [`Db::queries_executed`].
pub async fn in_background<F: Future>(job: F) -> F::Output {
    BACKGROUND.scope((), job).await
}

/// The pool plus what every query shares: its time bound and a count of the queries run while
/// serving requests (which the tests and the benchmark read to prove what a cached path does not
/// do).
pub struct Db {
    pool: PgPool,
    query_timeout: Duration,
    queries: AtomicU64,
    /// Operations started and not finished (holding or waiting for a connection).
    in_flight: AtomicI64,
    metrics: Arc<Metrics>,
}

/// Counts an operation in flight for as long as it lives (including when cancelled).
struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Db {
    /// Creates the database when allowed and missing, then builds the pool. Connections are made
    /// lazily, so a database that goes away later is reconnected by itself.
    pub async fn connect(
        settings: &DatabaseSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let url = settings.url.expose_secret();
        if settings.create_if_missing && !sqlx::Postgres::database_exists(url).await? {
            match sqlx::Postgres::create_database(url).await {
                // Another instance may have created it at the same moment.
                Ok(()) | Err(sqlx::Error::Database(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let statement_timeout = settings.query_timeout.as_millis().to_string();
        let options = PgConnectOptions::from_str(url)?
            .application_name("authd")
            // A transaction left idle (a paused or partitioned client) is ended too: the outbox
            // readers rely on every transaction lasting less than their in-flight allowance.
            .options([
                ("statement_timeout", statement_timeout.as_str()),
                (
                    "idle_in_transaction_session_timeout",
                    statement_timeout.as_str(),
                ),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(settings.min_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            query_timeout: settings.query_timeout,
            queries: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            metrics,
        })
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        sqlx::migrate!("./migrations").run(&self.pool).await
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Queries sent to PostgreSQL so far by this process while serving requests (background jobs
    /// excluded).
    pub fn queries_executed(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Publishes the pool's state (called when metrics are scraped).
    pub fn record_pool_metrics(&self) {
        let size = i64::from(self.pool.size());
        let idle = i64::try_from(self.pool.num_idle()).unwrap_or(i64::MAX);
        let in_use = (size - idle).max(0);
        let m = &self.metrics;
        m.db_connections.with_label_values(&["in_use"]).set(in_use);
        m.db_connections.with_label_values(&["idle"]).set(idle);
        m.db_waiting
            .set((self.in_flight.load(Ordering::Relaxed) - in_use).max(0));
    }

    /// PostgreSQL's clock, read by a trivial query: whether PostgreSQL answers (health), and the
    /// offset of this host's clock to the fleet's (see `clock`).
    pub async fn clock_timestamp(&self) -> Result<DateTime<Utc>, StoreError> {
        let query = sqlx::query_scalar("select clock_timestamp()");
        self.run(query.fetch_one(&self.pool)).await
    }

    /// Runs a transactional operation again when it lost a deadlock or a serialization conflict
    /// (at most three times in all, after a short random pause); what still fails is
    /// [`StoreError::Contention`], which callers answer as retryable.
    pub(crate) async fn retrying<T, F, Fut>(&self, mut operation: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut attempt = 1;
        loop {
            match operation().await {
                Err(StoreError::Contention(error)) if attempt < 3 => {
                    tracing::debug!(%error, attempt, "retrying after a database conflict");
                    attempt += 1;
                    let pause = Duration::from_millis(fastrand::u64(1..=10 * attempt));
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }

    /// Runs one store operation (one round trip) within the query timeout.
    async fn run<T>(
        &self,
        operation: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        let origin = if BACKGROUND.try_with(|_| ()).is_err() {
            self.queries.fetch_add(1, Ordering::Relaxed);
            "request"
        } else {
            "background"
        };
        self.metrics.db_queries.with_label_values(&[origin]).inc();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.in_flight);
        match tokio::time::timeout(self.query_timeout, operation).await {
            Ok(result) => result.map_err(StoreError::from),
            Err(_elapsed) => Err(StoreError::Unavailable(None)),
        }
    }
}

/// A duration as the microseconds PostgreSQL intervals are built from (`$n::bigint * interval '1
/// microsecond'`).
pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
