//! Which history of PostgreSQL's data authd talks to: the system identifier (which database
//! cluster) and the timeline (a promoted standby, or a point-in-time restore, starts a new one).
//!
//! An asynchronous standby may have missed the last commits of its primary, lease extensions
//! among them: after a failover the lease table may say a holder's lease ended while the holder,
//! which extended it on the old primary, still believes in it. So a new history is noticed on
//! the queries the protocol of `crate::local` makes anyway (every one of them returns the
//! timeline), recorded with the time it was first seen (`database_timelines`), and for one lease
//! after that every revoking call waits as if every instance held a lease ([`Db::history_window`]);
//! the hooks (the in-process cache's doubt, a new Redis generation) run at once.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{Db, StoreError};
use crate::clock::lease_wait;

/// The SQL of the current timeline (cheap: no file read), eight hex digits.
pub(super) const TIMELINE: &str = "substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)";

/// A hook run when PostgreSQL's history changes under a running instance.
pub type HistoryHook = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
pub(super) struct History {
    known: Mutex<Known>,
    hooks: Mutex<Vec<HistoryHook>>,
}

#[derive(Default, Clone)]
struct Known {
    system: String,
    timeline: String,
    /// When the window after this history's start ends (`None`: no window).
    window_ends: Option<Instant>,
    /// The window's length (the longest lease held or agreed when the history was seen).
    window: Option<Duration>,
}

impl Db {
    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.history
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `hook` whenever this instance notices that PostgreSQL's history changed.
    pub fn on_history_change(&self, hook: HistoryHook) {
        self.history
            .hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(hook);
    }

    /// `system/timeline` of the history this instance last saw (empty before the first check):
    /// the Redis generation is bound to it too.
    pub fn history_key(&self) -> String {
        let known = self.known();
        format!("{}/{}", known.system, known.timeline)
    }

    /// Reads the whole identity (system identifier and timeline): at startup (and with every
    /// health check, see [`Db::clock_timestamp`]).
    pub async fn check_history(&self) -> Result<(), StoreError> {
        let (_, system, timeline) = self.read_history().await?;
        self.saw(system, timeline).await
    }

    /// PostgreSQL's clock, system identifier and timeline.
    pub(super) async fn read_history(
        &self,
    ) -> Result<(chrono::DateTime<chrono::Utc>, String, String), StoreError> {
        let sql = format!(
            "select clock_timestamp(), system_identifier::text, {TIMELINE} from pg_control_system()"
        );
        let query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
        self.run(query.fetch_one(self.pool())).await
    }

    pub(super) async fn saw_history(
        &self,
        system: String,
        timeline: String,
    ) -> Result<(), StoreError> {
        self.saw(system, timeline).await
    }

    /// A query of the lease protocol answered on `timeline`.
    pub(super) async fn saw_timeline(&self, timeline: String) -> Result<(), StoreError> {
        let system = self.known().system.clone();
        self.saw(system, timeline).await
    }

    async fn saw(&self, system: String, timeline: String) -> Result<(), StoreError> {
        let first = {
            let known = self.known();
            if known.system == system && known.timeline == timeline {
                return Ok(());
            }
            known.timeline.is_empty()
        };
        let key = format!("{system}/{timeline}");
        let (replaced, age_us, lease_us) = self.record_history(&key).await?;
        let window = lease_wait(Duration::from_micros(lease_us.max(0).unsigned_abs()));
        let age = Duration::from_micros(age_us.max(0).unsigned_abs());
        let window_ends = (replaced && age < window).then(|| Instant::now() + (window - age));
        *self.known() = Known {
            system,
            timeline,
            window_ends,
            window: replaced.then_some(window),
        };
        if !first {
            tracing::warn!(
                history = %key,
                "postgresql changed history (a failover to a standby, or a restore): copies made \
                 before are not trusted, and revoking calls wait one lease for whoever held one"
            );
            let hooks = self
                .history
                .hooks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            for hook in hooks {
                hook();
            }
        } else if window_ends.is_some() {
            tracing::warn!(history = %key, "postgresql's history changed recently");
        }
        Ok(())
    }

    /// Records a history (first seen now, unless already recorded): whether it replaced an
    /// earlier one, how long ago it was first seen (µs), and the longest lease then in force. A
    /// history that replaced another moves the Redis generation numbers past what the old
    /// primary may have handed out without the standby knowing.
    ///
    /// Every instance records a new history at the same moment (after a failover): the row is
    /// upserted, so a statement that lost the race to insert it waits for the winner and gets
    /// its row back. (With `do nothing`, the loser's snapshot did not see the winner's row: no
    /// first-seen time, and the call failed as an internal error.)
    async fn record_history(&self, key: &str) -> Result<(bool, i64, i64), StoreError> {
        let query = sqlx::query_as::<_, (bool, bool, i64, i64)>(
            "with seen as (
                 insert into database_timelines (timeline) values ($1)
                 on conflict (timeline) do update set timeline = excluded.timeline
                 returning first_seen_at as at, xmax = 0 as inserted
             )
             select (select inserted from seen),
                    exists (select 1 from database_timelines
                            where timeline <> $1 and first_seen_at < (select at from seen)),
                    (extract(epoch from (clock_timestamp() - (select at from seen))) * 1000000)::bigint,
                    greatest(coalesce((select max(lease_us) from local_cache_leases), 0),
                             coalesce((select lease_us from local_cache_fleet), 0))",
        )
        .bind(key);
        let (inserted, replaced, age, lease) = self.run(query.fetch_one(self.pool())).await?;
        if inserted && replaced {
            let skip = sqlx::query(
                "select setval('redis_generation_seq', nextval('redis_generation_seq') + 1024)",
            );
            self.run(skip.execute(self.pool())).await?;
        }
        Ok((replaced, age, lease))
    }

    /// What is left of the window after a new history (`None` when there is none).
    pub fn history_window_remaining(&self) -> Option<Duration> {
        let ends = self.known().window_ends?;
        let left = ends.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// The window a wait keeps when it sees the history change under it: one lease (the
    /// longest in force when it was noticed; the longest allowed if unknown).
    pub fn history_window(&self) -> Duration {
        self.known()
            .window
            .unwrap_or_else(|| lease_wait(Duration::from_secs(60)))
    }
}
