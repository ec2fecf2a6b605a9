-- One row per history of the Redis data authd has seen (see src/cache/generation.rs): the
-- identity of the Redis primaries (run id and replication id of each, which every restart,
-- restore and failover changes) and the generation number bound to it. Values in Redis carry
-- their generation; only the current one's are served.
create table redis_generations (
    id          bigint generated always as identity primary key,
    fingerprint text not null unique,
    created_at  timestamptz not null default now()
);

-- Revocations look up what is still queued for a user or a token.
create index session_invalidations_user_id_idx on session_invalidations (user_id);
create index session_invalidations_token_hash_idx on session_invalidations (token_hash);
