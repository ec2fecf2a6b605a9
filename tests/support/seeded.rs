//! Sessions written straight to the store (a Login through the API spends ~20 ms of CPU on
//! password hashing): the one way of doing it for the integration tests and the load
//! benchmark, which include this file.
use anyhow::Context;
use authd::{auth::token, store::Db};

/// The key the server mints with (the newest: one exists once it started), to mint tokens it
/// accepts for sessions written straight to the store.
pub async fn minting_key(db: &Db) -> anyhow::Result<token::SigningKey> {
    let state = db.token_keys().load().await?;
    let newest = state.keys.last().context("the server made a signing key")?;
    token::SigningKey::new(u32::try_from(newest.id)?, &newest.secret)
        .context("a signing key of 32 bytes")
}

/// `count` more sessions of `user_id` in the database at `url` (which `db` serves), in one
/// statement; their tokens.
pub async fn seed(
    db: &Db,
    url: &str,
    user_id: uuid::Uuid,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let key = minting_key(db).await?;
    let mut tokens = Vec::with_capacity(count);
    let mut hashes = Vec::with_capacity(count);
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let (token, hash) = token::generate(&key);
        tokens.push(token);
        hashes.push(hash.as_bytes().to_vec());
        ids.push(uuid::Uuid::now_v7());
    }
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url).await?;
    sqlx::query(
        "insert into sessions (id, user_id, token_hash, created_at, last_seen_at,
                               absolute_expires_at, authenticated_at, key_id)
         select id, $2, hash, now(), now(), now() + interval '1 day', now(), $4
         from unnest($1::uuid[], $3::bytea[]) as t(id, hash)",
    )
    .bind(&ids)
    .bind(user_id)
    .bind(&hashes)
    .bind(i64::from(key.id))
    .execute(&mut conn)
    .await?;
    Ok(tokens)
}
