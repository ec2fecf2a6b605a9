//! `token_keys`: the signing keys of session tokens (see `auth::keys` for how they are used).
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Db, StoreError, micros};

pub struct TokenKeyRepo<'a>(&'a Db);

impl Db {
    pub fn token_keys(&self) -> TokenKeyRepo<'_> {
        TokenKeyRepo(self)
    }
}

/// A signing key as stored.
pub struct StoredKey {
    pub id: i32,
    pub secret: Vec<u8>,
    pub activates_at: DateTime<Utc>,
}

/// Every key, and until when tokens of an earlier release may still name a live session.
pub struct KeyState {
    pub keys: Vec<StoredKey>,
    /// The latest absolute expiry of a live session whose token has no key (`None`: there is
    /// none, so no such token can be valid).
    pub legacy_until: Option<DateTime<Utc>>,
}

impl TokenKeyRepo<'_> {
    /// Makes the next key when the newest is older than `rotation` less `lead`, activating after
    /// `lead` (at once when there is no key at all: nobody can have missed it). Concurrent
    /// instances make one key between them. Returns whether it made one.
    pub async fn rotate(&self, rotation: Duration, lead: Duration) -> Result<bool, StoreError> {
        let mut tx = self.0.run(self.0.pool().begin()).await?;
        let lock = sqlx::query("select pg_advisory_xact_lock(hashtext('authd:token_keys'))");
        self.0.run(lock.execute(&mut *tx)).await?;
        let insert = sqlx::query(
            "insert into token_keys (secret, activates_at)
             select $1, case when exists (select 1 from token_keys)
                             then clock_timestamp() + $2::bigint * interval '1 microsecond'
                             else clock_timestamp() end
             where not exists (
                 select 1 from token_keys
                 where activates_at > clock_timestamp()
                       - ($3::bigint - $2::bigint) * interval '1 microsecond')",
        )
        .bind(crate::model::token::SigningKey::random_secret().to_vec())
        .bind(micros(lead))
        .bind(micros(rotation));
        let made = self.0.run(insert.execute(&mut *tx)).await?.rows_affected() > 0;
        self.0.run(tx.commit()).await?;
        Ok(made)
    }

    /// Every key, and the legacy horizon ([`KeyState::legacy_until`]).
    pub async fn load(&self) -> Result<KeyState, StoreError> {
        let keys = sqlx::query_as::<_, (i32, Vec<u8>, DateTime<Utc>)>(
            "select id, secret, activates_at from token_keys order by id",
        );
        let keys = self.0.run(keys.fetch_all(self.0.pool())).await?;
        let legacy = sqlx::query_scalar::<_, Option<DateTime<Utc>>>(
            "select max(absolute_expires_at) from sessions
             where key_id is null and revoked_at is null",
        );
        let legacy_until = self.0.run(legacy.fetch_one(self.0.pool())).await?;
        Ok(KeyState {
            keys: keys
                .into_iter()
                .map(|(id, secret, activates_at)| StoredKey {
                    id,
                    secret,
                    activates_at,
                })
                .collect(),
            legacy_until,
        })
    }

    /// Deletes keys whose successor activated more than `keep` ago (at least a day: see
    /// `purge_token_keys`), so no secret outlives the tokens it could have minted.
    pub async fn purge(&self, keep: Duration) -> Result<u64, StoreError> {
        let query = sqlx::query_scalar::<_, i64>("select purge_token_keys($1)").bind(micros(keep));
        let purged = self.0.run(query.fetch_one(self.0.pool())).await?;
        Ok(purged.max(0).unsigned_abs())
    }
}
