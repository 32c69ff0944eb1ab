#!/usr/bin/env bash
# The scale benchmark on both stores (bench/scale_bench.cc says what it measures): preloads
# ROWS idempotency keys and ROWS inbox rows into a store, then measures creates, inbox
# claims and the sweeper against an empty store of the same kind, round by round.
#
#   bench/scale_bench.sh BUILD_DIR [ROWS] [SECONDS] [ROUNDS] [JSON_DIR] [STORES]
#   ROWS defaults to 1000000 (`make bench`); the documented run is
#   `make bench-scale SCALE_ROWS=10000000`. STORES: "sqlite postgresql retention"
#   (default) or some of them. "retention" compares PostgreSQL's two retention modes side
#   by side at ROWS rows per table (keys, inbox rows and published outbox events), all
#   past their retention (written two days ago): creates, and the sweeper removing them by
#   batched DELETEs (retention=delete) or by dropping their partition
#   (retention=partitioned); `converge_scale_bench retention` says how. "walk" (not in the
#   default) follows SQLite's sweep in key order through its tables: ROWS per table, keys
#   and inbox rows 20% expired (a walk's steady state with the default TTLs and passes),
#   creates while each table is walked through twice, the first walk flat out and the
#   second paced to take WALK_PASS seconds (default 300), then the same creates on a copy
#   of the same store for as long with no sweeper (the control); `converge_scale_bench
#   walk`.
# The stores live under $TMPDIR (default /tmp) and are removed afterwards; the PostgreSQL
# one is a throwaway server (scripts/with-postgres.sh) unless CONVERGE_TEST_PG_DSN is set.
set -euo pipefail
build="$1"
rows="${2:-1000000}"
secs="${3:-5}"
rounds="${4:-3}"
json_dir="${5:-}"
stores="${6:-sqlite postgresql retention}"
here="$(cd "$(dirname "$0")/.." && pwd)"
bench="$build/bench/converge_scale_bench"
tmp="${TMPDIR:-/tmp}"

# Room first: the loaded stores took about 0.17 KB per row and table on SQLite and 0.21 KB
# on PostgreSQL (at 1M and 10M rows, docs/design/retention.md); ask for 1 KB per row, which
# leaves room for the WAL and the index rebuilds' sorts.
need_kb=$rows
avail_kb=$(df -Pk "$tmp" | awk 'NR == 2 {print $4}')
df -h "$tmp" | sed 's/^/  /'
if [ "$avail_kb" -lt "$need_kb" ]; then
  echo "scale_bench: $((need_kb / 1024)) MiB needed under $tmp, $((avail_kb / 1024)) free" >&2
  exit 1
fi

json() { [ -n "$json_dir" ] && echo "--json=$json_dir/scale_$1.json" || true; }

if [[ " $stores " == *" sqlite "* ]]; then
  dir=$(mktemp -d "$tmp/converge-scale-XXXXXX")
  trap 'rm -rf "$dir"' EXIT
  echo "SQLite: preloading $rows rows per table"
  "$bench" preload --uri "sqlite:$dir/loaded.db" --rows "$rows"
  du -sh "$dir/loaded.db" | awk '{print "  loaded store: " $1}'
  "$bench" run --uri "sqlite:$dir/loaded.db" --empty-uri "sqlite:$dir/empty.db" \
    --seconds "$secs" --rounds "$rounds" $(json sqlite)
  rm -rf "$dir"
  trap - EXIT
fi

if [[ " $stores " == *" walk "* ]]; then
  dir=$(mktemp -d "$tmp/converge-scale-XXXXXX")
  trap 'rm -rf "$dir"' EXIT
  echo "SQLite: preloading $rows rows per table for the walk"
  "$bench" preload --uri "sqlite:$dir/walk.db" --rows "$rows" --expired 0.2
  cp "$dir/walk.db" "$dir/control.db"
  "$bench" walk --uri "sqlite:$dir/walk.db" --pass "${WALK_PASS:-300}" $(json walk) |
    tee "$dir/walk.out"
  rm -f "$dir/walk.db"*
  # The control: the same creates on a copy of the same store for as long, no sweeper.
  secs_walked=$(awk '/^ +[0-9]+ s  creates/ {t = $1} END {print t}' "$dir/walk.out")
  "$bench" walk --uri "sqlite:$dir/control.db" --control --seconds "$secs_walked" \
    $(json walk_control)
  rm -rf "$dir"
  trap - EXIT
fi

pg_stores=""
for s in postgresql retention; do
  if [[ " $stores " == *" $s "* ]]; then pg_stores="$pg_stores $s"; fi
done
if [ -n "$pg_stores" ] && [ -z "${CONVERGE_TEST_PG_DSN:-}" ]; then
  exec bash "$here/scripts/with-postgres.sh" bash "$0" "$build" "$rows" "$secs" "$rounds" \
    "$json_dir" "${pg_stores# }"
fi

if [[ " $stores " == *" postgresql "* ]]; then
  base="${CONVERGE_TEST_PG_DSN%/*}"
  psql_q() { psql -qAt -v ON_ERROR_STOP=1 "$@"; }
  for db in scale_loaded scale_empty; do
    psql_q "$CONVERGE_TEST_PG_DSN" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
    "$build/converge" migrate --db "$base/$db" > /dev/null
  done
  trap 'psql_q "$CONVERGE_TEST_PG_DSN" -c "DROP DATABASE IF EXISTS scale_loaded" \
    -c "DROP DATABASE IF EXISTS scale_empty" || true' EXIT
  echo "PostgreSQL: preloading $rows rows per table"
  "$bench" preload --uri "$base/scale_loaded" --rows "$rows"
  # What autovacuum would have done by the time a table reached this size in service.
  echo "  VACUUM ANALYZE and CHECKPOINT..." >&2
  psql_q "$base/scale_loaded" -c "VACUUM ANALYZE" -c "CHECKPOINT"
  psql_q "$base/scale_loaded" -c \
    "SELECT '  loaded store: ' || pg_size_pretty(pg_database_size(current_database()))"
  psql_q "$CONVERGE_TEST_PG_DSN" -c "SHOW shared_buffers" | sed 's/^/  shared_buffers = /'
  "$bench" run --uri "$base/scale_loaded" --empty-uri "$base/scale_empty" \
    --seconds "$secs" --rounds "$rounds" $(json postgresql)
fi

if [[ " $stores " == *" retention "* ]]; then
  base="${CONVERGE_TEST_PG_DSN%/*}"
  psql_q() { psql -qAt -v ON_ERROR_STOP=1 "$@"; }
  trap 'for m in delete partitioned; do psql_q "$CONVERGE_TEST_PG_DSN" \
    -c "DROP DATABASE IF EXISTS scale_$m" || true; done' EXIT
  for mode in delete partitioned; do
    db="scale_$mode"
    psql_q "$CONVERGE_TEST_PG_DSN" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
    echo "PostgreSQL retention=$mode: preloading $rows expired rows per table"
    # Opening the new store with the setting creates it in that shape.
    "$bench" preload --uri "$base/$db?retention=$mode" --rows "$rows" --age-days 2 --outbox
    echo "  VACUUM ANALYZE and CHECKPOINT..." >&2
    psql_q "$base/$db" -c "VACUUM ANALYZE" -c "CHECKPOINT"
    "$bench" retention --uri "$base/$db" --seconds "$secs" $(json "retention_$mode")
    psql_q "$CONVERGE_TEST_PG_DSN" -c "DROP DATABASE IF EXISTS $db"
  done
fi
