#!/usr/bin/env bash
# Installs what is missing, builds, and runs the router benchmark on its
# built-in data (E=65,536 experts, d=512, 4,096 tokens, k=8). Extra arguments
# go to `airmoe_bench router` (try --help). Results: out/router.json.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)" --target airmoe_bench airmoe_python
# `import airmoe` for Debian's python3 (into its dist-packages).
if [ "$(id -u)" -eq 0 ]; then cmake --install build --component python; else sudo cmake --install build --component python; fi
/usr/bin/python3 -c "import airmoe, torch; r = airmoe.AIRRouter(4096, 64, 8, 64, 8); g, i = r(torch.randn(16, 64)); print('airmoe PyTorch router ok:', tuple(g.shape), tuple(i.shape))"
mkdir -p out
./build/examples/airmoe_bench router --json out/router.json "$@"
