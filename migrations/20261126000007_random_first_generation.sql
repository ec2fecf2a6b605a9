-- A new database numbers its Redis generations from a start of its own: the time of its
-- creation in seconds × 1024, plus a random number below 1024 (13 digits: exact in Lua's
-- numbers and in their `%.14g` string form). Generations were numbered from 1 in every database, so a database dropped and
-- created again (starting over) met the copies its predecessor had left in Redis under the same
-- key prefix with the same generation number — and served them: tokens of the old database
-- validated. Starting from the time keeps a new database's generations above its predecessors'
-- (a fill never waits for an older database's copies to expire). A database that already has
-- generations keeps its numbering.
do $$
begin
    if not exists (select 1 from redis_fingerprints) then
        perform setval(
            'redis_generation_seq',
            floor(extract(epoch from clock_timestamp()))::bigint * 1024
                + floor(random() * 1024)::bigint
                + 1,
            false
        );
    end if;
end
$$;
