#!/usr/bin/env bash
# Fuzzes the .npy reader and the routers for N seconds (default 30):
# configures build-fuzz with clang (libFuzzer + ASan + UBSan over the whole
# library), builds airmoe_fuzz_npy, and runs it on a copy of the seed corpus
# (tests/fuzz/corpus). A finding is written to build-fuzz/findings/ and the
# script exits non-zero; turn each into a unit test.
#   bash scripts/fuzz.sh [seconds]
set -euo pipefail
seconds="${1:-30}"
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$root/build-fuzz"
cd "$root"

launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
flags="-fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  "${launcher[@]}" -DCMAKE_CXX_FLAGS="$flags" -DAIRMOE_FUZZ=ON -DAIRMOE_WITH_MPI=OFF \
  -DAIRMOE_BUILD_TESTS=OFF -DAIRMOE_BUILD_EXAMPLES=OFF -DAIRMOE_BUILD_PYTHON=OFF >/dev/null
cmake --build "$build" -j2 --target airmoe_fuzz_npy

# Work on a copy: libFuzzer adds what it finds to its corpus directory.
corpus="$build/corpus"
findings="$build/findings"
mkdir -p "$corpus" "$findings"
cp -n tests/fuzz/corpus/*.npy "$corpus"/
echo "[airmoe] fuzzing the .npy reader and the routers for ${seconds} s"
OMP_NUM_THREADS=1 ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$build/tests/fuzz/airmoe_fuzz_npy" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
  -max_len=4096 -artifact_prefix="$findings/" -print_final_stats=1 "$corpus"
