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

-- The previous release writes the invalidation logs but not this one: a trigger turns each of
-- its rows into the event this release's statements write themselves (they mark their rows
-- `evented`), so that a subscriber hears every revocation and profile version, whoever made it.
alter table session_invalidations add column evented boolean not null default false;
alter table profile_invalidations add column evented boolean not null default false;

create function change_events_of_unevented_sessions() returns trigger
language plpgsql as $$
begin
    insert into change_events (kind, user_id, session_id)
    select 'session_revoked', s.user_id, s.id
    from new_rows n join sessions s on s.token_hash = n.token_hash
    where not n.evented;
    return null;
end $$;

create function change_events_of_unevented_profiles() returns trigger
language plpgsql as $$
begin
    insert into change_events (kind, user_id, version)
    select 'profile_updated', n.user_id, n.version from new_rows n where not n.evented;
    return null;
end $$;

create trigger change_events_of_unevented_sessions
    after insert on session_invalidations referencing new table as new_rows
    for each statement execute function change_events_of_unevented_sessions();
create trigger change_events_of_unevented_profiles
    after insert on profile_invalidations referencing new table as new_rows
    for each statement execute function change_events_of_unevented_profiles();
