-- The lease length the fleet agrees on (see src/local/mod.rs): every instance holds and waits for
-- leases of this length, whatever its own LOCAL_CACHE__LEASE says, so a revoking call never waits
-- for a lease longer than its request timeout was checked against. The first instance with the
-- cache on sets it; a later one configured otherwise adopts it (and logs that), unless no lease is
-- held at all (the whole fleet restarted): then it sets its own.
create table local_cache_fleet (
    id         boolean primary key default true check (id),
    lease_us   bigint not null check (lease_us > 0),
    updated_at timestamptz not null default clock_timestamp()
);

-- The PostgreSQL histories authd has seen: system identifier and timeline (a promoted standby,
-- or a point-in-time restore, starts a new timeline). An asynchronous standby may have missed
-- the last commits before its promotion, lease extensions among them: for one lease after a
-- timeline is first seen, revoking calls wait for whoever may have held a lease before it, and
-- every instance drops its in-process copies and binds a new Redis generation.
create table database_timelines (
    timeline      text primary key,
    first_seen_at timestamptz not null default clock_timestamp()
);
