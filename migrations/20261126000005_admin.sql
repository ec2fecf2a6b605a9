-- AdminService (see README "Admin"): disabled accounts, the last login, the audit trail, and
-- the key that signs page tokens.

-- A disabled account signs in nowhere; its sessions were revoked when it was disabled.
alter table users add column disabled_at timestamptz;
alter table users add column disabled_reason text not null default '';
alter table users add column last_login_at timestamptz;

-- Every AdminService call, admitted or refused. Never a key or a token: the caller is the
-- certificate's SAN or the API key's name.
create table admin_audit (
    id          bigint generated always as identity primary key,
    at          timestamptz not null default clock_timestamp(),
    caller      text not null,
    method      text not null,
    target      text not null default '',
    outcome     text not null,
    request_id  text not null default ''
);
create index admin_audit_at_idx on admin_audit (at);

-- Secrets shared by every instance, made once by whichever instance needs one first.
create table service_secrets (
    name   text primary key,
    secret bytea not null
);
