-- Users, their profiles and their sessions. PostgreSQL is the source of truth; Redis only holds
-- copies of these rows.

create table users (
    id               uuid primary key,
    email            text not null,
    -- trimmed + lower-cased form used for lookups and uniqueness
    email_normalized text not null,
    password_hash    text not null,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    constraint users_email_normalized_key unique (email_normalized)
);

create table profiles (
    user_id      uuid primary key references users (id) on delete cascade,
    display_name text not null,
    bio          text not null default '',
    avatar_url   text not null default '',
    locale       text not null default '',
    time_zone    text not null default '',
    version      bigint not null default 1,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now()
);

create table sessions (
    id                  uuid primary key,
    user_id             uuid not null references users (id) on delete cascade,
    -- SHA-256 of the bearer token; the token itself is never stored
    token_hash          bytea not null,
    created_at          timestamptz not null,
    last_seen_at        timestamptz not null,
    absolute_expires_at timestamptz not null,
    authenticated_at    timestamptz not null,
    revoked_at          timestamptz,
    ip_address          text not null default '',
    user_agent          text not null default '',
    constraint sessions_token_hash_key unique (token_hash)
);

create index sessions_user_id_idx on sessions (user_id);

-- Revocations whose Redis step has not been confirmed yet (transactional outbox). A row is written
-- in the same statement as the revocation and removed once the Redis tombstone is in place; any
-- instance drains what is left, so a revocation is never lost while Redis is unreachable.
create table session_invalidations (
    id         bigint generated always as identity primary key,
    token_hash bytea not null,
    user_id    uuid not null,
    -- the tombstone is needed until the session would have expired anyway
    expires_at timestamptz not null,
    created_at timestamptz not null default now()
);
