#!/usr/bin/env bash
# Lints docs/openapi.yaml with Redocly CLI's recommended rules (redocly.yaml at the root
# of the repo says which rule is off, and why): structural errors, operations without
# `security` (public endpoints declare `security: []`), missing operationIds, and so on.
#
#   tests/docs/openapi_lint.sh SOURCE_DIR TOOLS_DIR
#
# Redocly CLI comes from the npm registry, pinned, installed once into TOOLS_DIR (the
# build tree's tools/). It needs Node.js >= 20.19: on an older Node the test is skipped
# (exit 77) with the reason, never passed.
set -euo pipefail

source_dir=$1
tools_dir=$2
version=2.77.0

if ! command -v node > /dev/null || ! command -v npm > /dev/null; then
  echo "openapi_lint: node and npm are needed (scripts/install-deps.sh installs them)" >&2
  exit 1
fi
node_version=$(node -p 'process.versions.node')
if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number);
              process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)'; then
  echo "openapi_lint: skipped: Redocly CLI $version needs Node.js >= 20.19; this is $node_version"
  exit 77
fi

redocly=$tools_dir/node_modules/.bin/redocly
if [ ! -x "$redocly" ] || [ "$("$redocly" --version 2> /dev/null)" != "$version" ]; then
  echo "openapi_lint: installing @redocly/cli@$version into $tools_dir"
  mkdir -p "$tools_dir"
  npm install --no-audit --no-fund --loglevel=error --prefix "$tools_dir" \
    "@redocly/cli@$version" > /dev/null
fi

# No telemetry and no update checks: the only network this needs is the npm registry.
export REDOCLY_TELEMETRY=off REDOCLY_SUPPRESS_UPDATE_NOTICE=true NO_UPDATE_NOTIFIER=1
cd "$source_dir"
# The filter only drops Redocly's Node 20 end-of-life banner; the verdict is lint's own.
set +o pipefail
"$redocly" lint --config redocly.yaml --format=stylish docs/openapi.yaml 2>&1 | grep -v '[║╔╚]'
exit "${PIPESTATUS[0]}"
