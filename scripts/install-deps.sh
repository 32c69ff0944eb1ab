#!/usr/bin/env bash
# Installs every Debian package converge needs to build, test and benchmark.
# Idempotent: packages already present are left alone; `apt-get update` runs only when
# something is missing. Must run as root (or with sudo available).
#
#   --fuzz   also clang and libFuzzer, for `make fuzz` (not needed by `make test`, whose
#            fuzz.* tests run the seed corpora built with g++)
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libsqlite3-dev libssl-dev libexpected-dev nlohmann-json3-dev
  libcli11-dev libspdlog-dev libtomlplusplus-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libboost-dev libcurl4-openssl-dev wrk
  libpq-dev postgresql postgresql-contrib python3
  nats-server libnats-dev prometheus gnuplot-nox curl
  libtcmalloc-minimal4
)
# The NATS interop test runs the `nats` npm package on Node: Debian's nodejs and npm,
# unless a Node with npm is installed already (from another source).
if ! command -v npm > /dev/null 2>&1; then packages+=(nodejs npm); fi

# Node.js and npm run the OpenAPI linter (tests/docs/openapi_lint.sh, Redocly CLI from the
# npm registry). A Node installed otherwise (e.g. NodeSource's, which bundles npm) is kept.
if ! command -v node > /dev/null; then packages+=(nodejs); fi
if ! command -v npm > /dev/null; then packages+=(npm); fi

for arg in "$@"; do
  case "$arg" in
    --fuzz) packages+=(clang libfuzzer-14-dev) ;;
    *) echo "install-deps: unknown option $arg (known: --fuzz)" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-deps: done"
