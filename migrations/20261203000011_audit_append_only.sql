-- The audit is append-only for the role the service runs as (deploy/postgres/roles.sql): it may
-- insert and read rows of admin_audit, never change or delete them, and it may add a service
-- secret, never replace or delete one. Old audit rows are purged through purge_admin_audit,
-- which runs with the owner's rights and never deletes a row younger than a day, whatever the
-- caller asks. (Where the service runs as the owner itself, as in development, nothing changes.)
create function purge_admin_audit(retention_us bigint, batch bigint) returns bigint
language sql security definer set search_path = pg_catalog, public as $$
    with purged as (
        delete from admin_audit where id in (
            select id from admin_audit
            where at < clock_timestamp()
                       - greatest(retention_us, 86400000000) * interval '1 microsecond'
            order by at limit least(greatest(batch, 0), 10000))
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
          and g.table_name in ('admin_audit', 'service_secrets')
          and g.privilege_type in ('UPDATE', 'DELETE', 'TRUNCATE')
          and g.grantee <> current_user
    loop
        execute format('revoke update, delete, truncate on admin_audit, service_secrets from %I',
                       grantee);
    end loop;
end
$$;
