#!/usr/bin/env bash
# Runs fuzz targets under libFuzzer, one after the other, each for a fixed time: the body
# of `make fuzz` (docs/design/chaos.md, "Fuzzing").
#
#   scripts/run-fuzz.sh BUILD_DIR SECONDS [TARGET...]     (default: every target)
#
# BUILD_DIR was configured with CONVERGE_FUZZ=ON. Each target starts from its committed
# seeds (fuzz/corpus/<name>/, never written to) plus what earlier runs found
# (BUILD_DIR/corpus/<name>/, where new inputs go); a failing input is written to
# BUILD_DIR/crashes/<name>/. The log of each run is BUILD_DIR/fuzz-<name>.log; the
# summary at the end gives executions and rate per target. Exits 1 when any target failed.
# FUZZ_ARGS adds libFuzzer flags to every run (e.g. FUZZ_ARGS=-jobs=2).
set -uo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 BUILD_DIR SECONDS [TARGET...]" >&2
  exit 2
fi
build=$1
seconds=$2
shift 2
src=$(cd "$(dirname "$0")/.." && pwd)
all=(idempotency_key fingerprint webhook envelope failpoint config payment_request psp_event store_uri
     http_request payment_body)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then targets=("${all[@]}"); fi

# Inputs longer than the default 4 KiB reach the HTTP limits (a 1 KiB header, a 512-byte
# body) several times over.
declare -A max_len=([http_request]=8192)
# Targets whose harness runs threads (a server, SQLite's writer): their allocations and
# frees do not pair up within one input, so libFuzzer's leak check after such an input (the
# input run again, then a LeakSanitizer scan of the whole process with its threads stopped)
# runs again and again, until libFuzzer gives up on it after 1,000 of them. It made
# payment_body 3.5 times slower (docs/design/chaos.md, "Results"). Leaks are still checked
# when the process exits (ASAN_OPTIONS below).
declare -A per_input_leaks=([store_uri]=0 [http_request]=0 [payment_body]=0)
declare -A dict=([fingerprint]=json [envelope]=json [payment_body]=json [payment_request]=json
                 [psp_event]=json
                 [http_request]=http_request [config]=config [failpoint]=failpoint
                 [webhook]=webhook [store_uri]=store_uri)

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}

failed=()
summary=()
for t in "${targets[@]}"; do
  bin=$build/fuzz/${t}_fuzz
  if [ ! -x "$bin" ]; then
    echo "run-fuzz: $bin is missing (build the target converge_fuzzers)" >&2
    failed+=("$t")
    continue
  fi
  work=$build/corpus/$t
  crashes=$build/crashes/$t
  log=$build/fuzz-$t.log
  mkdir -p "$work" "$crashes"
  args=(-max_total_time="$seconds" -timeout=60 -print_final_stats=1
        -artifact_prefix="$crashes/")
  if [ -n "${max_len[$t]:-}" ]; then args+=(-max_len="${max_len[$t]}"); fi
  if [ -n "${per_input_leaks[$t]:-}" ]; then args+=(-detect_leaks="${per_input_leaks[$t]}"); fi
  if [ -n "${dict[$t]:-}" ]; then args+=(-dict="$src/fuzz/dict/${dict[$t]}.dict"); fi
  # shellcheck disable=SC2206 # FUZZ_ARGS is a list of flags
  args+=(${FUZZ_ARGS:-})
  echo "== fuzz $t for ${seconds}s (log: $log)"
  # Progress: libFuzzer's periodic and final lines, not every new input.
  "$bin" "${args[@]}" "$work" "$src/fuzz/corpus/$t" 2>&1 | tee "$log" |
    grep --line-buffered -E 'INITED|pulse|DONE|ERROR|property failed|SUMMARY|Test unit written'
  rc=${PIPESTATUS[0]}
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  # With -fork=N the parent prints "#EXECS: cov: ... time: SECONDSs job: ..." after each
  # child's job, and the stat:: lines above, if any, are one child's: count the parent's.
  fork_line=$(grep -E '^#[0-9]+: cov:' "$log" | tail -1)
  if [ -n "$fork_line" ]; then
    execs=$(sed -E 's/^#([0-9]+):.*/\1/' <<<"$fork_line")
    fork_secs=$(sed -E 's/.* time: ([0-9]+)s.*/\1/' <<<"$fork_line")
    rate=$(( execs / (fork_secs > 0 ? fork_secs : 1) ))
  fi
  status=ok
  if [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc; inputs in $crashes)"
    failed+=("$t")
  fi
  summary+=("$(printf '%-16s %12s execs %8s/s  %s' "$t" "${execs:-?}" "${rate:-?}" "$status")")
done

echo "== fuzz summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -ne 0 ]; then
  echo "run-fuzz: failed: ${failed[*]}" >&2
  exit 1
fi
