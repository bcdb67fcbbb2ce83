#!/usr/bin/env bash
# The dynamic symbols libairmoe_c defines must be exactly the functions
# airmoe.h declares (AIRMOE_API): no libstdc++ template, no symbol of the
# static airmoe libraries (docs/c_api.md promises only airmoe_*), and none of
# the C API missing. Prints the exported symbols.
# Usage: scripts/check_capi_exports.sh LIBAIRMOE_C AIRMOE_H [NM]
set -euo pipefail
lib="${1:?usage: check_capi_exports.sh LIBAIRMOE_C AIRMOE_H [NM]}"
header="${2:?usage: check_capi_exports.sh LIBAIRMOE_C AIRMOE_H [NM]}"
nm="${3:-nm}"

exported=$("$nm" -D --defined-only "$lib" | awk '{print $NF}' | sort -u)
declared=$(grep -o 'AIRMOE_API[^(]*(' "$header" | grep -o 'airmoe_[a-z_0-9]*($' | tr -d '(' |
  sort -u)
echo "exported by $(basename "$lib"):"
echo "$exported" | sed 's/^/  /'
status=0
foreign=$(echo "$exported" | grep -v '^airmoe_' || true)
if [ -n "$foreign" ]; then
  echo "FAIL: exported, not airmoe_*:" >&2
  echo "$foreign" | sed 's/^/  /' >&2
  status=1
fi
missing=$(comm -23 <(echo "$declared") <(echo "$exported"))
if [ -n "$missing" ]; then
  echo "FAIL: declared in $(basename "$header"), not exported:" >&2
  echo "$missing" | sed 's/^/  /' >&2
  status=1
fi
undeclared=$(comm -13 <(echo "$declared") <(echo "$exported") | grep '^airmoe_' || true)
if [ -n "$undeclared" ]; then
  echo "FAIL: exported, not declared in $(basename "$header"):" >&2
  echo "$undeclared" | sed 's/^/  /' >&2
  status=1
fi
[ "$status" -ne 0 ] || echo "$(echo "$declared" | wc -l) functions of $(basename "$header"), nothing else"
exit "$status"
