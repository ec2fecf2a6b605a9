#!/bin/sh
# docker compose: the postgres image runs this once, when its data volume is new.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v database=authd \
  -v owner=authd_owner -v owner_password="$AUTHD_OWNER_PASSWORD" \
  -v app=authd_app -v app_password="$AUTHD_APP_PASSWORD" \
  -f /authd/roles.sql
