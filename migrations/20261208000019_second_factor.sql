-- A second factor (AuthService EnrollTotp, ConfirmTotp, RemoveTotp, RegenerateRecoveryCodes and
-- CompleteSecondFactor).
--
-- `totp_credentials`: an account's TOTP secret (RFC 6238: SHA-1, 6 digits, 30-second steps), as
-- its authenticator app holds it; authd must compute codes from it, so it cannot be hashed. It
-- counts once confirmed (`confirmed_at`): an enrolment that was never confirmed changes nothing,
-- and a new enrolment replaces it. `last_used_step` is the time step of the last code accepted:
-- a code of that step or an earlier one is refused, so each code is good once. `failures`
-- counts wrong codes since the last right one: at RATE_LIMIT__MAX_FAILED_LOGINS the factor
-- refuses checks from clients the account does not trust (a new password does not reset it).
-- Gone with the account.
create table totp_credentials (
    user_id        uuid primary key references users (id) on delete cascade,
    secret         bytea not null,
    created_at     timestamptz not null default clock_timestamp(),
    confirmed_at   timestamptz,
    last_used_step bigint not null default 0,
    failures       integer not null default 0
);

-- Single-use recovery codes, for a lost authenticator: only their SHA-256 is stored. Issued with
-- the confirmation (and again by RegenerateRecoveryCodes, which replaces them all); gone with the
-- second factor and with the account.
create table recovery_codes (
    user_id   uuid not null references users (id) on delete cascade,
    code_hash bytea not null,
    used_at   timestamptz,
    primary key (user_id, code_hash)
);

-- How a session was authenticated: 1, a password; 2, a password and a second factor (NIST SP
-- 800-63B's authenticator assurance levels). Fixed for the session's life; cached copies of the
-- previous release, which lack it, read as 1. The column with a constant default is a catalog
-- change; its check is added `not valid` (every existing row holds the default), so that the
-- migration does not scan `sessions` under its exclusive lock while the previous release serves.
alter table sessions add column aal smallint not null default 1;
alter table sessions add constraint sessions_aal_check check (aal in (1, 2)) not valid;

-- The login challenge is an account code of its own flow: issued by a Login with the right
-- password for an account with a confirmed second factor, completed once by CompleteSecondFactor.
-- It remembers the client the account trusted at the Login (the guess bucket the completion pays
-- and its exemption from the account's lockout, null for none) and whether that client is
-- trusted with the factor (spared the factor's own cap), and counts wrong codes: it is void after
-- ACCOUNTS__SECOND_FACTOR_ATTEMPTS.
alter table account_codes drop constraint account_codes_flow_check;
alter table account_codes add constraint account_codes_flow_check
    check (flow in ('password_reset', 'email_verification', 'email_change', 'second_factor'));
alter table account_codes add column trusted_client bytea;
alter table account_codes add column trusted_with_factor boolean not null default false;
alter table account_codes add column failures integer not null default 0;

-- A client the account trusts (a device, or an address, that signed in before) is spared the
-- lockouts and has a guess bucket of its own. For the second factor it counts only if it signed
-- in with it (`aal` 2) since the factor was confirmed: a device trusted from a password-only
-- sign-in, or with a factor since removed, is capped like any other (confirming a factor and
-- removing one set every client of the account back to 1).
alter table trusted_clients add column aal smallint not null default 1;
