#!/usr/bin/env bash
# NATS benchmarks (bench/nats_bench.cc): relay drain from PostgreSQL to JetStream beside
# its two ceilings measured in the same run, and consumer throughput with 10% duplicate
# deliveries. Starts a throwaway PostgreSQL (scripts/with-postgres.sh) and nats-server
# (scripts/with-nats.sh) unless CONVERGE_TEST_PG_DSN / CONVERGE_TEST_NATS_URL are set.
#
#   bench/nats_bench.sh BUILD_DIR [EVENTS]
set -euo pipefail
build="$1"
events="${2:-200000}"
here="$(cd "$(dirname "$0")/.." && pwd)"
[ -x "$build/bench/converge_nats_bench" ] ||
  { echo "nats_bench: no $build/bench/converge_nats_bench (a build with NATS)"; exit 0; }
if [ -z "${CONVERGE_TEST_PG_DSN:-}" ]; then
  exec bash "$here/scripts/with-postgres.sh" bash "$0" "$@"
fi
if [ -z "${CONVERGE_TEST_NATS_URL:-}" ]; then
  exec bash "$here/scripts/with-nats.sh" bash "$0" "$@"
fi
base="${CONVERGE_TEST_PG_DSN%/*}"
psql -qAt -v ON_ERROR_STOP=1 "$CONVERGE_TEST_PG_DSN" \
  -c "DROP DATABASE IF EXISTS bench_nats" -c "CREATE DATABASE bench_nats"
"$build/converge" migrate --db "$base/bench_nats" > /dev/null
"$build/bench/converge_nats_bench" --uri "$base/bench_nats" \
  --nats "nats://${CONVERGE_TEST_NATS_URL#nats://}" --events "$events"
