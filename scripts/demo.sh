#!/usr/bin/env bash
# Installs what is missing, builds, and runs the router benchmark on its
# built-in data (E=65,536 experts, d=512, 4,096 tokens, k=8). Extra arguments
# go to `airmoe_bench router` (try --help). Results: out/router.json.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)" --target airmoe_bench
mkdir -p out
./build/examples/airmoe_bench router --json out/router.json "$@"
