# Shared by bench/http_bench.sh and bench/modes_bench.sh; source it after setting `name`
# (for messages), `secs` and `conns`. Gives: $dir (a temporary directory, removed on exit
# with every process whose pid is in `pids`), wait_port_file FILE (prints the port a
# process wrote there), and run NAME WRK_ARGS... (one wrk run; appends "name requests/s
# p50 p99 non-2xx" to $dir/results).
command -v wrk >/dev/null || { echo "$name: wrk is not installed (scripts/install-deps.sh)"; exit 1; }

dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

wait_port_file() {
  for _ in $(seq 1 200); do [ -s "$1" ] && { cat "$1"; return; }; sleep 0.05; done
  echo "$name: $1 never appeared" >&2; exit 1
}

run() {  # name, wrk args...
  local run_name="$1"; shift
  echo "  running $run_name for ${secs}s with $conns connections..." >&2
  wrk -t2 -c"$conns" -d"${secs}s" --latency "$@" > "$dir/$run_name.out" 2>&1
  local rps p50 p99 non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' "$dir/$run_name.out")
  p50=$(awk '$1 == "50%" {print $2}' "$dir/$run_name.out")
  p99=$(awk '$1 == "99%" {print $2}' "$dir/$run_name.out")
  non2xx=$(awk '/Non-2xx/ {print $5}' "$dir/$run_name.out")
  printf "%s %s %s %s %s\n" "$run_name" "$rps" "$p50" "$p99" "${non2xx:-0}" >> "$dir/results"
}
