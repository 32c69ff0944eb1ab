#!/usr/bin/env bash
# Fails, naming each, on C++ source lines longer than 100 columns (.clang-format's limit).
#
#   tests/docs/line_length.sh SOURCE_DIR
set -euo pipefail
cd "$1"
long=$(find apps bench examples fuzz harness include src tests -name '*.cc' -o -name '*.h' \
  | sort | xargs awk 'length > 100 { print FILENAME ":" FNR ": " length " columns" }')
if [ -n "$long" ]; then
  echo "line_length: lines over 100 columns (clang-format --lines=N:N -i FILE fixes one):"
  echo "$long"
  exit 1
fi
echo "line_length: every C++ line is at most 100 columns"
