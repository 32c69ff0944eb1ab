#!/usr/bin/env bash
# The modes for services in any language (docs/design/proxy.md, docs/design/gateway.md),
# against a ceiling they cannot beat: converge_noop_upstream (bench/noop_upstream.cc), the
# same HTTP server answering at once, called directly. In one run, with wrk:
#   direct   POST /v1/charges straight to the upstream: the ceiling
#   pass     the same request through `converge proxy` on an optional-key route without a
#            key (passed through unclaimed: the proxy's forwarding cost alone)
#   replay   through the proxy with keys that already completed (answered from the store,
#            the upstream is not called)
#   create   through the proxy with a new key each time (claim, forward, store the answer)
#   intake   Standard Webhooks deliveries, signed beforehand, each with a new id, POSTed to
#            `converge gateway` (verify, dedupe row + delivery intent, 204), and then how
#            fast the gateway delivers them all to the upstream
# Stores: SQLite (synchronous=FULL), the embedded default. Prints requests/s, p50/p99,
# the ratios to direct and the latency the proxy adds at p50/p99.
#
#   bench/modes_bench.sh BUILD_DIR [SECONDS] [CONNECTIONS]
set -euo pipefail
build="$1"
secs="${2:-10}"
conns="${3:-64}"
converge="$build/converge"
name=modes_bench
# shellcheck source=bench/wrk_common.sh
. "$(dirname "$0")/wrk_common.sh"

"$build/bench/converge_noop_upstream" --port-file "$dir/up.port" --workers "$conns" \
  > "$dir/up.log" 2>&1 &
pids+=($!)
up="http://127.0.0.1:$(wait_port_file "$dir/up.port")"

cat > "$dir/proxy.toml" <<TOML
[proxy]
listen = "127.0.0.1:0"
upstream = "$up"
store = "sqlite:$dir/proxy.db"
scope = "bearer"
log_level = "warn"
max_in_flight_per_scope = $((conns * 2))
[server]
worker_threads = $conns
[[route]]
method = "POST"
path = "/v1/charges"
key = "required"
[[route]]
method = "POST"
path = "/v1/refunds/{id}"
key = "optional"
TOML
"$converge" proxy --config "$dir/proxy.toml" --port-file "$dir/proxy.port" \
  > "$dir/proxy.log" 2>&1 &
pids+=($!)
proxy="http://127.0.0.1:$(wait_port_file "$dir/proxy.port")"

body='{"amount":1000,"currency":"EUR"}'
cat > "$dir/plain.lua" <<LUA
function request()
  return wrk.format("POST", nil, {["Authorization"] = "Bearer sk_bench",
    ["Content-Type"] = "application/json"}, '$body')
end
LUA
cat > "$dir/create.lua" <<LUA
local n = 0
function setup(thread) n = n + 1; thread:set("tid", n) end
function init(args) seq = 0; run = tostring(os.time()) end
function request()
  seq = seq + 1
  return wrk.format("POST", "/v1/charges", {["Authorization"] = "Bearer sk_bench",
    ["Idempotency-Key"] = "k-" .. run .. "-" .. tid .. "-" .. seq,
    ["Content-Type"] = "application/json"}, '$body')
end
LUA
cat > "$dir/replay.lua" <<LUA
function init(args) seq = 0 end
function request()
  seq = seq + 1
  return wrk.format("POST", "/v1/charges", {["Authorization"] = "Bearer sk_bench",
    ["Idempotency-Key"] = "replay-" .. (seq % 64),
    ["Content-Type"] = "application/json"}, '$body')
end
LUA
for k in $(seq 0 63); do  # the keys the replay run uses, completed once beforehand
  curl -s -o /dev/null -X POST "$proxy/v1/charges" -H "Authorization: Bearer sk_bench" \
    -H "Idempotency-Key: replay-$k" -H "Content-Type: application/json" -d "$body"
done

run direct -s "$dir/plain.lua" "$up/v1/charges"
run pass -s "$dir/plain.lua" "$proxy/v1/refunds/r1"
run replay -s "$dir/replay.lua" "$proxy"
run create -s "$dir/create.lua" "$proxy"

# The gateway: deliveries signed beforehand (wrk's Lua has no HMAC), a new id each.
secret=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
target_secret=$secret  # the gateway signs its deliveries with it
cat > "$dir/gateway.toml" <<TOML
[gateway]
listen = "127.0.0.1:0"
store = "sqlite:$dir/gateway.db"
admin_token = "bench-admin-token"
log_level = "warn"
[[target]]
name = "billing"
url = "$up/hooks/billing"
secret = "$target_secret"
timeout_ms = 5000
[[endpoint]]
name = "psp"
path = "/in/psp"
secrets = ["$secret"]
targets = ["billing"]
TOML
"$converge" gateway --config "$dir/gateway.toml" --port-file "$dir/gateway.port" \
  > "$dir/gateway.log" 2>&1 &
pids+=($!)
gateway="http://127.0.0.1:$(wait_port_file "$dir/gateway.port")"
deliveries=$((secs * 20000))  # more than the intake can take: every id new
echo "  signing $deliveries deliveries..." >&2
python3 - "$secret" "$deliveries" "$dir/signed.txt" <<'PY'
import base64, hashlib, hmac, sys, time
secret, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
key = base64.b64decode(secret[len("whsec_"):])
ts = int(time.time())
with open(out, "w") as f:
    for i in range(n):
        msg_id = "msg_%d" % i
        body = '{"type":"charge.succeeded","data":{"id":"ch_%d"}}' % i
        mac = hmac.new(key, ("%s.%d.%s" % (msg_id, ts, body)).encode(), hashlib.sha256)
        f.write("%s %d v1,%s %s\n" % (msg_id, ts, base64.b64encode(mac.digest()).decode(), body))
PY
cat > "$dir/intake.lua" <<LUA
local n = 0
function setup(thread) n = n + 1; thread:set("tid", n) end
function init(args)
  lines = {}
  local i = 0
  for line in io.lines("$dir/signed.txt") do
    if i % 2 == tid - 1 then lines[#lines + 1] = line end
    i = i + 1
  end
  seq = 0
end
function request()
  seq = seq + 1
  local id, ts, sig, body = lines[(seq - 1) % #lines + 1]:match("^(%S+) (%S+) (%S+) (.*)$")
  return wrk.format("POST", "/in/psp", {["Content-Type"] = "application/json",
    ["webhook-id"] = id, ["webhook-timestamp"] = ts, ["webhook-signature"] = sig}, body)
end
LUA
hooks_before=$(curl -s "$up/count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["hooks"])')
start=$(date +%s.%N)
run intake -s "$dir/intake.lua" "$gateway"
accepted=$(python3 - "$dir/intake.out" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
total = int(re.search(r"(\d+) requests in", text).group(1))
m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
print(total - (int(m.group(1)) if m else 0))
PY
)
unique=$(( accepted < deliveries ? accepted : deliveries ))
echo "  waiting for the gateway to deliver $unique deliveries..." >&2
delivered=0
for _ in $(seq 1 1200); do
  delivered=$(( $(curl -s "$up/count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["hooks"])') - hooks_before ))
  [ "$delivered" -ge "$unique" ] && break
  sleep 0.25
done
drained=$(date +%s.%N)
drain_rate=$(python3 -c "print('%.0f' % ($delivered / ($drained - $start)))")

echo "proxy and gateway over HTTP/1.1 keep-alive: wrk -t2 -c$conns -d${secs}s, SQLite synchronous=FULL"
printf "  %-8s %12s %10s %10s %8s\n" mode "requests/s" p50 p99 non-2xx
while read -r name rps p50 p99 non2xx; do
  printf "  %-8s %12s %10s %10s %8s\n" "$name" "$rps" "$p50" "$p99" "$non2xx"
done < "$dir/results"
python3 - "$dir/results" <<'PY'
import sys
def ms(v):  # wrk prints 1.23ms, 456.00us, 1.02s
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if v.endswith(unit):
            return float(v[:-len(unit)]) * f
    return float(v)
r = {}
for line in open(sys.argv[1]):
    name, rps, p50, p99, _ = line.split()
    r[name] = (float(rps), ms(p50), ms(p99))
d = r["direct"]
for name in ("pass", "replay", "create"):
    x = r[name]
    print("  %-7s / direct = %.2f   added latency p50 %+.2f ms, p99 %+.2f ms"
          % (name, x[0] / d[0], x[1] - d[1], x[2] - d[2]))
PY
echo "  gateway: $accepted deliveries accepted ($unique distinct ids), $delivered delivered;" \
  "intake to last delivery: $drain_rate deliveries/s"
