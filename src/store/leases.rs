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
}

#[derive(Clone, Copy)]
pub struct LeaseRepo<'a>(&'a Db);

impl Db {
    pub fn leases(&self) -> LeaseRepo<'_> {
        LeaseRepo(self)
    }
}

impl LeaseRepo<'_> {
    /// The lease length every instance holds and waits for. The first instance with the cache
    /// on sets it (`configured`); one configured otherwise later adopts it — unless the fleet has
    /// let it go (no lease held, and no instance with the cache on started for two leases: the
    /// whole fleet stopped), when its own replaces it. Instances with the cache off (`configured`
    /// is `None`) only read it: they wait for the holders' leases.
    pub async fn fleet_lease(
        &self,
        configured: Option<Duration>,
    ) -> Result<Option<FleetLease>, StoreError> {
        let mut tx = self.0.run(self.0.pool.begin()).await?;
        let lock = sqlx::query("lock table local_cache_fleet in exclusive mode");
        self.0.run(lock.execute(&mut *tx)).await?;
        let current = sqlx::query_as::<_, (i64, bool)>(
            "select lease_us,
                    exists (select 1 from local_cache_leases where expires_at > clock_timestamp())
                    or updated_at > clock_timestamp() - 2 * lease_us * interval '1 microsecond'
             from local_cache_fleet",
        );
        let found = self.0.run(current.fetch_optional(&mut *tx)).await?;
        let (lease_us, adopted) = match (found, configured) {
            (None, None) => return Ok(None),
            (Some((lease_us, _)), None) => (lease_us, false),
            (Some((lease_us, true)), Some(mine)) => (lease_us, lease_us != micros(mine)),
            (Some((_, false)) | None, Some(mine)) => (micros(mine), false),
        };
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
            lease: Duration::from_micros(lease_us.max(1).unsigned_abs()),
            adopted,
        }))
    }

    /// Takes a new lease (the caller holds no copies) of the fleet's length (`lease` if the
    /// fleet has none): PostgreSQL's time at the grant, and the length. Leases that ended a day
    /// ago are deleted on the way.
    pub async fn register(
        &self,
        instance: Uuid,
        lease: Duration,
    ) -> Result<(DateTime<Utc>, Duration), StoreError> {
        let purge = sqlx::query(
            "delete from local_cache_leases where expires_at < clock_timestamp() - interval '1 day'",
        );
        self.0.run(purge.execute(&self.0.pool)).await?;
        let sql = format!(
            "with length as (
                 select coalesce((select lease_us from local_cache_fleet), $2::bigint) as us
             )
             insert into local_cache_leases (instance, expires_at, lease_us, applied_through)
             select $1, clock_timestamp() + us * interval '1 microsecond', us, clock_timestamp()
             from length
             on conflict (instance) do update
                 set expires_at = excluded.expires_at, lease_us = excluded.lease_us,
                     applied_through = excluded.applied_through, registered_at = now()
             returning applied_through, lease_us, {TIMELINE}"
        );
        let query = sqlx::query_as::<_, (DateTime<Utc>, i64, String)>(sqlx::AssertSqlSafe(sql))
            .bind(instance)
            .bind(micros(lease));
        let (at, lease_us, timeline) = self.0.run(query.fetch_one(&self.0.pool)).await?;
        self.0.saw_timeline(timeline).await?;
        Ok((at, Duration::from_micros(lease_us.max(1).unsigned_abs())))
    }

    /// Extends a lease that has not ended, recording how far its holder has applied the logs:
    /// PostgreSQL's time at the extension (`None` when the lease had ended, or was released),
    /// and how many leases are held (the same statement: the gauge costs no query).
    pub async fn extend(
        &self,
        instance: Uuid,
        lease: Duration,
        applied_through: DateTime<Utc>,
    ) -> Result<(Option<DateTime<Utc>>, i64), StoreError> {
        let sql = format!(
            "with extended as (
                 update local_cache_leases
                 set expires_at = clock_timestamp() + $2::bigint * interval '1 microsecond',
                     applied_through = greatest(applied_through, $3)
                 where instance = $1 and expires_at > clock_timestamp()
                 returning clock_timestamp() as at
             )
             select (select at from extended), {TIMELINE},
                    (select count(*) from local_cache_leases
                     where expires_at > clock_timestamp() and instance <> $1)
                    + (select count(*) from extended)"
        );
        let query =
            sqlx::query_as::<_, (Option<DateTime<Utc>>, String, i64)>(sqlx::AssertSqlSafe(sql))
                .bind(instance)
                .bind(micros(lease))
                .bind(applied_through);
        let (at, timeline, held) = self.0.run(query.fetch_one(&self.0.pool)).await?;
        self.0.saw_timeline(timeline).await?;
        Ok((at, held))
    }

    /// Ends a lease now (its holder dropped every copy).
    pub async fn release(&self, instance: Uuid) -> Result<(), StoreError> {
        let query = sqlx::query(
            "update local_cache_leases set expires_at = clock_timestamp() where instance = $1",
        )
        .bind(instance);
        self.0.run(query.execute(&self.0.pool)).await?;
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
        let rows = self.0.run(query.fetch_all(&self.0.pool)).await?;
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

    /// How far each of `instances` has come (the poll of `crate::local::poller`), and the
    /// history the rows belong to.
    pub async fn progress(
        &self,
        instances: &[Uuid],
    ) -> Result<(String, HashMap<Uuid, LeaseProgress>), StoreError> {
        let sql = format!(
            "select {TIMELINE}, l.instance, l.expires_at <= clock_timestamp(), l.applied_through
             from (select 1) one
             left join local_cache_leases l on l.instance = any($1)"
        );
        let query =
            sqlx::query_as::<_, (String, Option<Uuid>, Option<bool>, Option<DateTime<Utc>>)>(
                sqlx::AssertSqlSafe(sql),
            )
            .bind(instances);
        let rows = self.0.run(query.fetch_all(&self.0.pool)).await?;
        let timeline = rows
            .first()
            .map(|row| row.0.clone())
            .ok_or(StoreError::Unavailable(None))?;
        self.0.saw_timeline(timeline.clone()).await?;
        let progress = rows
            .into_iter()
            .filter_map(|(_, instance, ended, applied_through)| {
                Some((
                    instance?,
                    LeaseProgress {
                        ended: ended.unwrap_or(true),
                        applied_through,
                    },
                ))
            })
            .collect();
        Ok((timeline, progress))
    }

    /// How many leases are held now.
    pub async fn held(&self) -> Result<i64, StoreError> {
        let query = sqlx::query_scalar::<_, i64>(
            "select count(*) from local_cache_leases where expires_at > clock_timestamp()",
        );
        self.0.run(query.fetch_one(&self.0.pool)).await
    }
}
