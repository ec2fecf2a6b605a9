-- Signing keys of the short-lived JWTs minted from sessions (IssueJwt), published as a JWKS.
-- Made by the instances themselves like token_keys: the first that finds the newest key of
-- JWT__ALGORITHM older than JWT__KEY_ROTATION less the lead (or none) makes the next, which is
-- published at once and signs only after the lead, so every verifier's cached JWKS holds it
-- before a JWT names it. `private_key` is the PKCS#8 document (DER); the public key is derived
-- from it.
create table jwt_keys (
    id           integer generated always as identity primary key,
    algorithm    text not null check (algorithm in ('EdDSA', 'ES256')),
    private_key  bytea not null,
    created_at   timestamptz not null default clock_timestamp(),
    activates_at timestamptz not null
);

-- The app role may read and add keys, never change or delete one: old keys are purged through
-- this function of the owner. The instance names the keys it found retired (a key is retired by
-- the newest key after it that parses, which only the instance can judge); the function deletes
-- only those of them that a newer key has followed for at least a day (and as long as the caller
-- asks beyond that: the JWTs they signed may live).
create function purge_jwt_keys(ids integer[], keep_us bigint) returns bigint
language sql security definer set search_path = pg_catalog, public as $$
    with purged as (
        delete from jwt_keys k
        where k.id = any(ids)
          and exists (
            select 1 from jwt_keys newer
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
          and g.table_name = 'jwt_keys'
          and g.privilege_type in ('UPDATE', 'DELETE', 'TRUNCATE')
          and g.grantee <> current_user
    loop
        execute format('revoke update, delete, truncate on jwt_keys from %I', grantee);
    end loop;
end
$$;
