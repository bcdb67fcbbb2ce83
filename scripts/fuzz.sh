#!/usr/bin/env bash
# Fuzzes each reader for N seconds (default 30): the .npy reader followed by
# routing (airmoe_fuzz_npy), the runtime's received-message decoders
# (airmoe_fuzz_decoders), the checkpoint reader (airmoe_fuzz_checkpoint) and
# the gathered request-key records (airmoe_fuzz_key_records).
# Configures build-fuzz with clang (libFuzzer + ASan + UBSan over the whole
# library), builds the targets, and runs each on a copy of its seed corpus
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
cmake --build "$build" -j2 --target airmoe_fuzz_npy airmoe_fuzz_decoders airmoe_fuzz_checkpoint \
  airmoe_fuzz_key_records

# Work on a copy: libFuzzer adds what it finds to its corpus directory.
findings="$build/findings"
mkdir -p "$findings"
run() {  # target corpus-source max_len
  local corpus="$build/corpus-$1"
  mkdir -p "$corpus"
  cp -rn "$2"/. "$corpus"/
  echo "[airmoe] fuzzing $1 for ${seconds} s"
  OMP_NUM_THREADS=1 ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    "$build/tests/fuzz/airmoe_fuzz_$1" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -max_len="$3" -artifact_prefix="$findings/$1-" -print_final_stats=1 "$corpus"
}
npy_seeds="$build/seeds-npy"
mkdir -p "$npy_seeds"
cp -n tests/fuzz/corpus/*.npy "$npy_seeds"/
run npy "$npy_seeds" 4096
run decoders tests/fuzz/corpus/decoders 65536
run checkpoint tests/fuzz/corpus/checkpoint 65536
run key_records tests/fuzz/corpus/key_records 4096
