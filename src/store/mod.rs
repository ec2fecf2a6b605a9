//! PostgreSQL, the source of truth: the pool, the migrations and one repository per table family.
//!
//! Every operation goes through [`Db::run`], which bounds it in time and classifies its error, so
//! an outage answers UNAVAILABLE within `DATABASE__QUERY_TIMEOUT` instead of hanging, and takes
//! its connection from the running work's share of the pool (`work`).
mod admin;
pub mod coalesce;
mod codes;
mod email;
mod erasure;
mod events;
pub mod follow;
mod generations;
mod history;
mod jwt_keys;
mod keys;
mod leases;
mod outbox;
mod profiles;
mod second_factor;
mod sessions;
pub(crate) mod tls;
mod users;
mod work;

use std::{
    future::Future,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
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

pub use admin::{AdminRepo, AdminUser, AuditEntry, SessionCursor, UserLookup};
pub use codes::{CodeRepo, Flow, Reset, StoredCode};
pub use email::{Completion, EmailDone, NotIssued};
pub use erasure::{DeletedBy, Erased, Erasure, Guard};
pub use events::{ChangeEvent, EVENT_PURGE_BATCH, EventKind, EventRepo, Reason, Stream};
pub use history::HistoryHook;
pub use jwt_keys::{JwtKeyRepo, NewJwtKey, StoredJwtKey};
pub use keys::{KeyState, StoredKey, TokenKeyRepo};
pub use leases::{
    FleetLease, Holder, Holders, INSTANCE_ALIVE, INSTANCE_BEAT, LeaseProgress, LeaseRepo, Progress,
};
pub use outbox::{Cursor, Invalidation, OutboxRepo, ProfileInvalidation, Revocation, in_flight};
pub use profiles::{ProfileRepo, UpdateOutcome};
pub use second_factor::{Attempt, Challenge, Check, Code, Refusal, SecondFactorRepo, StoredTotp};
pub use sessions::{NewSession, Proof, SessionRepo, Since, StoredSession, Touched};
pub use users::{Credentials, EMAIL_UNIQUE, NewUser, UserRepo};
pub use work::{Share, Work, as_work, carry, current as current_work, in_background};

use crate::{
    config::{ConfigError, DatabaseSettings},
    metrics::Metrics,
};

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
    /// The schema refused the statement: the role lacks a privilege (42501), or a table, column
    /// or function of a migration this release needs is missing (42P01, 42703, 42883). Not the
    /// caller's fault and not transient: an operator must grant or migrate (see
    /// [`Db::schema_problems`]).
    #[error("the database schema is not usable by this service")]
    Schema(#[source] sqlx::Error),
    #[error("database error")]
    Other(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match error {
            // A protocol error is a connection that broke mid-conversation (e.g. a proxy or
            // balancer answering the TLS request with garbage while PostgreSQL is away): as
            // passing as an I/O error.
            E::Io(_)
            | E::Tls(_)
            | E::Protocol(_)
            | E::PoolTimedOut
            | E::PoolClosed
            | E::WorkerCrashed => StoreError::Unavailable(Some(error)),
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
                } else if matches!(&*code, "42501" | "42P01" | "42703" | "42883") {
                    StoreError::Schema(error)
                } else {
                    StoreError::Other(error)
                }
            }
            other => StoreError::Other(other),
        }
    }
}

/// Connection exceptions (08), operator intervention such as a restart (57P01..57P03),
/// statement timeouts (57014), a transaction PostgreSQL ended because it stood idle or ran too
/// long (25P03, 25P04: the instance was paused in the middle of it, see [`session_options`]) and
/// "too many connections" (53300) are all passing conditions: nothing of the operation was
/// committed, and a retry may succeed.
fn is_unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("57P")
        || matches!(code, "57014" | "25P03" | "25P04" | "53300")
}

/// The options of every connection authd makes to `DATABASE__URL`: PostgreSQL ends a statement
/// after `DATABASE__QUERY_TIMEOUT` (`statement_timeout`), and a transaction left idle — its
/// instance paused (a GC-like stall, SIGSTOP, a frozen VM) or cut off in the middle of it —
/// after half of that (`idle_in_transaction_session_timeout`). Half, so that a statement of
/// another instance waiting for one of that transaction's row locks gets it before its own
/// statement timeout ends it: the paused instance delays the others' calls, it does not fail
/// them (`admin::accounts::a_transaction_paused_under_a_row_lock_delays_the_others_calls_only`). authd's
/// transactions run SQL only between their statements, never a password hash or a Redis
/// command, so no healthy transaction stands idle that long; and the outbox readers rely on
/// every transaction lasting less than their in-flight allowance.
pub fn session_options(settings: &DatabaseSettings) -> Result<PgConnectOptions, StoreError> {
    let statement_timeout = settings.query_timeout.as_millis().max(1).to_string();
    let idle_timeout = (settings.query_timeout / 2).as_millis().max(1).to_string();
    Ok(PgConnectOptions::from_str(settings.url.expose_secret())?
        .application_name("authd")
        .options([
            ("statement_timeout", statement_timeout.as_str()),
            ("idle_in_transaction_session_timeout", idle_timeout.as_str()),
        ]))
}

/// The pool's shares plus what every query shares: its time bound and a count of the queries run
/// while serving requests (which the tests and the benchmark read to prove what a cached path
/// does not do).
pub struct Db {
    /// One pool per [`Share`], in [`Share::ALL`]'s order.
    pools: Vec<PgPool>,
    query_timeout: Duration,
    queries: AtomicU64,
    /// Every query, background jobs' included.
    all_queries: AtomicU64,
    /// Operations started and not finished (holding or waiting for a connection), per share.
    in_flight: [AtomicI64; 5],
    metrics: Arc<Metrics>,
    history: history::History,
    /// Set when a statement met [`StoreError::Schema`] (and at start): the health pass then
    /// looks at the schema ([`Db::schema_problems`]) until it finds it usable.
    schema_suspect: AtomicBool,
}

/// How much longer than `DATABASE__QUERY_TIMEOUT` (PostgreSQL's `statement_timeout`) an
/// operation may take before it is given up here. PostgreSQL ends a slow statement first, and
/// the connection stays usable: a statement cut short here, mid-conversation, never gives its
/// connection back to sqlx 0.9's pool (each one a connection of the share lost for good). This
/// bound is for PostgreSQL out of reach (a partition), when the connection is lost anyway. (A
/// call's deadline or a caller hanging up cut nothing: `grpc::observe` runs each call to its
/// end on a task of its own.)
const CLIENT_MARGIN: Duration = Duration::from_millis(500);

/// Counts an operation in flight for as long as it lives (including when cancelled).
struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Db {
    /// Creates the database when allowed and missing, then builds the pool. Connections are made
    /// lazily, so a database that goes away later is reconnected by itself. A TLS failure is a
    /// misconfiguration rather than an outage, so when `DATABASE__URL` requires TLS one connection
    /// is made at once and a TLS failure stops startup, its cause named.
    /// What only this layer can judge of `DATABASE__URL`: an `sslmode` sqlx knows and
    /// certificate files that can be read (named by their parameter, never the URL). Startup runs
    /// it before anything connects, so that a typo stops it (exit 2) rather than failing at the
    /// handshake.
    pub fn check(settings: &DatabaseSettings) -> Result<(), ConfigError> {
        tls::check_url(settings.url.expose_secret())
            .map_err(|reason| ConfigError::invalid("DATABASE__URL", reason))
    }

    pub async fn connect(
        settings: &DatabaseSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let url = settings.url.expose_secret();
        let options = session_options(settings)?;
        let tls = tls::UrlTls::new(url, &options);
        tls.warn_if_unverified();
        if settings.create_if_missing {
            create_if_missing(url).await.map_err(|e| tls.explain(e))?;
        } else if tls.required() {
            tls.probe(&options, settings.acquire_timeout).await?;
        }
        let pools = settings
            .shares
            .connections(settings.max_connections)
            .into_iter()
            .map(|size| {
                PgPoolOptions::new()
                    .max_connections(size)
                    .min_connections(settings.min_connections.min(size))
                    .acquire_timeout(settings.acquire_timeout)
                    .connect_lazy_with(options.clone())
            })
            .collect();
        Ok(Self {
            pools,
            query_timeout: settings.query_timeout,
            queries: AtomicU64::new(0),
            all_queries: AtomicU64::new(0),
            in_flight: Default::default(),
            metrics,
            history: history::History::default(),
            schema_suspect: AtomicBool::new(true),
        })
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        sqlx::migrate!("./migrations").run(self.pool()).await
    }

    pub async fn close(&self) {
        futures::future::join_all(self.pools.iter().map(PgPool::close)).await;
    }

    /// The running work's share of the pool.
    fn pool(&self) -> &PgPool {
        &self.pools[work::current().share.index()]
    }

    /// Queries sent to PostgreSQL so far by this process while serving requests (background jobs
    /// excluded).
    pub fn queries_executed(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Every query sent to PostgreSQL so far by this process, background jobs' included.
    pub fn all_queries_executed(&self) -> u64 {
        self.all_queries.load(Ordering::Relaxed)
    }

    /// Publishes the state of each share of the pool (called when metrics are scraped).
    pub fn record_pool_metrics(&self) {
        let m = &self.metrics;
        for share in Share::ALL {
            let pool = &self.pools[share.index()];
            let size = i64::from(pool.size());
            let idle = i64::try_from(pool.num_idle()).unwrap_or(i64::MAX);
            let in_use = (size - idle).max(0);
            let name = share.name();
            m.db_connections
                .with_label_values(&[name, "in_use"])
                .set(in_use);
            m.db_connections
                .with_label_values(&[name, "idle"])
                .set(idle);
            let in_flight = self.in_flight[share.index()].load(Ordering::Relaxed);
            m.db_waiting
                .with_label_values(&[name])
                .set((in_flight - in_use).max(0));
        }
    }

    /// PostgreSQL's clock, read by a trivial query: whether PostgreSQL answers (health), the
    /// offset of this host's clock to the fleet's (see `clock`), and (in the same query) its
    /// history, so an idle instance notices a promoted standby here at the latest.
    pub async fn clock_timestamp(&self) -> Result<DateTime<Utc>, StoreError> {
        let (at, system, timeline) = self.read_history().await?;
        if let Err(error) = self.saw_history(system, timeline).await {
            tracing::debug!(%error, "could not record PostgreSQL's history");
        }
        Ok(at)
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

    /// Rows of the log `table` (its `columns`, as `l`) whose ids fall in `ranges` (inclusive),
    /// in id order: one statement however many ranges (the gaps a follower fills).
    async fn log_rows_within<T>(
        &self,
        table: &str,
        columns: &str,
        ranges: &[(i64, i64)],
    ) -> Result<Vec<T>, StoreError>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        let sql = format!(
            "select {columns} from {table} l
             join unnest($1::bigint[], $2::bigint[]) as r(lo, hi) on l.id between r.lo and r.hi
             order by l.id"
        );
        let (lo, hi): (Vec<i64>, Vec<i64>) = ranges.iter().copied().unzip();
        let query = sqlx::query_as::<_, T>(sqlx::AssertSqlSafe(sql))
            .bind(lo)
            .bind(hi);
        self.run(query.fetch_all(self.pool())).await
    }

    /// Runs one store operation (one round trip) within the query timeout.
    async fn run<T>(
        &self,
        operation: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        let share = work::current().share;
        self.all_queries.fetch_add(1, Ordering::Relaxed);
        let origin = if share == Share::Background {
            "background"
        } else {
            self.queries.fetch_add(1, Ordering::Relaxed);
            "request"
        };
        self.metrics.db_queries.with_label_values(&[origin]).inc();
        let in_flight = &self.in_flight[share.index()];
        in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(in_flight);
        match tokio::time::timeout(self.query_timeout + CLIENT_MARGIN, operation).await {
            Ok(result) => result.map_err(|error| {
                if matches!(error, sqlx::Error::PoolTimedOut) {
                    self.metrics
                        .db_share_timeouts
                        .with_label_values(&[share.name()])
                        .inc();
                }
                let error = StoreError::from(error);
                if let StoreError::Schema(cause) = &error {
                    self.schema_suspect.store(true, Ordering::Relaxed);
                    // PostgreSQL's message names the privilege and the object, never a value.
                    tracing::error!(
                        error = %cause,
                        "PostgreSQL refused a statement of this release: grant the app role its \
                         privileges (deploy/postgres/roles.sql) or apply the migrations"
                    );
                }
                error
            }),
            Err(_elapsed) => Err(StoreError::Unavailable(None)),
        }
    }

    /// Whether a statement met [`StoreError::Schema`] since the schema was last found usable.
    pub fn schema_suspect(&self) -> bool {
        self.schema_suspect.load(Ordering::Relaxed)
    }

    /// What keeps this release from using the schema, as an operator would fix it: migrations
    /// it needs that are not applied, and privileges the role lacks (`insert on users`). Empty
    /// when usable, which also clears [`Db::schema_suspect`].
    pub async fn schema_problems(&self) -> Result<Vec<String>, StoreError> {
        let needed = sqlx::migrate!("./migrations")
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or_default();
        let applied = sqlx::query_scalar::<_, Option<i64>>(
            "select max(version) from _sqlx_migrations where success",
        );
        let problems = match self.run(applied.fetch_one(self.pool())).await {
            Ok(applied) if applied.unwrap_or_default() >= needed => {
                let query = sqlx::query_scalar::<_, String>(PRIVILEGES).bind(&TABLES[..]);
                self.run(query.fetch_all(self.pool())).await?
            }
            Ok(applied) => vec![format!(
                "migrations up to {needed} (applied: {}): run `authd migrate`",
                applied.unwrap_or_default()
            )],
            Err(StoreError::Schema(error)) => vec![format!("the migrations table: {error}")],
            Err(other) => return Err(other),
        };
        if problems.is_empty() {
            self.schema_suspect.store(false, Ordering::Relaxed);
        }
        Ok(problems)
    }
}

/// The tables of authd's schema (every `create table` of `migrations/`; a unit test keeps the
/// list whole). Tables of others in the same schema are none of authd's business.
const TABLES: [&str; 23] = [
    "account_codes",
    "account_deletions",
    "admin_audit",
    "change_events",
    "change_events_purged",
    "database_timelines",
    "jwt_keys",
    "local_cache_fleet",
    "local_cache_instances",
    "local_cache_leases",
    "outbox_cursors",
    "previous_emails",
    "profile_invalidations",
    "profiles",
    "recovery_codes",
    "redis_fingerprints",
    "service_secrets",
    "session_invalidations",
    "sessions",
    "token_keys",
    "totp_credentials",
    "trusted_clients",
    "users",
];

/// The privileges the service's role needs (README "Docker compose" and
/// deploy/postgres/roles.sql) on [`TABLES`] (`$1`): rows of each (the audit, the secrets and
/// the signing keys append-only), their sequences, the purges of the audit and the keys, and the
/// audit's rewrites of a deleted account's addresses.
const PRIVILEGES: &str = "
    select format('%s on %s', p.privilege, t.name)
    from unnest($1::text[]) as t(name)
    cross join unnest(array['select', 'insert', 'update', 'delete']) as p(privilege)
    where not (t.name in ('admin_audit', 'jwt_keys', 'service_secrets', 'token_keys')
               and p.privilege in ('update', 'delete'))
      and not coalesce(has_table_privilege(to_regclass(t.name), p.privilege), false)
    union all
    select format('usage on sequence %s', seq.relname)
    from pg_class seq
    join pg_depend d on d.objid = seq.oid and d.deptype in ('a', 'i')
    join pg_class tab on tab.oid = d.refobjid
    where tab.relname = any($1) and tab.relnamespace = current_schema()::regnamespace
      and case when seq.relkind = 'S' then not has_sequence_privilege(seq.oid, 'usage') end
    union all
    select format('execute on function %s', f)
    from unnest(array['purge_admin_audit(bigint, bigint)', 'purge_jwt_keys(integer[], bigint)',
                       'purge_token_keys(bigint)', 'pseudonymize_admin_audit(uuid, text, timestamptz)',
                       'pseudonymize_previous_emails(uuid)']) as f
    where not coalesce(has_function_privilege(to_regprocedure(f), 'execute'), false)";

/// Creates the database of `url` unless it exists (this is also the first connection made).
async fn create_if_missing(url: &str) -> Result<(), sqlx::Error> {
    if !sqlx::Postgres::database_exists(url).await? {
        // The name only: the URL is a secret.
        let name = url::Url::parse(url)
            .ok()
            .map(|u| u.path().trim_start_matches('/').to_owned())
            .unwrap_or_default();
        match sqlx::Postgres::create_database(url).await {
            Ok(()) => tracing::info!(database = %name, "created the database"),
            // Another instance may have created it at the same moment.
            Err(sqlx::Error::Database(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A duration as the microseconds PostgreSQL intervals are built from (`$n::bigint * interval '1
/// microsecond'`).
pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    /// Every table the migrations create is one whose privileges readiness looks at.
    #[test]
    fn the_tables_are_every_table_of_the_migrations() {
        let mut created: Vec<String> =
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
                .unwrap()
                .flat_map(|entry| {
                    let sql = std::fs::read_to_string(entry.unwrap().path()).unwrap();
                    sql.lines()
                        .filter_map(|line| line.trim().strip_prefix("create table "))
                        .map(|rest| rest.split_whitespace().next().unwrap().to_owned())
                        .collect::<Vec<_>>()
                })
                .collect();
        created.sort();
        assert_eq!(created, super::TABLES);
    }
}
