-- A new database numbers its Redis generations from a random start. Generations were numbered
-- from 1 in every database, so a database dropped and created again (starting over) met the
-- copies its predecessor had left in Redis under the same key prefix with the same generation
-- number — and served them: tokens of the old database validated. A database that already
-- has generations keeps its numbering.
do $$
begin
    if not exists (select 1 from redis_fingerprints) then
        perform setval('redis_generation_seq', 1 + floor(random() * 1099511627776)::bigint, false);
    end if;
end
$$;
