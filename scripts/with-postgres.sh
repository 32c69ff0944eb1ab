#!/usr/bin/env bash
# Runs a command with a throwaway PostgreSQL 15 server: initdb into a temporary directory
# (as the postgres user when run as root: initdb refuses root), listening on 127.0.0.1 at
# a free port, started with pg_ctl -w. The command gets the server's URI in
# CONVERGE_TEST_PG_DSN (and its binaries' directory in CONVERGE_TEST_PG_BIN, its data
# directory in CONVERGE_TEST_PG_DATA for tests that restart it). The server is stopped and
# its directory removed afterwards, whatever the command's exit status, which is passed on.
#
#   scripts/with-postgres.sh COMMAND [ARGS...]
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }

bin=""
for d in /usr/lib/postgresql/15/bin /usr/lib/postgresql/*/bin; do
  [ -x "$d/initdb" ] && { bin="$d"; break; }
done
[ -n "$bin" ] || { echo "with-postgres: no PostgreSQL server found (run scripts/install-deps.sh)" >&2; exit 1; }

base="${TMPDIR:-/tmp}"
dir=$(mktemp -d "$base/converge-pg-XXXXXX")
data="$dir/data"
run_as=()
if [ "$(id -u)" -eq 0 ]; then
  chown postgres:postgres "$dir"
  run_as=(runuser -u postgres --)
fi
# A port a restart can have again (tests stop and start the server): scripts/free-port.py.
port=$(python3 "$(dirname "$0")/free-port.py")

stop() {
  "${run_as[@]}" "$bin/pg_ctl" -D "$data" -m immediate stop > /dev/null 2>&1 || true
  if [ -f "$data/postmaster.pid" ]; then kill -9 "$(head -1 "$data/postmaster.pid")" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap stop EXIT

echo "with-postgres: initdb and start on 127.0.0.1:$port"
"${run_as[@]}" "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --no-sync > "$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log"; exit 1; }
# In the configuration file, so a test that restarts the server gets the same settings.
cat >> "$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 300
fsync = on
synchronous_commit = on
CONF
"${run_as[@]}" "$bin/pg_ctl" -D "$data" -w -t 60 -l "$dir/server.log" start > /dev/null \
  || { cat "$dir/server.log"; exit 1; }

export CONVERGE_TEST_PG_DSN="postgresql://postgres@127.0.0.1:$port/postgres"
export CONVERGE_TEST_PG_BIN="$bin"
export CONVERGE_TEST_PG_DATA="$data"
export CONVERGE_TEST_PG_RUN_AS="${run_as[*]}"
set +e
"$@"
rc=$?
set -e
exit $rc
