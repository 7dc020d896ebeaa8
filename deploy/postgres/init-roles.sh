#!/bin/sh
# Runs once, when the postgres volume is first initialised (docker-entrypoint-initdb.d),
# as the superuser. Two roles, neither a superuser:
#   owner (sluice_owner)  owns the database and its schema; `sluice migrate` runs as it.
#   app   (sluice_app)    the gateway's role: reads and writes rows (granted by
#                         `sluice db grant-app sluice_app` after each migration) and owns
#                         nothing, so it can neither DISABLE the audit trigger nor
#                         SET session_replication_role (superuser only).
# tests/reliability/test_db_roles.py runs this file against a real Postgres.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v db="$POSTGRES_DB" \
     -v owner="${SLUICE_OWNER_ROLE:-sluice_owner}" -v owner_pw="$SLUICE_OWNER_PASSWORD" \
     -v app="${SLUICE_APP_ROLE:-sluice_app}" -v app_pw="$SLUICE_APP_PASSWORD" <<'SQL'
CREATE ROLE :"owner" LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB PASSWORD :'owner_pw';
CREATE ROLE :"app" LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS
    PASSWORD :'app_pw';
ALTER DATABASE :"db" OWNER TO :"owner";
ALTER SCHEMA public OWNER TO :"owner";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO :"owner", :"app";
SQL
