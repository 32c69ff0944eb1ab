#!/usr/bin/env bash
# The CLI against a real file: `converge library-demo` converges and leaves one dead letter, which
# `converge dlq list|show|replay|discard` then inspect and act on. Bad input gets a clear
# error and a non-zero exit.
set -euo pipefail
converge="$1"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
db="$dir/demo.db"

fail() { echo "FAIL: $*" >&2; exit 1; }

"$converge" library-demo --db "$db" --payments 300 --producers 8 --seed 42 > "$dir/demo.out" \
  || { cat "$dir/demo.out"; fail "demo did not converge"; }
grep -q "verdict: CONVERGED" "$dir/demo.out" || fail "no verdict line"

# The demo refuses to reuse a file.
if "$converge" library-demo --db "$db" > "$dir/reuse.out" 2>&1; then fail "demo reused an existing file"; fi
grep -q "fresh file" "$dir/reuse.out" || fail "no clear error for an existing file"

"$converge" dlq list --db "sqlite:$db" > "$dir/list.out"
grep -q "1 dead letter(s)" "$dir/list.out" || { cat "$dir/list.out"; fail "list"; }
id=$("$converge" dlq list --db "sqlite:$db" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')

"$converge" dlq show --db "sqlite:$db" "$id" > "$dir/show.out"
grep -q '"error_class": "permanent"' "$dir/show.out" || fail "show lacks the error class"
grep -q '"currency": "XTS"' "$dir/show.out" || fail "show lacks the envelope"

"$converge" dlq replay --db "sqlite:$db" "$id" | grep -q "replayed" || fail "replay"
# Replaying twice is refused: it is no longer parked (exit 4, the documented conflict).
set +e
"$converge" dlq replay --db "sqlite:$db" "$id" 2> "$dir/replay2.err"; rc=$?
"$converge" dlq discard --db "sqlite:$db" "$id" 2> "$dir/discard2.err"; rc2=$?
set -e
[ "$rc" -eq 4 ] || fail "double replay should exit 4, got $rc"
grep -q "not parked" "$dir/replay2.err" || fail "double replay error unclear"
[ "$rc2" -eq 4 ] || fail "discard of a replayed letter should exit 4, got $rc2"
"$converge" dlq replay --help | grep -q "4 replay or discard refused" || fail "exit codes not in --help"
"$converge" dlq list --db "sqlite:$db" --state replayed | grep -q "1 dead letter(s)" || fail "state filter"
# The replayed message is back on its queue.
python3 - "$db" <<'PY' || fail "replayed message not on the queue"
import sqlite3, sys
n = sqlite3.connect(sys.argv[1]).execute("SELECT count(*) FROM queue_messages WHERE queue='ledger'").fetchone()[0]
sys.exit(0 if n == 1 else 1)
PY

# Every letter is replayed where it came from, never onto a SQL queue no one reads (found
# by review: the CLI had no route for sagas' and NATS consumers' letters, so both were
# marked replayed and enqueued on a queue named after them): a parked saga goes back to
# compensating; a NATS consumer's letter is refused here and stays parked.
python3 - "$db" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("INSERT INTO saga_instances (saga_id, type, state, step, data, version, attempts, "
          "step_started_at, next_attempt_at, lease_until, fence, error, created_at, updated_at) "
          "VALUES ('saga-1', 'checkout', 'failed_to_compensate', 1, '{}', 1, 5, 0, 0, 0, 1, "
          "'refund refused', 0, 0)")
for queue, event_id in (("saga:checkout", "saga-1"), ("nats:ledger", "evt-nats-1")):
    c.execute("INSERT INTO dead_letters (consumer, queue, event_id, source, type, envelope, "
              "error_class, error_code, error, attempts, first_failure_at, last_failure_at, "
              "updated_at) VALUES (?, ?, ?, 's', 't', '{}', 'exhausted', 'UNAVAILABLE', 'x', 5, "
              "0, 0, 0)", (queue.split(":")[1], queue, event_id))
c.commit()
PY
letter_of() {
  python3 - "$db" "$1" <<'PY'
import sqlite3, sys
print(sqlite3.connect(sys.argv[1]).execute(
    "SELECT id FROM dead_letters WHERE queue = ?", (sys.argv[2],)).fetchone()[0])
PY
}
saga_letter=$(letter_of saga:checkout)
nats_letter=$(letter_of nats:ledger)
"$converge" dlq replay --db "sqlite:$db" "$saga_letter" | grep -q "replayed" || fail "saga replay"
set +e
"$converge" dlq replay --db "sqlite:$db" "$nats_letter" 2> "$dir/nats.err"; rc=$?
set -e
[ "$rc" -eq 1 ] || fail "replay of a NATS consumer's letter should exit 1, got $rc"
grep -q "admin API" "$dir/nats.err" || { cat "$dir/nats.err"; fail "NATS refusal unclear"; }
python3 - "$db" "$nats_letter" <<'PY' || fail "a letter went where it does not belong"
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
state = c.execute("SELECT state FROM saga_instances WHERE saga_id = 'saga-1'").fetchone()[0]
nats = c.execute("SELECT state FROM dead_letters WHERE id = ?", (sys.argv[2],)).fetchone()[0]
stray = c.execute("SELECT count(*) FROM queue_messages "
                  "WHERE queue IN ('saga:checkout', 'nats:ledger')").fetchone()[0]
print("saga:", state, "nats letter:", nats, "stray messages:", stray)
sys.exit(0 if (state, nats, stray) == ("compensating", "parked", 0) else 1)
PY

# Unknown ids and bad arguments.
set +e
"$converge" dlq show --db "sqlite:$db" 999999 2> "$dir/nf.err"; rc=$?
set -e
[ "$rc" -eq 3 ] || fail "unknown id should exit 3, got $rc"
grep -q "no dead letter 999999" "$dir/nf.err" || fail "unknown id error unclear"
if "$converge" dlq discard --db "sqlite:$db" abc 2>/dev/null; then fail "non-numeric id accepted"; fi
if "$converge" dlq list --db "mysql://nope" 2> "$dir/uri.err"; then fail "bad URI accepted"; fi
grep -q "unknown database URI" "$dir/uri.err" || fail "bad URI error unclear"
if "$converge" dlq list 2>/dev/null; then fail "missing --db accepted"; fi
if CONVERGE_FAILPOINTS='x=explode' "$converge" dlq list --db "sqlite:$db" 2> "$dir/fp.err"; then
  fail "bad failpoint spec accepted"
fi
grep -q "CONVERGE_FAILPOINTS" "$dir/fp.err" || fail "bad failpoint error unclear"

# Retention: the sweep runs in bounded batches and reports what it deleted (nothing has
# expired yet in a fresh demo file).
"$converge" sweep --db "sqlite:$db" --batch 10 > "$dir/sweep.out" || fail "sweep"
grep -q "swept: 0 idempotency keys" "$dir/sweep.out" || { cat "$dir/sweep.out"; fail "sweep deleted live rows"; }

# A file from a newer converge is refused, and left untouched.
python3 - "$db" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1]); c.execute("INSERT INTO converge_schema VALUES (99)"); c.commit()
PY
if "$converge" migrate --db "sqlite:$db" 2> "$dir/new.err"; then fail "newer schema accepted"; fi
grep -q "newer than this binary" "$dir/new.err" || fail "newer schema error unclear"

# webhook sign | verify round trip, with the Standard Webhooks example secret.
secret=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
now=$(date +%s)
sig=$("$converge" webhook sign --secret "$secret" --id msg_1 --timestamp "$now" --body '{"a":1}' \
  | awk '/webhook-signature/ {print $2}')
[ -n "$sig" ] || fail "webhook sign printed no signature"
# The same secret from a file or the environment, which keep it out of the process list.
(umask 077 && printf '%s\n' "$secret" > "$dir/secret")
sig_file=$("$converge" webhook sign --secret-file "$dir/secret" --id msg_1 --timestamp "$now" \
  --body '{"a":1}' | awk '/webhook-signature/ {print $2}')
[ "$sig_file" = "$sig" ] || fail "webhook sign --secret-file"
sig_env=$(CONVERGE_WEBHOOK_SECRET="$secret" "$converge" webhook sign --id msg_1 --timestamp "$now" \
  --body '{"a":1}' | awk '/webhook-signature/ {print $2}')
[ "$sig_env" = "$sig" ] || fail "webhook sign with CONVERGE_WEBHOOK_SECRET"
"$converge" webhook verify --secret "$secret" --id msg_1 --timestamp "$now" --signature "$sig" \
  --body '{"a":1}' | grep -q valid || fail "webhook verify rejected its own signature"
echo -n '{"a":1}' | "$converge" webhook verify --secret "$secret" --id msg_1 --timestamp "$now" \
  --signature "$sig" > /dev/null || fail "webhook verify from stdin"
set +e
"$converge" webhook verify --secret "$secret" --id msg_1 --timestamp "$now" --signature "$sig" \
  --body '{"a":2}' > "$dir/tampered.out"; rc=$?
"$converge" webhook verify --secret whsec_! --id msg_1 --timestamp "$now" --signature "$sig" \
  --body x 2> "$dir/badsecret.err"; rc2=$?
set -e
[ "$rc" -eq 1 ] && grep -q "bad_signature" "$dir/tampered.out" || fail "tampered body not rejected"
[ "$rc2" -eq 2 ] && grep -q "whsec_" "$dir/badsecret.err" || fail "malformed secret not reported"

echo "cli: 1 passed, 0 failed"
