#!/usr/bin/env bash
# `converge proxy` refuses each bad configuration with exit 2 and a message naming what is
# wrong, before it listens or touches a store.
#
#   tests/cli/proxy_config.sh CONVERGE_BINARY
set -uo pipefail
bin=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
failures=0

route=$'[[route]]\nmethod = "POST"\npath = "/v1/charges"\n'
check() {  # check NAME EXPECTED_MESSAGE CONFIG
  printf '%s' "$3" > "$dir/$1.toml"
  out=$("$bin" proxy --config "$dir/$1.toml" --listen 127.0.0.1:0 2>&1)
  rc=$?
  if [ "$rc" -ne 2 ] || [[ "$out" != *"$2"* ]]; then
    echo "FAIL $1: exit $rc, said: $out (wanted exit 2 and: $2)"
    failures=$((failures + 1))
  else
    echo "ok   $1: $out"
  fi
}

check no_upstream "proxy.upstream is required" $'[proxy]\n'"$route"
check unknown_key "unknown key 'proxy.upstrem'" $'[proxy]\nupstrem = "http://x"\n'"$route"
check bad_url "must be an http:// or https:// URL" $'[proxy]\nupstream = "ftp://x"\n'"$route"
check bad_scope "proxy.scope must be" $'[proxy]\nupstream = "http://x"\nscope = "cookie"\n'"$route"
check no_routes "no [[route]]" $'[proxy]\nupstream = "http://x"\n'
check bad_key_mode "route.key must be" \
  $'[proxy]\nupstream = "http://x"\n[[route]]\nmethod = "POST"\npath = "/a"\nkey = "maybe"\n'
check lease_too_short "must exceed the upstream timeout" \
  $'[proxy]\nupstream = "http://x"\nupstream_timeout_ms = 5000\n[keys]\nlease_seconds = 2\n'"$route"
check stored_5xx "proxy.stored_statuses must be" \
  $'[proxy]\nupstream = "http://x"\nstored_statuses = [500]\n'"$route"
# The lease starts before the request goes upstream: a lease just over the timeout is short.
check lease_no_margin "by at least 1000 ms" \
  $'[proxy]\nupstream = "http://x"\nupstream_timeout_ms = 9999\n[keys]\nlease_seconds = 10\n'"$route"
check redirect_no_location "replay_headers must list Location" \
  $'[proxy]\nupstream = "http://x"\nstored_statuses = [303]\nreplay_headers = ["ETag"]\n'"$route"
check toml_syntax "at line" $'[proxy\n'

[ "$failures" -eq 0 ] && echo "11 passed, 0 failed" || { echo "$failures failed"; exit 1; }
