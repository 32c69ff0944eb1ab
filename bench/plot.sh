#!/usr/bin/env bash
# Renders the JSON results of `make bench` as SVG plots with gnuplot (Debian gnuplot-nox):
#
#   sqlite_throughput.svg  group commit creates/s against callers (median, min..max of the
#                          rounds), with serial and the raw-sqlite3 ceilings r1, r2 and r3
#                          as lines (r2 at the batch the --callers run reached, r3 at
#                          --callers)
#   sqlite_latency.svg     histogram of the group-commit creates' latencies (last round)
#   pg_creates.svg         converge, pgbench and pgbench pipelined, creates/s (median,
#                          min..max), when the PostgreSQL results exist
#   scale.svg              the scale benchmark's create rates on the loaded store (alone,
#                          sweeper paced, sweeper flat out; on SQLite also raw sqlite3's
#                          own) over the empty store's, per store, against the 0.8
#                          target, when scale_*.json exist
#
#   bench/plot.sh RESULTS_DIR OUT_DIR
#   RESULTS_DIR holds sqlite.json (converge_bench --json) and optionally pg.json
#   (bench/pg_bench.sh ... JSON_OUT) and scale_sqlite.json, scale_postgresql.json
#   (bench/scale_bench.sh ... JSON_DIR).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 RESULTS_DIR OUT_DIR" >&2; exit 2; }
results="$1"
out="$2"
command -v gnuplot > /dev/null \
  || { echo "plot: gnuplot is not installed (gnuplot-nox)" >&2; exit 1; }
[ -f "$results/sqlite.json" ] || { echo "plot: $results/sqlite.json is missing" >&2; exit 1; }
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# JSON to gnuplot's columns: one file per series.
python3 - "$results" "$tmp" <<'PY'
import json, os, statistics, sys
results, tmp = sys.argv[1], sys.argv[2]
s = json.load(open(os.path.join(results, "sqlite.json")))
def row(v):
    return "%g %g %g" % (statistics.median(v), min(v), max(v))
by_callers = {int(c): v for c, v in s["group_by_callers"].items()}
by_callers[s["callers"]] = s["group"]
with open(os.path.join(tmp, "group.dat"), "w") as f:
    for c in sorted(by_callers):
        f.write("%d %s\n" % (c, row(by_callers[c])))
with open(os.path.join(tmp, "lines.dat"), "w") as f:
    # r3 (raw behind the handoff) is absent from results older than 2026-12-02: 0 then.
    f.write("%g %g %g %g\n" % (statistics.median(s["serial"]), statistics.median(s["raw_one_tx"]),
                               statistics.median(s["raw_batched"]),
                               statistics.median(s.get("raw_handoff") or [0])))
with open(os.path.join(tmp, "meta.txt"), "w") as f:
    f.write("%s %d %.1f\n" % (s["synchronous"], s["callers"], statistics.median(s["avg_batch"])))
with open(os.path.join(tmp, "latency.dat"), "w") as f:
    for i, n in enumerate(s["group_latency_histogram_quarter_ms"]):
        f.write("%g %d\n" % (i / 4 + 0.125, n))
pg = os.path.join(results, "pg.json")
if os.path.exists(pg):
    p = json.load(open(pg))
    with open(os.path.join(tmp, "pg.dat"), "w") as f:
        for i, (name, key) in enumerate([("converge", "converge"), ("pgbench", "pgbench"),
                                         ("pgbench pipelined", "pgbench_pipelined")]):
            f.write('%d "%s" %s\n' % (i, name, row(p[key])))
scale = [(name, os.path.join(results, "scale_%s.json" % store))
         for name, store in [("SQLite", "sqlite"), ("PostgreSQL", "postgresql")]]
scale = [(name, json.load(open(path))) for name, path in scale if os.path.exists(path)]
if scale:
    with open(os.path.join(tmp, "scale.dat"), "w") as f:
        i = 0
        for name, j in scale:
            modes = [("alone", "loaded_over_empty"), ("paced sweep", "paced_over_empty"),
                     ("flat-out sweep", "swept_over_empty")]
            # SQLite's own: raw sqlite3, the same creates, at the empty store's batch on
            # both stores where the run measured that (since 2026-12-04), else at each's.
            for key in ["raw_loaded_over_empty_one_batch", "raw_loaded_over_empty"]:
                if key in j:
                    modes.append(("raw sqlite3", key))
                    break
            for mode, key in modes:
                f.write('%d "%s\\n%s" %s\n' % (i, name, mode, row(j[key])))
                i += 1
            i += 1
    rows = max(j["loaded_keys_end"] for _, j in scale)
    with open(os.path.join(tmp, "scale_meta.txt"), "w") as f:
        f.write("%.0fM %d\n" % (rows / 1e6, i - 1))
PY

read -r sync callers batch < "$tmp/meta.txt"
read -r serial r1 r2 r3 < "$tmp/lines.dat"
r3_line=""
if [ "$r3" != "0" ]; then
  r3_line="$r3 with lines dt 5 lw 2 title \"r3: raw sqlite3 behind the handoff, $callers callers\","
fi
gnuplot <<GP
set terminal svg size 800,480 dynamic font "sans,12"
set output "$out/sqlite_throughput.svg"
set title "SQLite idempotent creates, synchronous=$sync: group commit against raw sqlite3"
set xlabel "concurrent callers"
set ylabel "creates/s"
set logscale x 2
set yrange [0:$r1 * 1.45]
set key top left
set grid
plot "$tmp/group.dat" using 1:2:3:4 with yerrorlines lw 2 \
       title "group commit (median, min..max)", \
     $r1 with lines dt 2 lw 2 title "r1: raw sqlite3, one transaction", \
     $r2 with lines dt 3 lw 2 title "r2: raw sqlite3, $batch calls per commit", \
     $r3_line \
     $serial with lines dt 4 lw 2 title "serial: one commit per call"

set output "$out/sqlite_latency.svg"
set title "SQLite group commit, $callers callers: latency per create (last round)"
unset logscale x
set xlabel "milliseconds (0.25 ms buckets)"
set ylabel "creates (log scale)"
set style fill solid 0.6
set boxwidth 0.25
set logscale y
set xrange [0:*]
set yrange [0.8:*]
set key off
plot "$tmp/latency.dat" using 1:2 with boxes title "creates"
GP
echo "plot: wrote $out/sqlite_throughput.svg and $out/sqlite_latency.svg"

if [ -f "$tmp/pg.dat" ]; then
  gnuplot <<GP
set terminal svg size 720,420 dynamic font "sans,12"
set output "$out/pg_creates.svg"
set title "PostgreSQL 15, 64 callers, fsync on: idempotent creates"
set ylabel "creates/s (transactions/s)"
set yrange [0:*]
set xrange [-0.6:2.6]
set style fill solid 0.6
set boxwidth 0.6
set key off
set grid y
# Titles on every series, even with the key off: SVG keeps them, and the default would be
# the temporary file's path.
plot "$tmp/pg.dat" using 1:3:xtic(2) with boxes title "median", \
     "" using 1:3:4:5 with yerrorbars lc black pt 0 title "min..max"
GP
  echo "plot: wrote $out/pg_creates.svg"
fi

if [ -f "$tmp/scale.dat" ]; then
  read -r rows bars < "$tmp/scale_meta.txt"
  gnuplot <<GP
set terminal svg size 800,440 dynamic font "sans,12"
set output "$out/scale.svg"
set title "Creates on a store with ~$rows keys and inbox rows, over an empty store's rate"
set ylabel "loaded / empty creates (per round)"
set yrange [0:1.3]
set xrange [-0.6:$bars - 0.4]
set style fill solid 0.6
set boxwidth 0.7
set key top right
set grid y
plot "$tmp/scale.dat" using 1:3:xtic(2) with boxes title "median of the rounds", \
     "" using 1:3:4:5 with yerrorbars lc black pt 0 title "min..max", \
     0.8 with lines dt 2 lw 2 title "target 0.8"
GP
  echo "plot: wrote $out/scale.svg"
fi
