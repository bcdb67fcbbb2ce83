#!/usr/bin/env bash
# Installs a configured, built airmoe build tree into a fresh prefix and
# checks what it holds:
#  - `cmake --install BUILD --prefix P` writes nothing outside P: the tree is
#    staged with DESTDIR, so a file bound for an absolute path (the Python
#    package once went to the interpreter's dist-packages) shows up outside
#    the staged P instead of landing on this machine, and a file written
#    around DESTDIR shows up at P itself;
#  - the Python package (where the build has one) lies under P and imports
#    from there;
#  - consumer projects build against it (tests/consumer): a C++-only project
#    and a C-only project through find_package(airmoe CONFIG), neither
#    setting a C++ standard or enabling the other language, and the C program
#    through pkg-config. Each program checks what it computes and exits
#    non-zero on a mismatch.
# Usage: scripts/check_install.sh BUILD_DIR
set -euo pipefail
build=$(cd "${1:?usage: check_install.sh BUILD_DIR}" && pwd)
src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"
stage="$work/stage"
fail() {
  echo "check_install: $*" >&2
  exit 1
}

echo "== DESTDIR=$stage cmake --install $build --prefix $prefix"
DESTDIR="$stage" cmake --install "$build" --prefix "$prefix" >"$work/install.log"
outside=$(find "$stage" ! -type d ! -path "$stage$prefix/*")
[ -z "$outside" ] || fail "installed outside the prefix $prefix:"$'\n'"$outside"
[ ! -e "$prefix" ] || fail "wrote to $prefix around DESTDIR: $(find "$prefix" ! -type d)"
# The package is relocatable: the staged tree becomes the real prefix.
mv "$stage$prefix" "$prefix"
test -f "$prefix/lib/cmake/airmoe/airmoeConfig.cmake"
test -f "$prefix/include/airmoe.h"
test -f "$prefix/include/airmoe_version.h"
test -f "$prefix/include/airmoe/router/air_router.h"

if [ -d "$build/python/airmoe" ]; then
  echo "== the Python package under $prefix"
  package=$(find "$prefix" -path '*/airmoe/__init__.py')
  [ "$(echo "$package" | wc -l)" -eq 1 ] && [ -n "$package" ] ||
    fail "expected one airmoe/__init__.py under $prefix, found: '$package'"
  site=$(dirname "$(dirname "$package")")
  echo "$site"
  ls "$site"/airmoe/_airmoe*.so >/dev/null || fail "no extension module in $site/airmoe"
  python=$(sed -n 's/^Python3_EXECUTABLE:[A-Z]*=//p' "$build/CMakeCache.txt")
  if "$python" -c "import torch" 2>/dev/null; then
    (cd "$work" && PYTHONPATH="$site" PYTHONDONTWRITEBYTECODE=1 "$python" -c \
      "import airmoe, sys; sys.exit(0 if airmoe.__file__.startswith('$site/') else 'airmoe from ' + airmoe.__file__)")
  else
    echo "($python has no torch: the import is not tried)"
  fi
fi

for lang in cxx c; do
  echo "== find_package(airmoe CONFIG) consumer, a $lang-only project"
  cmake -S "$src/tests/consumer/$lang" -B "$work/build_$lang" -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_BUILD_TYPE=Release >"$work/configure_$lang.log" 2>&1 ||
    fail "configuring the $lang consumer failed:"$'\n'"$(tail -30 "$work/configure_$lang.log")"
  cmake --build "$work/build_$lang" -j2 >"$work/build_$lang.log" 2>&1 ||
    fail "building the $lang consumer failed:"$'\n'"$(tail -30 "$work/build_$lang.log")"
done
OMP_NUM_THREADS=1 "$work/build_cxx/consumer_cxx"
"$work/build_c/consumer_c"

echo "== pkg-config airmoe_c consumer"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
pkg-config --modversion airmoe_c
# shellcheck disable=SC2046
cc -std=c99 -o "$work/consumer_c_pc" "$src/tests/consumer/c/consumer.c" $(pkg-config --cflags --libs airmoe_c)
LD_LIBRARY_PATH="$prefix/lib" "$work/consumer_c_pc"
echo "install check passed"
