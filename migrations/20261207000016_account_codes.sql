-- Single-use codes of the account flows (password reset, and the flows after it), issued to a
-- trusted caller that delivers them. Only the code's SHA-256 is stored; a code is bound to its
-- flow and its account, expires at `expires_at`, and is used once (`used_at`). The code that
-- completed its flow also records when (`completed_at`), how many sessions its completion
-- revoked, and the SHA-256 of the password hash it set (`completed_with`), so that a retry of the
-- same completion — while that password is still the account's, and for 10 minutes past the
-- code's expiry — answers as the first did, after the same wait. A password change, a completed
-- reset and disabling the account void the account's other codes (`used_at`).
-- A start for an email of no account writes a row too, without an account (`user_id` null):
-- it completes nothing, and makes both answers cost the same. For the same reason `user_id` has
-- no foreign key (its check would cost only the known emails' starts): a code counts only while
-- its account exists (every read joins `users`), and expired rows go with the purge job.
create table account_codes (
    code_hash    bytea primary key,
    flow         text not null check (flow in ('password_reset')),
    user_id      uuid,
    created_at   timestamptz not null default clock_timestamp(),
    expires_at   timestamptz not null,
    used_at      timestamptz,
    completed_at timestamptz,
    completed_with bytea,
    revoked      integer not null default 0
);
create index account_codes_user_idx on account_codes (user_id, flow);
create index account_codes_expires_idx on account_codes (expires_at);

-- An operator may require a new password at the account's next login (AdminService
-- RequirePasswordChange): Login with the right password then answers with a password reset code
-- instead of a session. The new password clears it.
alter table users add column password_change_required boolean not null default false;
