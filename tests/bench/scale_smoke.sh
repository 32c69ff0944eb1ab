#!/usr/bin/env bash
# The scale benchmark end to end on a small SQLite store: preload, then one short round of
# every mode with its JSON. It checks that the benchmark runs, that every rate of creates
# and claims it reports is positive and that its ratios are the quotients of its rates,
# not how fast anything is (targets live in `make bench`, never in a timed test).
#
#   tests/bench/scale_smoke.sh CONVERGE_SCALE_BENCH
set -euo pipefail
bench=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

"$bench" preload --uri "sqlite:$dir/loaded.db" --rows 5000 --expired 0.2
# Keys in no order (the default) are the keys of key order, inserted in another order:
# the outbox events' seq (with --outbox) records the order of insertion.
for order in random sorted; do
  "$bench" preload --uri "sqlite:$dir/$order.db" --rows 2000 --outbox --order $order
done
python3 - "$dir/random.db" "$dir/sorted.db" <<'PY'
import sqlite3, sys, time
def column(path, sql):
    return [r[0] for r in sqlite3.connect(path).execute(sql)]
for table, key in [("idempotency_keys", "key"), ("consumer_inbox", "event_id"),
                   ("outbox_events", "event_id")]:
    sql = "SELECT %s FROM %s ORDER BY 1" % (key, table)
    a, b = column(sys.argv[1], sql), column(sys.argv[2], sql)
    if len(a) != 2000 or a != b:
        sys.exit("scale_smoke: %s: %d keys in no order, %d in key order, %s" %
                 (table, len(a), len(b), "the same" if a == b else "not the same"))
# The same rows expired: expiry follows the row number, not the key.
now = int(time.time() * 1000)
for table in ["idempotency_keys", "consumer_inbox"]:
    sql = "SELECT count(*) FROM %s WHERE expires_at < %d" % (table, now)
    a, b = column(sys.argv[1], sql)[0], column(sys.argv[2], sql)[0]
    if a != b or not 0 < a < 2000:
        sys.exit("scale_smoke: %s: %d rows expired in no order, %d in key order" %
                 (table, a, b))
inserted = "SELECT event_id FROM outbox_events ORDER BY seq"
in_key_order = column(sys.argv[2], "SELECT event_id FROM outbox_events ORDER BY 1")
if column(sys.argv[2], inserted) != in_key_order:
    sys.exit("scale_smoke: --order sorted did not insert its events in key order")
if column(sys.argv[1], inserted) == in_key_order:
    sys.exit("scale_smoke: --order random inserted its events in key order")
PY
rm -f "$dir"/random.db* "$dir"/sorted.db*
"$bench" run --uri "sqlite:$dir/loaded.db" --empty-uri "sqlite:$dir/empty.db" \
  --seconds 0.5 --rounds 1 --callers 8 --json "$dir/scale.json"

python3 - "$dir/scale.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
def one(key):
    v = j.get(key)
    if not isinstance(v, list) or len(v) != 1 or not v[0] > 0:
        sys.exit("scale_smoke: %s is %r, not one positive figure" % (key, v))
    return v[0]
for key in ["creates_empty", "creates_loaded", "creates_swept", "creates_paced",
            "claims_empty", "claims_loaded", "batch_empty", "batch_loaded",
            "raw_creates_empty", "raw_creates_loaded", "raw_creates_loaded_empty_batch",
            "raw_creates_paced"]:
    one(key)
for ratio, num, den in [("loaded_over_empty", "creates_loaded", "creates_empty"),
                        ("raw_loaded_over_empty", "raw_creates_loaded", "raw_creates_empty"),
                        ("raw_loaded_over_empty_one_batch", "raw_creates_loaded_empty_batch",
                         "raw_creates_empty"),
                        ("empty_over_raw_empty", "creates_empty", "raw_creates_empty"),
                        ("loaded_over_raw_loaded", "creates_loaded", "raw_creates_loaded"),
                        ("raw_paced_over_empty", "raw_creates_paced", "raw_creates_empty"),
                        ("paced_over_raw_paced", "creates_paced", "raw_creates_paced")]:
    if abs(one(ratio) - one(num) / one(den)) > 1e-9 * one(ratio):
        sys.exit("scale_smoke: %s = %r, not %s / %s" % (ratio, one(ratio), num, den))
# 5,000 preloaded, a fifth of them expired: the sweeps may take those, nothing else.
if j["loaded_keys_end"] < 4000:
    sys.exit("scale_smoke: the loaded store ended with %d keys" % j["loaded_keys_end"])
print("scale_smoke: ok (loaded/empty %.2f, raw sqlite3 %.2f)"
      % (one("loaded_over_empty"), one("raw_loaded_over_empty")))
PY
