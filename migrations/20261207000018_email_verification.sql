-- Email verification and email change (AccountService StartEmailVerification and
-- StartEmailChange, AuthService VerifyEmail and ConfirmEmailChange).
--
-- `users.email_verified_at`: when the account's current address was proven to reach its owner
-- (null: never). It only goes from null to a time: an address replaces the old one only once a
-- code sent to it was presented, and the change sets it to that moment. So a copy of it that is
-- late (a session's cached copy) can only say "not verified" of a verified address, never the
-- reverse.
alter table users add column email_verified_at timestamptz;

-- Codes are bound to an address too: a verification code to the address it was sent to (it
-- verifies nothing once the account's address changed), a change code to the new address (as
-- entered, and as Login compares it), and a password reset code started by email to that
-- address (it resets nothing once the account moved to another one, even one issued while the
-- change committed). Rows of the account go with its deletion, as the other codes do; a reset
-- started for an email of no account stores none.
alter table account_codes add column email text;
alter table account_codes add column email_normalized text;
alter table account_codes drop constraint account_codes_flow_check;
alter table account_codes add constraint account_codes_flow_check
    check (flow in ('password_reset', 'email_verification', 'email_change'));

-- The addresses an account moved away from, and while it had them: AdminService audit rows that
-- looked the account up by one of them then (`email:<normalised>`) are about this account, and
-- its deletion rewrites them as it does those of its last address; rows from before or after are
-- about whoever had the address then, and stay. Deleted with the account (by the deletion, after
-- the rewrite).
create table previous_emails (
    user_id          uuid not null,
    email_normalized text not null,
    acquired_at      timestamptz not null,
    replaced_at      timestamptz not null default clock_timestamp()
);
create index previous_emails_user_idx on previous_emails (user_id);

-- Addresses now change hands without a deletion: the rewrite of a deleted account's last address
-- covers only the rows since it got that address (`since`: its last change, or its creation).
-- The two-argument form stays for instances of the previous release.
create function pseudonymize_admin_audit(account uuid, email text, since timestamptz)
returns bigint
language sql security definer set search_path = pg_catalog, public as $$
    with rewritten as (
        update admin_audit set target = 'deleted_user:' || account::text
        where target like 'email:%' and target = 'email:' || email and at >= since
          and exists (select 1 from account_deletions where user_id = account)
          and not exists (select 1 from users where id = account)
        returning 1)
    select count(*) from rewritten
$$;

create function pseudonymize_previous_emails(account uuid) returns bigint
language sql security definer set search_path = pg_catalog, public as $$
    with rewritten as (
        update admin_audit a set target = 'deleted_user:' || account::text
        from previous_emails p
        where p.user_id = account
          and a.target like 'email:%' and a.target = 'email:' || p.email_normalized
          and a.at >= p.acquired_at and a.at < p.replaced_at
          and exists (select 1 from account_deletions where user_id = account)
          and not exists (select 1 from users where id = account)
        returning 1)
    select count(*) from rewritten
$$;

revoke execute on function pseudonymize_admin_audit(uuid, text, timestamptz) from public;
revoke execute on function pseudonymize_previous_emails(uuid) from public;
do $$
declare
    grantee text;
begin
    for grantee in
        select distinct g.grantee from information_schema.role_table_grants g
        where g.table_schema = current_schema() and g.table_name = 'admin_audit'
          and g.privilege_type = 'INSERT' and g.grantee <> current_user
    loop
        execute format('grant execute on function pseudonymize_admin_audit(uuid, text, timestamptz),
                        pseudonymize_previous_emails(uuid) to %I', grantee);
    end loop;
end
$$;
