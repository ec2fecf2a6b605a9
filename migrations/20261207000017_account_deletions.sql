-- Account deletion (AuthService DeleteAccount, AdminService DeleteUser). The user's row goes, and
-- with it (cascade) the profile, the sessions and the trusted clients; the codes of the account
-- flows are deleted in the same transaction. What stays is pseudonymous: this table's row (the
-- account's id, when, by whom — `user` or `operator` — and the profile version the caches were
-- floored at, so a retried deletion waits for the same caches), the revocations' rows (token
-- hashes), the event stream's rows (ids), and the AdminService audit, whose rows naming the
-- account by its email are rewritten to name it by its id (pseudonymize_admin_audit, with the
-- owner's rights: the audit stays append-only for the service's role).
create table account_deletions (
    user_id         uuid primary key,
    deleted_at      timestamptz not null default clock_timestamp(),
    deleted_by      text not null check (deleted_by in ('user', 'operator')),
    profile_version bigint not null
);

-- GetUser by email records `email:<the email as Login compares it>` (when it is one); those rows
-- are rewritten to `deleted_user:<id>`, for an account that is deleted (recorded above, its row
-- gone) only. The index keeps this from reading the whole audit. Only the roles that write the
-- audit may call it.
create index admin_audit_email_target_idx on admin_audit (target) where target like 'email:%';

create function pseudonymize_admin_audit(account uuid, email text) returns bigint
language sql security definer set search_path = pg_catalog, public as $$
    with rewritten as (
        update admin_audit set target = 'deleted_user:' || account::text
        where target like 'email:%' and target = 'email:' || email
          and exists (select 1 from account_deletions where user_id = account)
          and not exists (select 1 from users where id = account)
        returning 1)
    select count(*) from rewritten
$$;

revoke execute on function pseudonymize_admin_audit(uuid, text) from public;
do $$
declare
    grantee text;
begin
    for grantee in
        select distinct g.grantee from information_schema.role_table_grants g
        where g.table_schema = current_schema() and g.table_name = 'admin_audit'
          and g.privilege_type = 'INSERT' and g.grantee <> current_user
    loop
        execute format('grant execute on function pseudonymize_admin_audit(uuid, text) to %I',
                       grantee);
    end loop;
end
$$;
