//! Leases of the in-process caches (see `crate::local`): who may hold local copies, until when,
//! how far each holder has read the invalidation logs, and the one lease length the fleet uses.
//! Every query of the protocol also returns PostgreSQL's timeline (see `history`).
use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, StoreError, history::TIMELINE, micros};

/// A lease holder as a revoking call sees it.
#[derive(Debug, Clone, Copy)]
pub struct Holder {
    pub instance: Uuid,
    /// How long its lease has left, by PostgreSQL's clock.
    pub remaining: Duration,
}

/// What a revoking call read of the lease table.
#[derive(Debug)]
pub struct Holders {
    /// PostgreSQL's time at the read: a holder that applied the logs past it is done.
    pub since: DateTime<Utc>,
    /// This instance's time just after the reply.
    pub asked: std::time::Instant,
    /// The PostgreSQL history the table belongs to.
    pub timeline: String,
    pub holders: Vec<Holder>,
    /// After a new history: how long every instance may still believe a lease of the old one.
    pub window: Option<Duration>,
}

/// One read of the lease table's progress columns ([`LeaseRepo::progress`]).
#[derive(Debug)]
pub struct Progress {
    pub timeline: String,
    /// When the statement's transaction began (`now()`, set before its snapshot is taken,
    /// unlike `statement_timestamp()`, which the extended protocol sets again at Execute, after
    /// the snapshot of Bind): nothing in `rows` is older.
    pub at: DateTime<Utc>,
    pub rows: HashMap<Uuid, LeaseProgress>,
}

/// How far a holder has come, as a poll sees it.
#[derive(Debug, Clone, Copy)]
pub struct LeaseProgress {
    /// Its lease ended (or was released).
    pub ended: bool,
    pub applied_through: Option<DateTime<Utc>>,
}

/// The fleet's lease, as an instance starting found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetLease {
    pub lease: Duration,
    /// The fleet had another length than this instance's setting, and kept it.
    pub adopted: bool,
    /// This instance would set `lease`, but some running instance's request timeout covers
    /// only this much: nothing was set.
    pub uncovered: Option<Duration>,
    /// This instance would replace the fleet's length, but instances that held leases lately
    /// may still run (PostgreSQL out of their reach): nothing was set; ask again, confirmed,
    /// after this long.
    pub confirm_after: Option<Duration>,
}

/// How often every instance records that it runs ([`LeaseRepo::seen`]).
pub const INSTANCE_BEAT: Duration = Duration::from_secs(5);
/// An instance not seen for this long is taken to have stopped.
pub const INSTANCE_ALIVE: Duration = Duration::from_secs(30);

const SEEN: &str = "insert into local_cache_instances (instance, holds, covers_us)
                    values ($1, $2, $3)
                    on conflict (instance) do update
                        set seen_at = clock_timestamp(), holds = excluded.holds,
                            covers_us = excluded.covers_us";

#[derive(Clone, Copy)]
pub struct LeaseRepo<'a>(&'a Db);

impl Db {
    pub fn leases(&self) -> LeaseRepo<'_> {
        LeaseRepo(self)
    }
}

impl LeaseRepo<'_> {
    /// The lease length every instance holds and waits for, read (and this instance recorded as
    /// running: [`Self::seen`]) when `me` starts. The first instance with the cache on sets it
    /// (`configured`); one configured otherwise later adopts it — unless the fleet has let it go
    /// (no lease held, no instance holding leases seen running for [`INSTANCE_ALIVE`], and none
    /// with the cache on started for two leases: the whole fleet with the cache on stopped),
    /// when its own replaces it. A length is set only if every instance running can wait for
    /// it (`covers`: the longest lease an instance's request timeout covers); otherwise nothing
    /// is written and [`FleetLease::uncovered`] says what the running instances cover.
    /// Instances with the cache off (`configured` is `None`) only read it: they wait for the
    /// holders' leases.
    ///
    /// Instances that held leases within a day but were not seen for [`INSTANCE_ALIVE`] may have
    /// stopped — or PostgreSQL may have been out of their reach: before replacing the length
    /// (`confirmed` false), this instance records itself and answers
    /// [`FleetLease::confirm_after`]; asked again after that long, it replaces the length only
    /// if none of them beat meanwhile.
    pub async fn fleet_lease(
        &self,
        me: Uuid,
        configured: Option<Duration>,
        covers: Duration,
        confirmed: bool,
    ) -> Result<Option<FleetLease>, StoreError> {
        let mut tx = self.0.run(self.0.pool().begin()).await?;
        let lock = sqlx::query("lock table local_cache_fleet in exclusive mode");
        self.0.run(lock.execute(&mut *tx)).await?;
        let gone = sqlx::query(
            "delete from local_cache_instances where seen_at < clock_timestamp() - interval '1 day'",
        );
        self.0.run(gone.execute(&mut *tx)).await?;
        let alive_us = micros(INSTANCE_ALIVE);
        let current = sqlx::query_as::<_, (i64, bool)>(
            "select lease_us,
                    exists (select 1 from local_cache_leases where expires_at > clock_timestamp())
                    or updated_at > clock_timestamp() - 2 * lease_us * interval '1 microsecond'
                    or exists (select 1 from local_cache_instances
                               where holds and instance <> $1
                                 and seen_at > clock_timestamp() - $2 * interval '1 microsecond')
             from local_cache_fleet",
        )
        .bind(me)
        .bind(alive_us);
        let found = self.0.run(current.fetch_optional(&mut *tx)).await?;
        let running = sqlx::query_scalar::<_, Option<i64>>(
            "select min(covers_us) from local_cache_instances
             where instance <> $1 and seen_at > clock_timestamp() - $2 * interval '1 microsecond'",
        )
        .bind(me)
        .bind(alive_us);
        let least = self.0.run(running.fetch_one(&mut *tx)).await?;
        let (lease_us, adopted, changes) = match (found, configured) {
            (None, None) => {
                self.record(&mut tx, me, false, covers).await?;
                self.0.run(tx.commit()).await?;
                return Ok(None);
            }
            (Some((lease_us, _)), None) => (lease_us, false, false),
            (Some((lease_us, true)), Some(mine)) => (lease_us, lease_us != micros(mine), false),
            (Some((lease_us, false)), Some(mine)) => {
                (micros(mine), false, lease_us != micros(mine))
            }
            (None, Some(mine)) => (micros(mine), false, true),
        };
        let lease = Duration::from_micros(lease_us.max(1).unsigned_abs());
        if changes && found.is_some() && !confirmed {
            let recent = sqlx::query_scalar::<_, bool>(
                "select exists (select 1 from local_cache_instances
                                where holds and instance <> $1
                                  and seen_at > clock_timestamp() - interval '1 day')",
            )
            .bind(me);
            if self.0.run(recent.fetch_one(&mut *tx)).await? {
                self.record(&mut tx, me, true, covers).await?;
                self.0.run(tx.commit()).await?;
                return Ok(Some(FleetLease {
                    lease,
                    adopted,
                    uncovered: None,
                    confirm_after: Some(INSTANCE_BEAT * 2 + self.0.query_timeout),
                }));
            }
        }
        if changes && let Some(least) = least.filter(|least| *least < lease_us) {
            // Rolled back: nothing is set that a running instance could not wait for.
            return Ok(Some(FleetLease {
                lease,
                adopted,
                uncovered: Some(Duration::from_micros(least.max(0).unsigned_abs())),
                confirm_after: None,
            }));
        }
        self.record(&mut tx, me, configured.is_some(), covers)
            .await?;
        if configured.is_some() {
            // Set, or claimed for two leases: an instance starting meanwhile adopts it, though
            // this one holds no lease yet.
            let claim = sqlx::query(
                "insert into local_cache_fleet (id, lease_us) values (true, $1)
                 on conflict (id) do update
                     set lease_us = excluded.lease_us, updated_at = clock_timestamp()",
            )
            .bind(lease_us);
            self.0.run(claim.execute(&mut *tx)).await?;
        }
        self.0.run(tx.commit()).await?;
        Ok(Some(FleetLease {
            lease,
            adopted,
            uncovered: None,
            confirm_after: None,
        }))
    }

    async fn record(
        &self,
        tx: &mut sqlx::PgConnection,
        me: Uuid,
        holds: bool,
        covers: Duration,
    ) -> Result<(), StoreError> {
        let query = sqlx::query(SEEN).bind(me).bind(holds).bind(micros(covers));
        self.0.run(query.execute(tx)).await?;
        Ok(())
    }

    /// `me` is running (every [`INSTANCE_BEAT`]): whether it holds leases, and the longest lease
    /// its request timeout covers.
    pub async fn seen(&self, me: Uuid, holds: bool, covers: Duration) -> Result<(), StoreError> {
        let query = sqlx::query(SEEN).bind(me).bind(holds).bind(micros(covers));
        self.0.run(query.execute(self.0.pool())).await?;
        Ok(())
    }

    /// `me` stopped.
    pub async fn stopped(&self, me: Uuid) -> Result<(), StoreError> {
        let query = sqlx::query("delete from local_cache_instances where instance = $1").bind(me);
        self.0.run(query.execute(self.0.pool())).await?;
        Ok(())
    }

    /// Takes a new lease (the caller holds no copies) of `lease`, the length this instance
    /// started with: PostgreSQL's time at the grant. `None` when the fleet's length is another
    /// now (it was replaced while this instance ran: its request timeout was checked against
    /// `lease` only, and the other instances' against the new one): no lease is taken. Leases
    /// that ended a day ago are deleted on the way.
    pub async fn register(
        &self,
        instance: Uuid,
        lease: Duration,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let purge = sqlx::query(
            "delete from local_cache_leases where expires_at < clock_timestamp() - interval '1 day'",
        );
        self.0.run(purge.execute(self.0.pool())).await?;
        let sql = format!(
            "with length as (
                 select coalesce((select lease_us from local_cache_fleet for share), $2::bigint)
                        as us
             )
             insert into local_cache_leases (instance, expires_at, lease_us, applied_through)
             select $1, clock_timestamp() + us * interval '1 microsecond', us, clock_timestamp()
             from length
             where us = $2::bigint
             on conflict (instance) do update
                 set expires_at = excluded.expires_at, lease_us = excluded.lease_us,
                     applied_through = excluded.applied_through, registered_at = now()
             returning applied_through, {TIMELINE}"
        );
        let query = sqlx::query_as::<_, (DateTime<Utc>, String)>(sqlx::AssertSqlSafe(sql))
            .bind(instance)
            .bind(micros(lease));
        let Some((at, timeline)) = self.0.run(query.fetch_optional(self.0.pool())).await? else {
            return Ok(None);
        };
        self.0.saw_timeline(timeline).await?;
        Ok(Some(at))
    }

    /// Extends a lease that has not ended, recording how far its holder has applied the logs:
    /// PostgreSQL's time at the extension (`None` when the lease had ended, or was released).
    pub async fn extend(
        &self,
        instance: Uuid,
        lease: Duration,
        applied_through: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let sql = format!(
            "with extended as (
                 update local_cache_leases
                 set expires_at = clock_timestamp() + $2::bigint * interval '1 microsecond',
                     applied_through = greatest(applied_through, $3)
                 where instance = $1 and expires_at > clock_timestamp()
                 returning clock_timestamp() as at
             )
             select (select at from extended), {TIMELINE}"
        );
        let query = sqlx::query_as::<_, (Option<DateTime<Utc>>, String)>(sqlx::AssertSqlSafe(sql))
            .bind(instance)
            .bind(micros(lease))
            .bind(applied_through);
        let (at, timeline) = self.0.run(query.fetch_one(self.0.pool())).await?;
        self.0.saw_timeline(timeline).await?;
        Ok(at)
    }

    /// [`extend`](Self::extend) for several leases in one statement: each `(lease, applied
    /// through)` still running is extended by `lease`; which were.
    pub async fn extend_all(
        &self,
        leases: &[(Uuid, DateTime<Utc>)],
        lease: Duration,
    ) -> Result<Vec<Uuid>, StoreError> {
        let (ids, applied): (Vec<Uuid>, Vec<DateTime<Utc>>) = leases.iter().copied().unzip();
        let sql = format!(
            "with asked as (
                 select * from unnest($1::uuid[], $3::timestamptz[]) as a(instance, applied)
             ),
             extended as (
                 update local_cache_leases l
                 set expires_at = clock_timestamp() + $2::bigint * interval '1 microsecond',
                     applied_through = greatest(l.applied_through, a.applied)
                 from asked a
                 where l.instance = a.instance and l.expires_at > clock_timestamp()
                 returning l.instance
             )
             select coalesce((select array_agg(instance) from extended), '{{}}'), {TIMELINE}"
        );
        let query = sqlx::query_as::<_, (Vec<Uuid>, String)>(sqlx::AssertSqlSafe(sql))
            .bind(ids)
            .bind(micros(lease))
            .bind(applied);
        let (extended, timeline) = self.0.run(query.fetch_one(self.0.pool())).await?;
        self.0.saw_timeline(timeline).await?;
        Ok(extended)
    }

    /// Deletes a lease that has ended (a subscriber's, once its stream is over).
    pub async fn forget(&self, instance: Uuid) -> Result<(), StoreError> {
        let query = sqlx::query(
            "delete from local_cache_leases where instance = $1 and expires_at <= clock_timestamp()",
        )
        .bind(instance);
        self.0.run(query.execute(self.0.pool())).await?;
        Ok(())
    }

    /// Ends a lease now (its holder dropped every copy).
    pub async fn release(&self, instance: Uuid) -> Result<(), StoreError> {
        let query = sqlx::query(
            "update local_cache_leases set expires_at = clock_timestamp() where instance = $1",
        )
        .bind(instance);
        self.0.run(query.execute(self.0.pool())).await?;
        Ok(())
    }

    /// The holders of a lease other than `me` (what is left of each lease, never more than its
    /// length), PostgreSQL's time at the read, and its history.
    pub async fn holders(&self, me: Uuid) -> Result<Holders, StoreError> {
        let sql = format!(
            "select l.instance,
                    least((extract(epoch from (l.expires_at - clock_timestamp())) * 1000000)::bigint,
                          l.lease_us),
                    clock_timestamp(), {TIMELINE}
             from (select 1) one
             left join local_cache_leases l
                    on l.expires_at > clock_timestamp() and l.instance <> $1"
        );
        let query = sqlx::query_as::<_, (Option<Uuid>, Option<i64>, DateTime<Utc>, String)>(
            sqlx::AssertSqlSafe(sql),
        )
        .bind(me);
        let rows = self.0.run(query.fetch_all(self.0.pool())).await?;
        let asked = std::time::Instant::now();
        let (since, timeline) = rows
            .first()
            .map(|row| (row.2, row.3.clone()))
            .ok_or(StoreError::Unavailable(None))?;
        self.0.saw_timeline(timeline.clone()).await?;
        let holders = rows
            .into_iter()
            .filter_map(|(instance, remaining, _, _)| {
                Some(Holder {
                    instance: instance?,
                    remaining: Duration::from_micros(remaining?.max(0).unsigned_abs()),
                })
            })
            .collect();
        Ok(Holders {
            since,
            asked,
            timeline,
            holders,
            window: self.0.history_window_remaining(),
        })
    }

    /// How far each of `instances` has come (the poll of `crate::local::poller`): the history
    /// the rows belong to, PostgreSQL's time when the read began (every row is as of then or
    /// later), and a row for each of `instances` that has a lease row.
    pub async fn progress(&self, instances: &[Uuid]) -> Result<Progress, StoreError> {
        let sql = format!(
            "select {TIMELINE}, now(), l.instance,
                    l.expires_at <= clock_timestamp(), l.applied_through
             from (select 1) one
             left join local_cache_leases l on l.instance = any($1)"
        );
        type Row = (
            String,
            DateTime<Utc>,
            Option<Uuid>,
            Option<bool>,
            Option<DateTime<Utc>>,
        );
        let query = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(sql)).bind(instances);
        let rows = self.0.run(query.fetch_all(self.0.pool())).await?;
        let (timeline, at) = rows
            .first()
            .map(|row| (row.0.clone(), row.1))
            .ok_or(StoreError::Unavailable(None))?;
        self.0.saw_timeline(timeline.clone()).await?;
        let rows = rows
            .into_iter()
            .filter_map(|(_, _, instance, ended, applied_through)| {
                Some((
                    instance?,
                    LeaseProgress {
                        ended: ended.unwrap_or(true),
                        applied_through,
                    },
                ))
            })
            .collect();
        Ok(Progress { timeline, at, rows })
    }

    /// How many leases are held now.
    pub async fn held(&self) -> Result<i64, StoreError> {
        let query = sqlx::query_scalar::<_, i64>(
            "select count(*) from local_cache_leases where expires_at > clock_timestamp()",
        );
        self.0.run(query.fetch_one(self.0.pool())).await
    }
}
