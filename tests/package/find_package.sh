#!/usr/bin/env bash
# Installs the built tree into a throwaway prefix, then configures, builds and runs the
# embedding example as an outside project that only does find_package(converge).
set -euo pipefail
build="$1"
example="$2"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cmake --install "$build" --prefix "$dir/prefix" > "$dir/install.log"
cmake -S "$example" -B "$dir/build" -DCMAKE_PREFIX_PATH="$dir/prefix" > "$dir/configure.log" \
  || { cat "$dir/configure.log"; exit 1; }
cmake --build "$dir/build" -j 2 > "$dir/build.log" || { cat "$dir/build.log"; exit 1; }
"$dir/build/embed" "$dir/embed.db"
