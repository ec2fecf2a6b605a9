-- Profile updates whose Redis step has not been confirmed yet (transactional outbox, like
-- session_invalidations): written in the same statement as the update, removed once Redis holds
-- the new version, drained by any instance otherwise.
create table profile_invalidations (
    id         bigint generated always as identity primary key,
    user_id    uuid not null,
    version    bigint not null,
    created_at timestamptz not null default now()
);
