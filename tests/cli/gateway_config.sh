#!/usr/bin/env bash
# `converge gateway` refuses each bad configuration with exit 2 and a message naming what is
# wrong, before it listens or touches a store.
#
#   tests/cli/gateway_config.sh CONVERGE_BINARY
set -uo pipefail
bin=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
failures=0
passed=0

gw=$'[gateway]\nadmin_token = "an-admin-token"\n'
target=$'[[target]]\nname = "t"\nurl = "http://127.0.0.1:9/h"\n'
target+=$'secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"\n'
sender=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
endpoint=$'[[endpoint]]\nname = "e"\npath = "/in"\nsecrets = ["'$sender$'"]\ntargets = ["t"]\n'
check() {  # check NAME EXPECTED_MESSAGE CONFIG
  printf '%s' "$3" > "$dir/$1.toml"
  out=$(CONVERGE_ADMIN_TOKEN= "$bin" gateway --config "$dir/$1.toml" --listen 127.0.0.1:0 2>&1)
  rc=$?
  if [ "$rc" -ne 2 ] || [[ "$out" != *"$2"* ]]; then
    echo "FAIL $1: exit $rc, said: $out (wanted exit 2 and: $2)"
    failures=$((failures + 1))
  else
    echo "ok   $1: $out"
    passed=$((passed + 1))
  fi
}

check no_endpoint "no [[endpoint]]" "$gw$target"
check short_token "must be at least 8 characters" $'[gateway]\nadmin_token = "x"\n'"$target$endpoint"
check unknown_target "names unknown target 'u'" \
  "$gw$target"$'[[endpoint]]\nname = "e"\npath = "/in"\nsecrets = ["'$sender$'"]\ntargets = ["u"]\n'
check bad_scheme "endpoint.scheme must be" "$gw$target$endpoint"$'scheme = "paypal"\n'
check bad_subject "endpoint.subject must be a JSON pointer" "$gw$target$endpoint"$'subject = "data.id"\n'
check ordered_not_bool "target.ordered must be true or false" "$gw$target"$'ordered = "yes"\n'"$endpoint"
check concurrency_range "target.concurrency must be between 1 and 64" \
  "$gw$target"$'concurrency = 0\n'"$endpoint"
check bad_secret "secret must be a whsec_<base64> secret" \
  "$gw"$'[[target]]\nname = "t"\nurl = "http://127.0.0.1:9/h"\nsecret = "plain"\n'"$endpoint"
# One bad secret in a rotation list would make the verifier refuse every delivery.
check bad_endpoint_secret "endpoint 'e': secret 2 of 2: webhook secret is not whsec_<base64>" \
  "$gw$target"$'[[endpoint]]\nname = "e"\npath = "/in"\nsecrets = ["'$sender$'", "whsec_!"]\ntargets = ["t"]\n'
check lease_le_timeout "lease_ms must exceed timeout_ms" \
  "$gw$target"$'timeout_ms = 5000\nlease_ms = 5000\n'"$endpoint"
# A delivery verifies for twice its tolerance: a shorter dedupe TTL lets a replay through.
check ttl_le_tolerance "must exceed twice tolerance_seconds" \
  "$gw"$'dedupe_ttl_hours = 1\n'"$target$endpoint"$'tolerance_seconds = 1800\n'
check bad_target_name "target name 'a:b' must be" \
  "$gw"$'[[target]]\nname = "a:b"\nurl = "http://127.0.0.1:9/h"\nsecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"\n'"$endpoint"
check unknown_key "unknown key 'target.oredered'" "$gw$target"$'oredered = true\n'"$endpoint"
# Secrets from the environment and from files: each source that cannot give one is named.
target_head=$'[[target]]\nname = "t"\nurl = "http://127.0.0.1:9/h"\n'
check secret_env_unset "target.secret_env: the environment variable 'CONVERGE_TEST_UNSET' is not set" \
  "$gw$target_head"$'secret_env = "CONVERGE_TEST_UNSET"\n'"$endpoint"
check secret_file_missing "target.secret_file: '$dir/missing': No such file or directory" \
  "$gw$target_head"$'secret_file = "'"$dir"$'/missing"\n'"$endpoint"
: > "$dir/empty.secret"
check secret_file_empty "target.secret_file: '$dir/empty.secret' is empty" \
  "$gw$target_head"$'secret_file = "'"$dir"$'/empty.secret"\n'"$endpoint"
check secret_file_directory "target.secret_file: '$dir' is not a regular file" \
  "$gw$target_head"$'secret_file = "'"$dir"$'"\n'"$endpoint"
mkfifo "$dir/fifo"
check secret_file_fifo "target.secret_file: '$dir/fifo' is not a regular file" \
  "$gw$target_head"$'secret_file = "'"$dir"$'/fifo"\n'"$endpoint"
# What is read but likely not the secret meant is refused, and the secret is not shown.
printf '%s \n' "$sender" > "$dir/spaced.secret"
check secret_file_spaced "'$dir/spaced.secret' begins or ends with a space (the secret is not shown)" \
  "$gw$target_head"$'secret_file = "'"$dir"$'/spaced.secret"\n'"$endpoint"
printf '%s\n%s\n' "$sender" "$sender" > "$dir/two.secret"
check secret_file_two_lines "'$dir/two.secret' holds a control character" \
  "$gw$target_head"$'secret_file = "'"$dir"$'/two.secret"\n'"$endpoint"
# A secret put under the _env or _file key by mistake is not echoed.
check secret_env_holds_a_secret "target.secret_env: the environment variable named (not shown" \
  "$gw$target_head"$'secret_env = "'"$sender"$'"\n'"$endpoint"
check secret_env_not_a_name "target.secret_env must name an environment variable" \
  "$gw$target_head"$'secret_env = "whsec_a+b/c="\n'"$endpoint"
check secret_file_holds_a_secret "target.secret_file: the file named (not shown" \
  "$gw$target_head"$'secret_file = "'"$sender"$'"\n'"$endpoint"
for name in secret_env_holds_a_secret secret_env_not_a_name secret_file_holds_a_secret; do
  if CONVERGE_ADMIN_TOKEN= "$bin" gateway --config "$dir/$name.toml" --listen 127.0.0.1:0 2>&1 |
      grep -q -e "${sender#whsec_}" -e "a+b/c="; then
    echo "FAIL $name: the error shows the secret"
    failures=$((failures + 1))
  fi
done
check secret_twice "target.secret and target.secret_env both give the secret; keep one" \
  "$gw$target"$'secret_env = "HOME"\n'"$endpoint"
printf '%s\n' "$sender" > "$dir/sender.secret"
printf 'not-a-whsec\n' > "$dir/plain.secret"
endpoint_head=$'[[endpoint]]\nname = "e"\npath = "/in"\ntargets = ["t"]\n'
check secrets_file_checked "endpoint 'e': secret 2 of 2: webhook secret is not whsec_<base64>" \
  "$gw$target$endpoint_head"$'secrets_file = ["'"$dir"$'/sender.secret", "'"$dir"$'/plain.secret"]\n'
check secrets_env_unset \
  "endpoint.secrets_env: the environment variable 'CONVERGE_TEST_UNSET' is not set" \
  "$gw$target$endpoint_head"$'secrets_env = ["CONVERGE_TEST_UNSET"]\n'
check admin_token_file_missing "gateway.admin_token_file: '$dir/none': No such file or directory" \
  $'[gateway]\nadmin_token_file = "'"$dir"$'/none"\n'"$target$endpoint"

if [ "$failures" -eq 0 ]; then echo "$passed passed, 0 failed"; else echo "$failures failed"; exit 1; fi
