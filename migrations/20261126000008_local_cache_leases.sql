-- Leases of the in-process caches (see src/local/mod.rs): an instance serves its local copies
-- only while it holds one, and a revoking call waits for every holder's acknowledgement or for
-- the end of its lease. `applied_through` is the PostgreSQL time up to which the holder has
-- read the invalidation logs and dropped what they name; `lease_us` its LOCAL_CACHE__LEASE, which
-- no wait for it exceeds (whatever a clock step did to `expires_at`).
create table local_cache_leases (
    instance uuid primary key,
    expires_at timestamptz not null,
    lease_us bigint not null,
    applied_through timestamptz,
    registered_at timestamptz not null default now()
);
