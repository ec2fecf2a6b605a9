//! Redis generations (see `cache::generation`): one number per Redis history, shared by every
//! instance and increasing, so a value written by an instance that has not yet seen a restart or
//! failover can never be taken for one of the new history.
use super::{Db, StoreError};

impl Db {
    /// The generation of the Redis servers with this fingerprint: the one already bound to it
    /// (by any instance), else `continued` (the generation of a fingerprint it continues), else
    /// a new one, higher than every earlier generation.
    pub async fn redis_generation(
        &self,
        fingerprint: &str,
        continued: Option<i64>,
    ) -> Result<i64, StoreError> {
        // An insert that waited for another instance's identical insert finds nothing in this
        // statement's snapshot: the second attempt sees the committed row.
        for _ in 0..2 {
            if let Some(generation) = self.bind_generation(fingerprint, continued).await? {
                return Ok(generation);
            }
        }
        Err(StoreError::Unavailable(None))
    }

    async fn bind_generation(
        &self,
        fingerprint: &str,
        continued: Option<i64>,
    ) -> Result<Option<i64>, StoreError> {
        let query = sqlx::query_scalar::<_, i64>(
            "with inserted as (
                 insert into redis_fingerprints (fingerprint, generation)
                 values ($1, coalesce($2, nextval('redis_generation_seq')))
                 on conflict (fingerprint) do nothing
                 returning generation
             )
             select generation from inserted
             union all
             select generation from redis_fingerprints where fingerprint = $1",
        )
        .bind(fingerprint)
        .bind(continued);
        self.run(query.fetch_optional(self.pool())).await
    }

    /// The fingerprints bound most recently, newest first, with their generations (a new
    /// instance looks for one its servers continue).
    pub async fn recent_fingerprints(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let query = sqlx::query_as::<_, (String, i64)>(
            "select fingerprint, generation from redis_fingerprints
             order by created_at desc limit 100",
        );
        self.run(query.fetch_all(self.pool())).await
    }
}
