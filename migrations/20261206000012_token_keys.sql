-- Signing keys of session tokens: every token minted from now on carries its key's id and a MAC
-- under it, checked before any lookup, so a made-up token costs no PostgreSQL and no Redis work.
-- Keys are made by the instances themselves (the first that finds the newest key older than
-- TOKENS__KEY_ROTATION less the lead makes the next), each activating a while after it is made,
-- so that every running instance has loaded it before any instance mints with it.
create table token_keys (
    id           integer generated always as identity primary key,
    secret       bytea not null check (length(secret) = 32),
    created_at   timestamptz not null default clock_timestamp(),
    activates_at timestamptz not null
);

-- The key a session's token was minted under; null for a token of an earlier release (such
-- tokens are accepted while a session without a key is live and not revoked, unless
-- TOKENS__LEGACY_UNTIL has passed).
alter table sessions add column key_id integer;
create index sessions_legacy_idx on sessions (absolute_expires_at)
    where key_id is null and revoked_at is null;

-- The app role may read and add keys, never change or delete one: old keys are purged through
-- this function of the owner, which keeps every key for at least a day after its successor
-- activated (and as long as the caller asks beyond that: the sessions it minted may live).
create function purge_token_keys(keep_us bigint) returns bigint
language sql security definer set search_path = pg_catalog, public as $$
    with purged as (
        delete from token_keys k
        where exists (
            select 1 from token_keys newer
            where newer.id > k.id
              and newer.activates_at < clock_timestamp()
                  - greatest(keep_us, 86400000000) * interval '1 microsecond')
        returning 1)
    select count(*) from purged
$$;

do $$
declare
    grantee text;
begin
    for grantee in
        select distinct g.grantee from information_schema.role_table_grants g
        where g.table_schema = current_schema()
          and g.table_name = 'token_keys'
          and g.privilege_type in ('UPDATE', 'DELETE', 'TRUNCATE')
          and g.grantee <> current_user
    loop
        execute format('revoke update, delete, truncate on token_keys from %I', grantee);
    end loop;
end
$$;
