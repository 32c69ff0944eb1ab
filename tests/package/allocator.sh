#!/usr/bin/env bash
# The programs run on the allocator the build chose (CONVERGE_MALLOC): each program's
# calls to malloc, its own and the C library's, are bound by the dynamic loader to
# tcmalloc's; for 'system', to another (the C library's, or a sanitizer's).
#   allocator.sh tcmalloc|system PROGRAM...
set -euo pipefail
want=$1
shift
status=0
for program in "$@"; do
  # The loader reports each binding of malloc; the first names whose malloc it is.
  log=$(LD_DEBUG=bindings "$program" --help 2>&1 >/dev/null || true)
  bound=$(grep -m1 "normal symbol \`malloc'" <<< "$log" | sed -n 's/.* to \([^ ]*\) .*/\1/p' ||
          true)
  case "$want:$bound" in
    tcmalloc:*libtcmalloc*) ok=1 ;;
    system:*libtcmalloc*) ok=0 ;;
    system:?*) ok=1 ;;
    *) ok=0 ;;
  esac
  if [ $ok = 1 ]; then
    echo "ok: $(basename "$program") allocates with $(basename "$bound")"
  else
    echo "FAIL: $(basename "$program") allocates with '${bound:-?}', not $want" >&2
    status=1
  fi
done
exit $status
