#!/usr/bin/env bash
# Throwaway nats-server processes with JetStream, for tests and benchmarks: each node
# listens on 127.0.0.1 at free ports (client, monitoring, and routes for a cluster), stores
# in its own directory under DIR, and is started in the background. `start` returns once
# every node answers /healthz; `stop` kills every node by the PID it recorded.
#
#   scripts/nats-server.sh start DIR [NODES]   NODES=1 (default): one server; 3: a cluster
#   scripts/nats-server.sh stop DIR            kill -9 every node, then remove DIR
#   scripts/nats-server.sh kill DIR N          kill -9 node N (1-based), keep its store
#   scripts/nats-server.sh restart DIR N       start node N again, same ports and store
#   scripts/nats-server.sh restart DIR N alone the same, when no other node is running: its
#                                              JetStream is only waited for to be enabled
#                                              (it has no meta leader: it leaves requests
#                                              unanswered, and after 10 s answers them
#                                              "temporarily unavailable")
#
# `start` writes DIR/env (sourceable):
#   CONVERGE_TEST_NATS_URL   the client URLs, comma separated (nats://127.0.0.1:PORT,...)
#   CONVERGE_TEST_NATS_DIR   DIR
#   CONVERGE_TEST_NATS_NODES the number of nodes
# and for each node N: DIR/nN/{pid,port,http_port,cmd,server.log,store/}.
set -euo pipefail
usage() {
  echo "usage: $0 start DIR [NODES] | stop DIR | kill DIR N | restart DIR N [alone]" >&2
  exit 2
}
[ $# -ge 2 ] || usage
op=$1
dir=$2

command -v nats-server > /dev/null ||
  { echo "nats-server.sh: no nats-server (run scripts/install-deps.sh)" >&2; exit 1; }

# Below the kernel's ephemeral ports: scripts/free-port.py.
free_port() {
  python3 "$(dirname "$0")/free-port.py"
}

# Waits until node $1 answers /healthz (JetStream included), up to 60 s. $2: a query for
# /healthz: a restarted node is waited for with js-server-only=true (its JetStream is
# running), not for every replica of every stream and consumer to be current: nats-server
# 2.9.10 once kept an idle consumer's replica "not current" on a restarted node for over
# a minute while the cluster went on serving it.
# The answer must be our node's (its server_name, unique to this directory): a server of
# another test that took the monitoring port first is not ours, and ours exits then.
wait_healthy() {
  local n=$1 query=${2:-} http_port name varz
  http_port=$(cat "$dir/n$n/http_port")
  name=$(cat "$dir/n$n/name")
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$http_port/healthz$query" > /dev/null 2>&1; then
      varz=$(curl -sf "http://127.0.0.1:$http_port/varz" 2> /dev/null || true)
      [[ "$varz" =~ \"server_name\":[[:space:]]*\"$name\" ]] && return 0
    fi
    if ! kill -0 "$(cat "$dir/n$n/pid")" 2> /dev/null; then
      echo "nats-server.sh: node $n exited; its log:" >&2
      cat "$dir/n$n/server.log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "nats-server.sh: node $n not healthy after 60 s; its log:" >&2
  cat "$dir/n$n/server.log" >&2
  return 1
}

start_node() {
  local n=$1
  # shellcheck disable=SC2046
  setsid $(cat "$dir/n$n/cmd") >> "$dir/n$n/server.log" 2>&1 < /dev/null &
  echo $! > "$dir/n$n/pid"
}

case "$op" in
  start)
    nodes=${3:-1}
    [[ "$nodes" =~ ^[1-9]$ ]] ||
      { echo "nats-server.sh: NODES must be 1..9, got '$nodes'" >&2; exit 2; }
    mkdir -p "$dir"
    # A free port is only free when it is picked: another process (a test running beside
    # this one) may bind it before nats-server does. Then the node exits with "address
    # already in use", and the whole start is tried again on other ports.
    for attempt in 1 2 3 4 5; do
      urls=()
      cluster_ports=()
      for n in $(seq 1 "$nodes"); do
        rm -rf "$dir/n$n"
        mkdir -p "$dir/n$n/store"
        free_port > "$dir/n$n/port"
        free_port > "$dir/n$n/http_port"
        echo "n$n-$(basename "$dir" | tr -c 'A-Za-z0-9\n' '-')" > "$dir/n$n/name"
        urls+=("nats://127.0.0.1:$(cat "$dir/n$n/port")")
        cluster_ports+=("$(free_port)")
      done
      for n in $(seq 1 "$nodes"); do
        cmd="nats-server -js -a 127.0.0.1 -p $(cat "$dir/n$n/port")"
        cmd+=" -m $(cat "$dir/n$n/http_port") -sd $dir/n$n/store --server_name $(cat "$dir/n$n/name")"
        if [ "$nodes" -gt 1 ]; then
          routes=""
          for m in $(seq 1 "$nodes"); do
            [ "$m" = "$n" ] && continue
            routes+="${routes:+,}nats://127.0.0.1:${cluster_ports[$((m - 1))]}"
          done
          cmd+=" --cluster_name converge-test"
          cmd+=" --cluster nats://127.0.0.1:${cluster_ports[$((n - 1))]} --routes $routes"
        fi
        echo "$cmd" > "$dir/n$n/cmd"
        start_node "$n"
      done
      healthy=1
      for n in $(seq 1 "$nodes"); do
        if ! wait_healthy "$n" 2> "$dir/unhealthy.log"; then healthy=0; break; fi
      done
      [ "$healthy" = 1 ] && break
      for p in "$dir"/n*/pid; do kill -9 "$(cat "$p")" 2> /dev/null || true; done
      if [ "$attempt" -lt 5 ] && grep -q "address already in use" "$dir"/n*/server.log; then
        echo "nats-server.sh: a port was taken before nats-server bound it;" \
          "starting again on other ports (attempt $((attempt + 1)) of 5)" >&2
        for p in "$dir"/n*/pid; do
          while kill -0 "$(cat "$p")" 2> /dev/null; do sleep 0.05; done
        done
        continue
      fi
      cat "$dir/unhealthy.log" >&2
      exit 1
    done
    rm -f "$dir/unhealthy.log"
    {
      echo "CONVERGE_TEST_NATS_URL=$(IFS=,; echo "${urls[*]}")"
      echo "CONVERGE_TEST_NATS_DIR=$dir"
      echo "CONVERGE_TEST_NATS_NODES=$nodes"
    } > "$dir/env"
    echo "nats-server.sh: $nodes node(s) healthy: $(IFS=,; echo "${urls[*]}")" >&2
    ;;
  stop)
    for p in "$dir"/n*/pid; do
      [ -f "$p" ] && kill -9 "$(cat "$p")" 2> /dev/null || true
    done
    rm -rf "$dir"
    ;;
  kill)
    [ $# -eq 3 ] || usage
    pid=$(cat "$dir/n$3/pid" 2> /dev/null || true)
    [ -n "$pid" ] && { kill -9 "$pid" 2> /dev/null || true; }
    # Wait until it is gone, so a restart can bind its ports again. A zombie is gone for
    # that (it holds no socket or lock): the node was started by a shell that has exited,
    # and whoever adopted it may reap it a second or two later.
    while [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null; do
      case "$(ps -o stat= -p "$pid" 2> /dev/null || true)" in *Z*) break ;; esac
      sleep 0.05
    done
    ;;
  restart)
    [ $# -eq 3 ] || { [ $# -eq 4 ] && [ "$4" = alone ]; } || usage
    start_node "$3"
    if [ $# -eq 4 ]; then
      wait_healthy "$3" "?js-enabled-only=true"
    else
      wait_healthy "$3" "?js-server-only=true"
    fi
    ;;
  *) usage ;;
esac
