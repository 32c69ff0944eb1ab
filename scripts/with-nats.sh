#!/usr/bin/env bash
# Runs a command with throwaway nats-server processes (JetStream, 127.0.0.1, free ports, a
# temporary store), started by scripts/nats-server.sh and stopped by PID afterwards,
# whatever the command's exit status, which is passed on. The command gets the client
# URLs in CONVERGE_TEST_NATS_URL (comma separated) and the servers' directory in
# CONVERGE_TEST_NATS_DIR (for `nats-server.sh kill|restart DIR N`).
#
#   scripts/with-nats.sh [--nodes N] COMMAND [ARGS...]    N=1 (default) or a cluster of N
set -euo pipefail
nodes=1
if [ "${1:-}" = "--nodes" ]; then nodes=$2; shift 2; fi
[ $# -ge 1 ] || { echo "usage: $0 [--nodes N] COMMAND [ARGS...]" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d "${TMPDIR:-/tmp}/converge-nats-XXXXXX")
trap 'bash "$here/nats-server.sh" stop "$dir"' EXIT
bash "$here/nats-server.sh" start "$dir" "$nodes"
set -a
# shellcheck disable=SC1091
. "$dir/env"
set +a
set +e
"$@"
rc=$?
set -e
exit $rc
