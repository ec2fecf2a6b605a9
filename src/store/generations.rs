//! Redis generations (see `cache::generation`): one number per Redis history, shared by every
//! instance and increasing, so a value written by an instance that has not yet seen a restart or
//! failover can never be taken for one of the new history.
use super::{Db, StoreError};

impl Db {
    /// The generation of the Redis servers with this fingerprint: the existing one when any
    /// instance has already bound it, else a new one, higher than every earlier generation.
    pub async fn redis_generation(&self, fingerprint: &str) -> Result<i64, StoreError> {
        // An insert that waited for another instance's identical insert finds nothing in this
        // statement's snapshot: the second attempt sees the committed row.
        for _ in 0..2 {
            if let Some(generation) = self.bind_generation(fingerprint).await? {
                return Ok(generation);
            }
        }
        Err(StoreError::Unavailable(None))
    }

    async fn bind_generation(&self, fingerprint: &str) -> Result<Option<i64>, StoreError> {
        let query = sqlx::query_scalar::<_, i64>(
            "with inserted as (
                 insert into redis_generations (fingerprint) values ($1)
                 on conflict (fingerprint) do nothing
                 returning id
             )
             select id from inserted
             union all
             select id from redis_generations where fingerprint = $1",
        )
        .bind(fingerprint);
        self.run(query.fetch_optional(&self.pool)).await
    }
}
