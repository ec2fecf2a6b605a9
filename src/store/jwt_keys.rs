//! `jwt_keys`: the signing keys of the JWTs minted from sessions (see `auth::jwt` for how they
//! are used).
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Db, StoreError, micros};

pub struct JwtKeyRepo<'a>(&'a Db);

impl Db {
    pub fn jwt_keys(&self) -> JwtKeyRepo<'_> {
        JwtKeyRepo(self)
    }
}

/// A JWT signing key as stored.
pub struct StoredJwtKey {
    pub id: i32,
    /// `EdDSA` or `ES256`.
    pub algorithm: String,
    /// PKCS#8 (DER).
    pub private_key: Vec<u8>,
    pub activates_at: DateTime<Utc>,
}

/// A key to add when one is due.
pub struct NewJwtKey<'k> {
    pub algorithm: &'k str,
    pub private_key: &'k [u8],
}

impl JwtKeyRepo<'_> {
    /// Adds `key`, activating after `lead` (at once when there is no key at all: no JWT can name
    /// one yet), unless a key was added after `newest_known` (the newest id the caller loaded):
    /// concurrent instances that found a key due add one between them. Returns when the key
    /// activates, if it was added.
    pub async fn rotate(
        &self,
        key: NewJwtKey<'_>,
        newest_known: i32,
        lead: Duration,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let mut tx = self.0.run(self.0.pool().begin()).await?;
        let lock = sqlx::query("select pg_advisory_xact_lock(hashtext('authd:jwt_keys'))");
        self.0.run(lock.execute(&mut *tx)).await?;
        let insert = sqlx::query_scalar::<_, DateTime<Utc>>(
            "insert into jwt_keys (algorithm, private_key, activates_at)
             select $1, $2, case when exists (select 1 from jwt_keys)
                                 then clock_timestamp() + $3::bigint * interval '1 microsecond'
                                 else clock_timestamp() end
             where not exists (select 1 from jwt_keys where id > $4)
             returning activates_at",
        )
        .bind(key.algorithm)
        .bind(key.private_key)
        .bind(micros(lead))
        .bind(newest_known);
        let made = self.0.run(insert.fetch_optional(&mut *tx)).await?;
        self.0.run(tx.commit()).await?;
        Ok(made)
    }

    /// Every key, oldest first.
    pub async fn load(&self) -> Result<Vec<StoredJwtKey>, StoreError> {
        let keys = sqlx::query_as::<_, (i32, String, Vec<u8>, DateTime<Utc>)>(
            "select id, algorithm, private_key, activates_at from jwt_keys order by id",
        );
        let keys = self.0.run(keys.fetch_all(self.0.pool())).await?;
        Ok(keys
            .into_iter()
            .map(|(id, algorithm, private_key, activates_at)| StoredJwtKey {
                id,
                algorithm,
                private_key,
                activates_at,
            })
            .collect())
    }

    /// Deletes those of `retired` that a newer key has followed for more than `keep` (at least
    /// a day: see `purge_jwt_keys`), so no private key outlives the JWTs it could have signed.
    pub async fn purge(&self, retired: &[i32], keep: Duration) -> Result<u64, StoreError> {
        if retired.is_empty() {
            return Ok(0);
        }
        let query = sqlx::query_scalar::<_, i64>("select purge_jwt_keys($1, $2)")
            .bind(retired)
            .bind(micros(keep));
        let purged = self.0.run(query.fetch_one(self.0.pool())).await?;
        Ok(purged.max(0).unsigned_abs())
    }
}
