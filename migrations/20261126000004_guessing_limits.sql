-- Guessing limits that survive Redis (see README "Rate limits").

-- Wrong passwords since the last correct one (NIST SP 800-63B: at most 100 consecutive).
alter table users add column failed_logins integer not null default 0;

-- Clients (a device identifier, or an address) that signed in to an account: failed guesses
-- made elsewhere do not lock them out. Only a hash of the identifier is kept.
create table trusted_clients (
    user_id         uuid not null references users (id) on delete cascade,
    client_hash     bytea not null,
    last_success_at timestamptz not null default now(),
    primary key (user_id, client_hash)
);
create index trusted_clients_last_success_idx on trusted_clients (last_success_at);
