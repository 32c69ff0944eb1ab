#!/usr/bin/env bash
# converge chaos on PostgreSQL, against the server scripts/with-postgres.sh started (its URI
# in CONVERGE_TEST_PG_DSN). Skipped (77) without one, like the pg tests. Database restarts
# mid-load only with CHAOS_DB_RESTARTS=1 (make chaos): under ctest other pg tests share the
# server, and a restart would fail them, not this campaign.
#   campaign_pg.sh CONVERGE_BIN [chaos options...]
set -euo pipefail
bin="$1"
shift
if [ -z "${CONVERGE_TEST_PG_DSN:-}" ]; then
  echo "skipped: needs CONVERGE_TEST_PG_DSN (scripts/with-postgres.sh)"
  exit 77
fi
if [ "${CHAOS_DB_RESTARTS:-0}" != 1 ]; then
  unset CONVERGE_TEST_PG_BIN CONVERGE_TEST_PG_DATA CONVERGE_TEST_PG_RUN_AS
fi
exec "$bin" chaos --store "$CONVERGE_TEST_PG_DSN" "$@"
