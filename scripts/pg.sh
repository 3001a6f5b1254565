#!/usr/bin/env bash
# PostgreSQL for the tests (scripts/test.sh): Debian's postgresql, installed when missing; its cluster started when
# it is down (and left running); a role kvmotion_test that logs in with a password from 127.0.0.1 only and
# owns the database kvmotion_test (each test makes its own schema in it, and drops it). Run as root.
# Prints the URL the tests take from $KVMOTION_TEST_PG_URL, and nothing else on standard output.
set -euo pipefail
ROLE=kvmotion_test
PASSWORD=kvmotion_test            # a throwaway role of the test machine; the cluster listens on localhost only
if ! dpkg-query -W -f='${Status}' postgresql 2>/dev/null | grep -q "install ok installed"; then
  echo "installing postgresql" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
if [ -z "$(pg_lsclusters -h)" ]; then             # installed without its default cluster (create_main_cluster = false)
  version="$(ls /usr/lib/postgresql | sort -V | tail -1)"
  pg_createcluster "$version" main >&2
fi
read -r version cluster port status _ < <(pg_lsclusters -h | head -1)
if [ "$status" != "online" ]; then
  # as root, pg_ctlcluster makes /var/run/postgresql and runs the server as the cluster's owner (postgres)
  echo "starting the PostgreSQL cluster $version/$cluster (port $port)" >&2
  pg_ctlcluster "$version" "$cluster" start >&2
fi
for _ in $(seq 60); do                            # up to 30 s for the server to accept connections
  pg_isready -q -h 127.0.0.1 -p "$port" && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$port" || { echo "PostgreSQL $version/$cluster does not answer on port $port" >&2; exit 1; }
runuser -u postgres -- psql -q -X -p "$port" -v ON_ERROR_STOP=1 -d postgres >&2 <<SQL
SELECT format('CREATE ROLE %I LOGIN', '$ROLE') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$ROLE')
\gexec
ALTER ROLE $ROLE LOGIN NOSUPERUSER NOCREATEROLE PASSWORD '$PASSWORD';
SELECT format('CREATE DATABASE %I OWNER %I', '$ROLE', '$ROLE')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$ROLE')
\gexec
SQL
echo "postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$port/$ROLE"
