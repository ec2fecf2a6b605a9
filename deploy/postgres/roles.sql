-- The two PostgreSQL roles authd runs with, and its database. Run once, as a superuser:
--
--   psql -v ON_ERROR_STOP=1 -v database=authd \
--        -v owner=authd_owner -v owner_password='…' \
--        -v app=authd_app -v app_password='…' \
--        -f deploy/postgres/roles.sql
--
-- The owner applies the migrations (`authd migrate`, a Job or a compose service): it owns the
-- schema and every table. The app role is what the service runs as: it reads and writes rows,
-- and can create, alter or drop nothing; a migration then makes the audit append-only for it
-- (no update or delete of admin_audit or service_secrets). Run the service with
-- DATABASE__MIGRATE=false and DATABASE__CREATE_IF_MISSING=false.
\set ON_ERROR_STOP on

create role :"owner" login password :'owner_password';
create role :"app" login password :'app_password';
create database :"database" owner :"owner";

\connect :"database"

-- Only the owner creates objects in the schema (PostgreSQL before 15 lets every role).
revoke create on schema public from public;
alter schema public owner to :"owner";
grant usage on schema public to :"app";

-- Every table and sequence the owner's migrations create, now and later: rows only.
alter default privileges for role :"owner" in schema public
    grant select, insert, update, delete on tables to :"app";
alter default privileges for role :"owner" in schema public
    grant usage, select on sequences to :"app";
