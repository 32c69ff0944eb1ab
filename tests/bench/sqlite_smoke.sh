#!/usr/bin/env bash
# converge_bench (group commit against raw sqlite3) end to end, one short round with its
# JSON. It checks that every mode runs, that every rate is positive and that the ratios
# are the quotients of their rates, not how fast anything is (targets live in
# `make bench`, never in a timed test).
#
#   tests/bench/sqlite_smoke.sh CONVERGE_BENCH
set -euo pipefail
bench=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

TMPDIR=$dir "$bench" --seconds 0.3 --rounds 1 --raw-calls 2000 --callers 8 \
  --json "$dir/sqlite.json"

python3 - "$dir/sqlite.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
def one(key):
    v = j.get(key)
    if not isinstance(v, list) or len(v) != 1 or not v[0] > 0:
        sys.exit("sqlite_smoke: %s is %r, not one positive figure" % (key, v))
    return v[0]
for key in ["serial", "group", "raw_one_tx", "raw_batched", "raw_handoff", "avg_batch",
            "raw_handoff_avg_batch"]:
    one(key)
# CPU comes in clock ticks of 10 ms: a short run on a slow disk may count none.
for key in ["writer_cpu_us", "process_cpu_us"]:
    if not j[key][0] >= 0:
        sys.exit("sqlite_smoke: %s is %r" % (key, j[key]))
for ratio, num, den in [("b_over_r1", "group", "raw_one_tx"),
                        ("b_over_r2", "group", "raw_batched"),
                        ("b_over_r3", "group", "raw_handoff"),
                        ("r3_over_r2", "raw_handoff", "raw_batched")]:
    if abs(one(ratio) - one(num) / one(den)) > 1e-9 * one(ratio):
        sys.exit("sqlite_smoke: %s = %r, not %s / %s" % (ratio, one(ratio), num, den))
if j["batches_rolled_back"] != 0:
    sys.exit("sqlite_smoke: %d batches rolled back" % j["batches_rolled_back"])
if j["raw_calls"] != 2000 or j["callers"] != 8:
    sys.exit("sqlite_smoke: ran %r raw calls, %r callers" % (j["raw_calls"], j["callers"]))
print("sqlite_smoke: ok (b/r2 %.2f at %.1f calls a commit)"
      % (one("b_over_r2"), one("avg_batch")))
PY
if ls "$dir"/converge-bench-* >/dev/null 2>&1; then
  echo "sqlite_smoke: the benchmark left its files behind" >&2
  exit 1
fi
