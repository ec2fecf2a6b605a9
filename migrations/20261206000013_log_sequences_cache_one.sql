-- Followers read each log row once, by id (see `jobs::follow`): ids must be handed out in the
-- order they are drawn across sessions, which a sequence cache above 1 breaks (each session
-- would draw from a block of its own).
alter table session_invalidations alter column id set cache 1;
alter table profile_invalidations alter column id set cache 1;
