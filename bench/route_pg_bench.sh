#!/usr/bin/env bash
# The single-phase create route over HTTP on PostgreSQL, with the snapshot read before each
# create always made (`--snapshot-first always`) and skipped while no replays come
# (`adaptive`, the default; IdempotencyOptions::snapshot_first): POST /v1/orders on the
# orders-lite example without its relay and consumer (bench/orders_server.cc --route-only),
# a unique Idempotency-Key per request, then (`replay`) the same route with 64 completed keys
# sent again and again. Each round runs the four on fresh databases of one throwaway server
# (scripts/with-postgres.sh), the mode that runs first alternating, and prints requests/s, p50, p99
# and the ratios adaptive / always; with ROUNDS > 1, each ratio's median and min..max.
#
#   bench/route_pg_bench.sh BUILD_DIR [SECONDS] [CONNECTIONS] [ROUNDS]
set -euo pipefail
build="$1"
secs="${2:-10}"
conns="${3:-64}"
rounds="${4:-3}"
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${CONVERGE_TEST_PG_DSN:-}" ]; then
  exec bash "$here/scripts/with-postgres.sh" bash "$0" "$@"
fi
name=route_pg_bench
# shellcheck source=bench/wrk_common.sh
. "$(dirname "$0")/wrk_common.sh"
psql_bin="${CONVERGE_TEST_PG_BIN:+$CONVERGE_TEST_PG_BIN/}psql"
base="${CONVERGE_TEST_PG_DSN%/*}"

cat > "$dir/create.lua" <<'LUA'
local n = 0
function setup(thread) n = n + 1; thread:set("tid", n) end
function init(args) seq = 0; run = tostring(os.time()) .. "-" .. tostring(math.random(1e9)) end
function request()
  seq = seq + 1
  return wrk.format("POST", "/v1/orders",
    {["Authorization"] = "Bearer sk_bench",
     ["Idempotency-Key"] = "o-" .. run .. "-" .. tid .. "-" .. seq,
     ["Content-Type"] = "application/json"}, '{"sku":"sku-1","quantity":1}')
end
LUA
cat > "$dir/replay.lua" <<'LUA'
function init(args) seq = 0 end
function request()
  seq = seq + 1
  return wrk.format("POST", "/v1/orders",
    {["Authorization"] = "Bearer sk_bench", ["Idempotency-Key"] = "replay-" .. (seq % 64),
     ["Content-Type"] = "application/json"}, '{"sku":"sku-1","quantity":1}')
end
LUA

for r in $(seq 1 "$rounds"); do
  order="always adaptive"
  [ $((r % 2)) -eq 0 ] && order="adaptive always"  # neither mode always runs first
  for mode in $order; do
    db="route_${r}_${mode}"
    "$psql_bin" -q -v ON_ERROR_STOP=1 "$CONVERGE_TEST_PG_DSN" \
      -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" > /dev/null
    # The pool as large as the handlers, so that neither waits for the other.
    "$build/bench/converge_orders_server" --db "$base/$db?pool_size=$conns" --route-only \
      --snapshot-first "$mode" --port-file "$dir/$db.port" --workers "$conns" \
      > "$dir/$db.log" 2>&1 &
    pid=$!
    pids+=($pid)
    url="http://127.0.0.1:$(wait_port_file "$dir/$db.port")"
    run "create.$mode.$r" -s "$dir/create.lua" "$url"
    # The keys the replay run uses, completed once beforehand.
    for k in $(seq 0 63); do
      curl -s -o /dev/null -X POST "$url/v1/orders" -H "Authorization: Bearer sk_bench" \
        -H "Idempotency-Key: replay-$k" -H "Content-Type: application/json" \
        -d '{"sku":"sku-1","quantity":1}'
    done
    run "replay.$mode.$r" -s "$dir/replay.lua" "$url"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    "$psql_bin" -q "$CONVERGE_TEST_PG_DSN" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" \
      > /dev/null
  done
done

echo "orders-lite POST /v1/orders alone on PostgreSQL (fsync on), HTTP/1.1 keep-alive:"
echo "wrk -t2 -c$conns -d${secs}s, $rounds round(s); requests/s, p50, p99, non-2xx"
cat "$dir/results"
python3 - "$dir/results" "$rounds" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, rps, p50, p99, bad = line.split()
    rows[name] = float(rps)
    if int(bad) != 0:
        print("%s: %s answers were not 2xx" % (name, bad))
        sys.exit(1)
for kind in ("create", "replay"):
    ratios = [rows["%s.adaptive.%d" % (kind, r)] / rows["%s.always.%d" % (kind, r)]
              for r in range(1, int(sys.argv[2]) + 1)]
    print("%s adaptive/always: %s  median %.2f (%.2f..%.2f)" %
          (kind, " ".join("%.2f" % x for x in ratios), statistics.median(ratios), min(ratios),
           max(ratios)))
PY
