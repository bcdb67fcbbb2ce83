#!/usr/bin/env bash
# Regenerates the seed corpora of the decoder and checkpoint fuzz targets
# (tests/fuzz/corpus/{decoders,checkpoint}) from real messages and a real
# checkpoint, with the fuzz build (see tests/fuzz/decoders.cmake).
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build-fuzz}
if [ ! -f "$build/CMakeCache.txt" ]; then
  CC=clang CXX=clang++ cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DAIRMOE_FUZZ=ON -DAIRMOE_SANITIZE=ON -DAIRMOE_WITH_MPI=OFF \
    -DAIRMOE_BUILD_PYTHON=OFF -DAIRMOE_BUILD_EXAMPLES=OFF
fi
cmake --build "$build" -j2 --target airmoe_fuzz_seeds
# Older format versions' manifest seeds (manifest[-resealed]: version 1,
# manifest-v2-*: version 2) are kept: this build writes only the newest.
rm -rf tests/fuzz/corpus/decoders
rm -f tests/fuzz/corpus/checkpoint/manifest-v3* tests/fuzz/corpus/checkpoint/shard*
"$build/tests/airmoe_fuzz_seeds" tests/fuzz/corpus
ls tests/fuzz/corpus/decoders tests/fuzz/corpus/checkpoint | wc -l
