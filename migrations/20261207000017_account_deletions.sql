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

-- GetUser by email records `email:<as sent>`; those rows (the email compared trimmed and
-- lower-cased) are rewritten to `deleted_user:<id>`.
create function pseudonymize_admin_audit(account uuid, emails text[]) returns bigint
language sql security definer set search_path = pg_catalog, public as $$
    with rewritten as (
        update admin_audit set target = 'deleted_user:' || account::text
        where target like 'email:%' and lower(btrim(substr(target, 7))) = any (emails)
        returning 1)
    select count(*) from rewritten
$$;
