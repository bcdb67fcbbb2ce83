#!/usr/bin/env bash
# Installs a configured, built airmoe build tree into a fresh prefix and
# builds a consumer project against it (tests/consumer): through
# find_package(airmoe CONFIG) (a C++ and a C program) and through pkg-config
# (the C program). Each program checks what it computes and exits non-zero on
# a mismatch.  Usage: scripts/check_install.sh BUILD_DIR
set -euo pipefail
build=$(cd "${1:?usage: check_install.sh BUILD_DIR}" && pwd)
src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"

echo "== cmake --install $build --prefix $prefix"
cmake --install "$build" --prefix "$prefix" >"$work/install.log"
test -f "$prefix/lib/cmake/airmoe/airmoeConfig.cmake"
test -f "$prefix/include/airmoe.h"
test -f "$prefix/include/airmoe_version.h"
test -f "$prefix/include/airmoe/router/air_router.h"

echo "== find_package(airmoe CONFIG) consumer"
cmake -S "$src/tests/consumer" -B "$work/build" -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_BUILD_TYPE=Release >"$work/configure.log"
cmake --build "$work/build" -j2 >"$work/build.log"
OMP_NUM_THREADS=1 "$work/build/consumer_cxx"
"$work/build/consumer_c"

echo "== pkg-config airmoe_c consumer"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
pkg-config --modversion airmoe_c
# shellcheck disable=SC2046
cc -std=c99 -o "$work/consumer_c_pc" "$src/tests/consumer/consumer.c" $(pkg-config --cflags --libs airmoe_c)
LD_LIBRARY_PATH="$prefix/lib" "$work/consumer_c_pc"
echo "install check passed"
