-- Every running instance, its cache on or off, seen every few seconds: the fleet's lease (see
-- local_cache_fleet) is replaced only when no instance that holds leases of it is running, and
-- never by a length some running instance's request timeout cannot wait for (`covers_us`: the
-- longest lease that instance's GRPC__REQUEST_TIMEOUT covers). See src/store/leases.rs.
create table local_cache_instances (
    instance  uuid primary key,
    seen_at   timestamptz not null default clock_timestamp(),
    holds     boolean not null,
    covers_us bigint not null check (covers_us >= 0)
);
create index local_cache_instances_seen_at_idx on local_cache_instances (seen_at);
