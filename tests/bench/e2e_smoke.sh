#!/usr/bin/env bash
# converge_e2e_bench (producer commit -> consumer effect, embedded SQLite) end to end,
# short, through the relay and published in the producer's transaction, with its JSON. It
# checks that every event reached its effect, that the figures are ordered as percentiles
# are and that each way reports its own stages, not how fast anything is (targets live in
# `make bench`, never in a timed test).
#
#   tests/bench/e2e_smoke.sh CONVERGE_E2E_BENCH
set -euo pipefail
bench=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

TMPDIR=$dir "$bench" --seconds 0.5 --callers 8 --rate 400 \
  --store-options checkpoint_pages=2000 --json "$dir/relay.json" --timeline "$dir/relay.csv"
TMPDIR=$dir "$bench" --seconds 0.5 --callers 8 --rate 400 --publish-in-transaction \
  --relay-acquire-interval 0 --json "$dir/in_tx.json"

python3 - "$dir/relay.json" "$dir/in_tx.json" "$dir/relay.csv" <<'PY'
import csv, json, sys
def check(path, in_tx, options, acquire_ms, stages):
    j = json.load(open(path))
    name = "in_tx" if in_tx else "relay"
    def fail(what):
        sys.exit("e2e_smoke (%s): %s" % (name, what))
    if (j["publish_in_transaction"] != in_tx or j["store_options"] != options or
            j["relay_acquire_interval_ms"] != acquire_ms):
        fail("ran with %r, %r, %r" % (j["publish_in_transaction"], j["store_options"],
                                      j["relay_acquire_interval_ms"]))
    if not (j["process_cpus"] > 0 and j["written_bytes_per_event"] > 0 and
            0 <= j["steal_share"] <= 1):
        fail("cpus %r, written %r, steal %r" % (j["process_cpus"],
                                                j["written_bytes_per_event"], j["steal_share"]))
    if not (j["peak"] > 0 and j["produced"] > 0 and j["rate"] == 400):
        fail("peak %r, produced %r, rate %r" % (j["peak"], j["produced"], j["rate"]))
    if j["events"] != 200:  # every event of the half phase reached its effect
        fail("%r events with a latency, not 200" % j["events"])
    if not 0 <= j["p50_ms"] <= j["p99_ms"] <= j["max_ms"]:
        fail("p50 %r, p99 %r, max %r" % (j["p50_ms"], j["p99_ms"], j["max_ms"]))
    if not 0 <= j["floor_p50_ms"] <= j["floor_p99_ms"]:
        fail("floor p50 %r, p99 %r" % (j["floor_p50_ms"], j["floor_p99_ms"]))
    got = [(s["from"], s["to"]) for s in j["stages"]]
    if got != stages:
        fail("stages %r, not %r" % (got, stages))
    for s in j["stages"]:
        if not 0 <= s["p50_ms"] <= s["p99_ms"]:
            fail("stage %r" % s)
    print("e2e_smoke (%s): ok (p50 %.2f ms, p99 %.2f ms)" % (name, j["p50_ms"], j["p99_ms"]))
    return j
tail = [("consumer fetched", "handler start"), ("handler start", "effect commit")]
relay = check(sys.argv[1], False, "checkpoint_pages=2000", 1000,  # the default: lease / 10
              [("producer commit", "relay publishing"), ("relay publishing", "relay commit"),
               ("relay commit", "consumer fetched")] + tail)
check(sys.argv[2], True, "", 0, [("producer commit", "consumer fetched")] + tail)
# The timeline: each event of the half phase once, every stage timed, the latencies the
# JSON's percentiles were taken from.
rows = list(csv.DictReader(open(sys.argv[3])))
if len(rows) != 200 or len({r["n"] for r in rows}) != 200:
    sys.exit("e2e_smoke: the timeline has %d rows" % len(rows))
lat = sorted(max(0.0, float(r["effect commit"]) - float(r["producer commit"])) for r in rows)
if abs(lat[int(0.99 * len(lat))] - relay["p99_ms"]) > 0.01:
    sys.exit("e2e_smoke: the timeline's p99 %r is not the JSON's %r"
             % (lat[int(0.99 * len(lat))], relay["p99_ms"]))
print("e2e_smoke: timeline ok")
PY
if ls "$dir"/converge-e2e-* >/dev/null 2>&1; then
  echo "e2e_smoke: the benchmark left its store behind" >&2
  exit 1
fi
