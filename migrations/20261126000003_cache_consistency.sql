-- Cache consistency (see src/cache/mod.rs and README "Consistency guarantees").

-- The identities of Redis primaries authd has seen (see src/cache/generation.rs: run id and
-- replication ids of each, which every restart, restore and failover changes) and the
-- generation each is bound to. Values in Redis carry their generation; only the current one's
-- are served. A fingerprint that continues an earlier one (a replica attached, a primary added)
-- keeps its generation; any other gets the next number.
create sequence redis_generation_seq;
create table redis_fingerprints (
    fingerprint text primary key,
    generation  bigint not null,
    created_at  timestamptz not null default now()
);

-- The outboxes become logs. Several caches may share the database (instances on different
-- Redis deployments or key prefixes during a rolling change, or of different releases), so a row
-- applied to one cache must stay for the others: rows are kept until nothing they invalidate can
-- still be cached (session rows until the session's absolute expiry, profile rows for the
-- longest profile TTL), and each cache ("namespace": key prefix + generation) follows the log
-- with a cursor of its own.
alter table session_invalidations alter column created_at set default clock_timestamp();
alter table profile_invalidations alter column created_at set default clock_timestamp();
create index session_invalidations_created_idx on session_invalidations (created_at, id);
create index profile_invalidations_created_idx on profile_invalidations (created_at, id);
create index session_invalidations_user_idx on session_invalidations (user_id, created_at);
create index session_invalidations_token_idx on session_invalidations (token_hash, created_at);

create table outbox_cursors (
    namespace      text primary key,
    -- every row created before this (less the in-flight allowance) has reached the namespace
    sessions_after timestamptz not null,
    profiles_after timestamptz not null,
    updated_at     timestamptz not null default now()
);

-- Instances of the previous release delete the rows they applied; keep them for the others.
-- authd's own purge sets authd.purge for its transaction.
create rule keep_session_invalidations as on delete to session_invalidations
    where coalesce(current_setting('authd.purge', true), '') <> 'on' do instead nothing;
create rule keep_profile_invalidations as on delete to profile_invalidations
    where coalesce(current_setting('authd.purge', true), '') <> 'on' do instead nothing;
