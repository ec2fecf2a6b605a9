-- The event stream's log (EventService.Watch): what invalidates a caller's cached validation or
-- profile, one row per change, written in the same statement as the change (the revoking
-- statements, UpdateProfile, DisableUser, EnableUser). A revocation of every session of a user
-- is one row (kind 'sessions_revoked': those created at or before `cutoff`, but `kept_session`),
-- not one per session. Rows are kept for EVENTS__RETENTION; `change_events_purged` says up to
-- which id rows may be gone, so that a position older than that is told to start over.
create table change_events (
    id           bigint generated always as identity (cache 1) primary key,
    kind         text not null,
    user_id      uuid not null,
    session_id   uuid,
    reason       text not null default '',
    cutoff       timestamptz,
    kept_session uuid,
    version      bigint,
    created_at   timestamptz not null default clock_timestamp()
);
create index change_events_created_idx on change_events (created_at);

create table change_events_purged (
    id      boolean primary key default true check (id),
    through bigint not null
);
insert into change_events_purged (through) values (0);
