#!/usr/bin/env bash
# PostgreSQL benchmarks, converge against a baseline measured in the same run on the same
# throwaway server (started by scripts/with-postgres.sh when CONVERGE_TEST_PG_DSN is unset):
#
#   creates  converge: IdempotencyKeys::Execute from 64 threads (key row, business row,
#            outbox row, stored response in one transaction)
#            converge unprepared: the same with statement_cache=0 (every statement parsed
#                      and planned on each call, as before prepared statements)
#            pgbench:  the same transaction's 5 statements, 64 clients, extended protocol
#                      (bound parameters, as libpq's PQexecParams), one round trip each
#            pgbench prepared: the same with -M prepared (each statement parsed and planned
#                      once per connection, as converge's statement cache does)
#            pgbench pipelined: the same, the whole transaction in one round trip
#            (\startpipeline): the ceiling for a client that pipelines
#            Rounds interleave the five; medians, spreads and per-round ratios.
#   relay    converge: one Relay draining the outbox that run left, into the SQL queue
#            raw:      a server-side loop of SKIP LOCKED fetch + queue insert + mark, 256 a
#                      batch, each batch committed (no client round trips: the ceiling)
#
#   bench/pg_bench.sh BUILD_DIR [SECONDS] [ROUNDS] [JSON_OUT]
set -euo pipefail
build="$1"
secs="${2:-10}"
rounds="${3:-3}"
json_out="${4:-}"
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${CONVERGE_TEST_PG_DSN:-}" ]; then
  exec bash "$here/scripts/with-postgres.sh" bash "$0" "$@"
fi
command -v pgbench >/dev/null || { echo "pg_bench: pgbench is not installed"; exit 1; }
base="${CONVERGE_TEST_PG_DSN%/*}"
psql_q() { psql -qAt -v ON_ERROR_STOP=1 "$@"; }

for db in bench_cv bench_pgb; do
  psql_q "$CONVERGE_TEST_PG_DSN" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
  "$build/converge" migrate --db "$base/$db" > /dev/null
  psql_q "$base/$db" -c "CREATE TABLE payments (id TEXT PRIMARY KEY, amount BIGINT NOT NULL)"
done
psql_q "$CONVERGE_TEST_PG_DSN" -c "SHOW synchronous_commit" | sed 's/^/synchronous_commit = /'

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# The same size and shape as converge's envelopes; a space after every colon, since
# pgbench reads ":name" as a variable.
envelope='{"specversion": "1.0", "id": "ev-0000000000", "source": "urn: converge", "type": "payment.captured", "subject": "pay_0000000000", "time": "2026-11-28T00. 00. 00.000Z", "datacontenttype": "application/json", "aggregatetype": "payment", "data": {"amount": 5}}'
cat > "$dir/body.sql" <<SQL
BEGIN;
DELETE FROM idempotency_keys WHERE scope = 'bench' AND key = 'pg-' || :client_id || '-' || :n AND expires_at <= :now;
INSERT INTO idempotency_keys (scope, key, request_hash, status, recovery_point, lease_until, fence, created_at, updated_at, expires_at) VALUES ('bench', 'pg-' || :client_id || '-' || :n, 'a3f1c2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90', 'in_progress', 'started', :lease, 1, :now, :now, :expires) ON CONFLICT (scope, key) DO NOTHING;
INSERT INTO payments (id, amount) VALUES ('pg-' || :client_id || '-' || :n, 5);
INSERT INTO outbox_events (event_id, source, aggregate_type, aggregate_id, type, payload, headers, created_at, partition_no) VALUES ('ev-' || :client_id || '-' || :n, 'urn-converge', 'payment', 'pg-' || :client_id || '-' || :n, 'payment.captured', '$envelope', '{}', :now, 7);
UPDATE idempotency_keys SET status = 'completed', recovery_point = 'finished', response_status = 201, response_headers = '[]', response_body = '\x7b226964223a2270227d'::bytea, lease_until = :now, updated_at = :now WHERE scope = 'bench' AND key = 'pg-' || :client_id || '-' || :n AND fence = 1 AND status = 'in_progress';
END;
SQL
head='\set n random(1, 1000000000000)
\set now 1764288000000
\set lease :now + 30000
\set expires :now + 86400000'
{ echo "$head"; cat "$dir/body.sql"; } > "$dir/tx.sql"
# The identical transaction in one round trip: pgbench's pipeline mode (PostgreSQL 14+).
{ echo "$head"; echo '\startpipeline'; cat "$dir/body.sql"; echo '\endpipeline'; } \
  > "$dir/tx_pipe.sql"

pgbench_tps() {  # $1: script, $2: database, $3: protocol (extended); prints tps
  pgbench -n -M "${3:-extended}" -c 64 -j 2 -T "$secs" -f "$1" "$base/$2" \
    > "$dir/pgbench.out" 2>&1 \
    || { cat "$dir/pgbench.out" >&2; exit 1; }
  awk '/^tps = / {printf "%.1f\n", $3; exit}' "$dir/pgbench.out"
}

# Rounds, the three creates modes interleaved in each, so every ratio compares runs made
# minutes apart at most on the same server.
cv=() cvu=() pgb=() pgbp=() pipe=()
converge_creates() {  # $1: URI; prints creates/s
  local rate failed
  read -r _ rate failed < <("$build/bench/converge_pg_bench" --uri "$1" creates \
      --callers 64 --seconds "$secs")
  [ "${failed:-0}" = "0" ] || { echo "pg_bench: $failed converge creates failed" >&2; exit 1; }
  echo "$rate"
}
for r in $(seq 1 "$rounds"); do
  echo "  round $r/$rounds: converge creates, 64 callers, ${secs}s..." >&2
  cv+=("$(converge_creates "$base/bench_cv")")
  echo "  round $r/$rounds: converge creates, statement_cache=0..." >&2
  cvu+=("$(converge_creates "$base/bench_cv?statement_cache=0")")
  echo "  round $r/$rounds: pgbench, 64 clients, ${secs}s..." >&2
  pgb+=("$(pgbench_tps "$dir/tx.sql" bench_pgb)")
  echo "  round $r/$rounds: pgbench -M prepared, 64 clients, ${secs}s..." >&2
  pgbp+=("$(pgbench_tps "$dir/tx.sql" bench_pgb prepared)")
  echo "  round $r/$rounds: pgbench pipelined, 64 clients, ${secs}s..." >&2
  pipe+=("$(pgbench_tps "$dir/tx_pipe.sql" bench_pgb)")
done
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
ratios() {  # $1, $2: names of arrays; prints the per-round ratios
  local -n x=$1 y=$2
  for i in "${!x[@]}"; do awk -v a="${x[$i]}" -v b="${y[$i]}" 'BEGIN {printf "%.3f\n", a/b}'; done
}
mapfile -t cv_pgb < <(ratios cv pgb)
mapfile -t cv_pipe < <(ratios cv pipe)
mapfile -t cv_cvu < <(ratios cv cvu)
mapfile -t cv_pgbp < <(ratios cv pgbp)

echo "  relay: converge drain..." >&2
read -r _ relay_rate relay_events < <("$build/bench/converge_pg_bench" --uri "$base/bench_cv" relay)
echo "  relay: outbox-table drain..." >&2
read -r _ table_rate table_events < <("$build/bench/converge_pg_bench" --uri "$base/bench_cv" \
    table-relay --events "$relay_events")
echo "  relay: raw SKIP LOCKED drain..." >&2
psql_q "$base/bench_pgb" -c "INSERT INTO queue_subscriptions VALUES ('drain', '*', 0)"
raw_events=$(psql_q "$base/bench_pgb" -c "SELECT count(*) FROM outbox_events WHERE published_at IS NULL")
start=$(date +%s.%N)
psql_q "$base/bench_pgb" <<'SQL'
DO $$
DECLARE n int;
BEGIN
  LOOP
    WITH c AS (SELECT seq, event_id, source, type, aggregate_id, payload FROM outbox_events
               WHERE published_at IS NULL ORDER BY seq LIMIT 256 FOR UPDATE SKIP LOCKED),
         ins AS (INSERT INTO queue_messages (queue, event_id, source, type, subject, envelope,
                                             enqueued_at, visible_at)
                 SELECT 'drain', event_id, source, type, aggregate_id, payload, 0, 0 FROM c)
    UPDATE outbox_events o SET published_at = 1 FROM c WHERE o.seq = c.seq;
    GET DIAGNOSTICS n = ROW_COUNT;
    COMMIT;
    EXIT WHEN n = 0;
  END LOOP;
END $$;
SQL
end=$(date +%s.%N)
raw_rate=$(awk -v n="$raw_events" -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", n / (b - a)}')

list() { local IFS=,; echo "$*"; }
spread() { printf '%s\n' "$@" | sort -g | awk 'NR==1 {a=$1} {b=$1} END {printf "%s..%s", a, b}'; }
echo "PostgreSQL 15, synchronous_commit=on, fsync=on; 64 concurrent callers/clients," \
  "${secs}s per run, median of $rounds interleaved rounds (min..max)"
printf "  %-52s %10s/s  (%s)\n" "idempotent creates, converge (IdempotencyKeys::Execute)" \
  "$(median "${cv[@]}")" "$(spread "${cv[@]}")"
printf "  %-52s %10s/s  (%s)\n" "the same, converge with statement_cache=0" \
  "$(median "${cvu[@]}")" "$(spread "${cvu[@]}")"
printf "  %-52s %10s/s  (%s)\n" "the same transaction, pgbench" "$(median "${pgb[@]}")" \
  "$(spread "${pgb[@]}")"
printf "  %-52s %10s/s  (%s)\n" "the same transaction, pgbench -M prepared" \
  "$(median "${pgbp[@]}")" "$(spread "${pgbp[@]}")"
printf "  %-52s %10s/s  (%s)\n" "the same transaction, pgbench pipelined" \
  "$(median "${pipe[@]}")" "$(spread "${pipe[@]}")"
printf "  converge/pgbench = %s (%s, target >= 1.2)   converge/pipelined = %s (%s)\n" \
  "$(median "${cv_pgb[@]}")" "$(spread "${cv_pgb[@]}")" "$(median "${cv_pipe[@]}")" \
  "$(spread "${cv_pipe[@]}")"
printf "  converge/unprepared = %s (%s)   converge/pgbench prepared = %s (%s)\n" \
  "$(median "${cv_cvu[@]}")" "$(spread "${cv_cvu[@]}")" "$(median "${cv_pgbp[@]}")" \
  "$(spread "${cv_pgbp[@]}")"
printf "  %-52s %12s\n" "relay drain into the SQL queue, converge ($relay_events events)" "$relay_rate/s"
printf "  %-52s %12s\n" "raw SKIP LOCKED fetch-and-mark loop ($raw_events events)" "$raw_rate/s"
awk -v a="$relay_rate" -v b="$raw_rate" 'BEGIN {printf "  relay/raw = %.2f\n", a/b}'
printf "  %-52s %12s\n" "outbox-table relay: copy, publish, delete ($table_events rows)" \
  "$table_rate/s"
awk -v a="$table_rate" -v b="$relay_rate" 'BEGIN {printf "  table relay/relay = %.2f\n", a/b}'
if [ -n "$json_out" ]; then
  cat > "$json_out" <<JSON
{"benchmark": "pg_creates", "seconds": $secs, "callers": 64,
 "converge": [$(list "${cv[@]}")], "converge_unprepared": [$(list "${cvu[@]}")],
 "pgbench": [$(list "${pgb[@]}")], "pgbench_prepared": [$(list "${pgbp[@]}")],
 "pgbench_pipelined": [$(list "${pipe[@]}")],
 "converge_over_pgbench": [$(list "${cv_pgb[@]}")],
 "converge_over_pipelined": [$(list "${cv_pipe[@]}")],
 "converge_over_unprepared": [$(list "${cv_cvu[@]}")],
 "converge_over_pgbench_prepared": [$(list "${cv_pgbp[@]}")],
 "relay": $relay_rate, "relay_raw": $raw_rate, "table_relay": $table_rate}
JSON
fi
