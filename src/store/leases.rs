//! Leases of the in-process caches (see `crate::local`): who may hold local copies, until when,
//! and how far each holder has read the invalidation logs.
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, StoreError, micros};

/// A lease holder as a revoking call sees it.
#[derive(Debug, Clone, Copy)]
pub struct Holder {
    pub instance: Uuid,
    /// How long its lease has left, by PostgreSQL's clock.
    pub remaining: Duration,
}

#[derive(Clone, Copy)]
pub struct LeaseRepo<'a>(&'a Db);

impl Db {
    pub fn leases(&self) -> LeaseRepo<'_> {
        LeaseRepo(self)
    }
}

impl LeaseRepo<'_> {
    /// Takes a new lease (the caller holds no copies): PostgreSQL's time at the grant. Leases
    /// that ended a day ago are deleted on the way.
    pub async fn register(
        &self,
        instance: Uuid,
        lease: Duration,
    ) -> Result<DateTime<Utc>, StoreError> {
        let purge = sqlx::query(
            "delete from local_cache_leases where expires_at < clock_timestamp() - interval '1 day'",
        );
        self.0.run(purge.execute(&self.0.pool)).await?;
        let query = sqlx::query_scalar::<_, DateTime<Utc>>(
            "insert into local_cache_leases (instance, expires_at, lease_us, applied_through)
             values ($1, clock_timestamp() + $2::bigint * interval '1 microsecond', $2,
                     clock_timestamp())
             on conflict (instance) do update
                 set expires_at = excluded.expires_at, lease_us = excluded.lease_us,
                     applied_through = excluded.applied_through, registered_at = now()
             returning applied_through",
        )
        .bind(instance)
        .bind(micros(lease));
        self.0.run(query.fetch_one(&self.0.pool)).await
    }

    /// Extends a lease that has not ended, recording how far its holder has applied the logs:
    /// PostgreSQL's time at the extension, `None` when the lease had ended (or was released).
    pub async fn extend(
        &self,
        instance: Uuid,
        lease: Duration,
        applied_through: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let query = sqlx::query_scalar::<_, DateTime<Utc>>(
            "update local_cache_leases
             set expires_at = clock_timestamp() + $2::bigint * interval '1 microsecond',
                 applied_through = greatest(applied_through, $3)
             where instance = $1 and expires_at > clock_timestamp()
             returning clock_timestamp()",
        )
        .bind(instance)
        .bind(micros(lease))
        .bind(applied_through);
        self.0.run(query.fetch_optional(&self.0.pool)).await
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
    /// length), and PostgreSQL's time at the read.
    pub async fn holders(&self, me: Uuid) -> Result<(DateTime<Utc>, Vec<Holder>), StoreError> {
        let query = sqlx::query_as::<_, (Uuid, i64, DateTime<Utc>)>(
            "select instance,
                    least((extract(epoch from (expires_at - clock_timestamp())) * 1000000)::bigint,
                          lease_us),
                    clock_timestamp()
             from local_cache_leases where expires_at > clock_timestamp() and instance <> $1",
        )
        .bind(me);
        let rows = self.0.run(query.fetch_all(&self.0.pool)).await?;
        let at = match rows.first() {
            Some(row) => row.2,
            None => Utc::now(),
        };
        let holders = rows
            .into_iter()
            .map(|(instance, remaining, _)| Holder {
                instance,
                remaining: Duration::from_micros(remaining.max(0).unsigned_abs()),
            })
            .collect();
        Ok((at, holders))
    }

    /// Of `instances`, those done with everything committed before `since`: their lease ended,
    /// or they have applied the logs past it.
    pub async fn caught_up(
        &self,
        instances: &[Uuid],
        since: DateTime<Utc>,
    ) -> Result<Vec<Uuid>, StoreError> {
        let query = sqlx::query_scalar::<_, Uuid>(
            "select instance from local_cache_leases
             where instance = any($1)
               and (expires_at <= clock_timestamp() or applied_through > $2)",
        )
        .bind(instances)
        .bind(since);
        self.0.run(query.fetch_all(&self.0.pool)).await
    }

    /// How many leases are held now.
    pub async fn held(&self) -> Result<i64, StoreError> {
        let query = sqlx::query_scalar::<_, i64>(
            "select count(*) from local_cache_leases where expires_at > clock_timestamp()",
        );
        self.0.run(query.fetch_one(&self.0.pool)).await
    }
}
