#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test twice: a Release
# build (GoogleTest, MPI tests, the C API test, the PyTorch binding's pytest
# suite, benchmark and launch tests, the installed-package consumer), then an
# AddressSanitizer + UndefinedBehaviorSanitizer build (all but Python and the
# benchmarks), then each libFuzzer target for 20 s (scripts/fuzz.sh). In
# between, `pip install .` into a virtualenv with transformers 4.49.0 and the
# Hugging Face integration's tests (scripts/test_hf.sh, about 2.5 minutes).
# Where the CUDA toolkit is installed it also compiles the CUDA build the way
# a GPU machine does (no MPI, GoogleTest from its sources, the routers-only
# Python extension) and runs its tests: the CPU tests and the Python router
# tests pass, the gpu tests (and the Python tests' cuda cases) report
# themselves skipped without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="$(nproc)"

bash scripts/install-deps.sh

echo "== Release build and tests"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure --timeout 900

echo "== pip install . and the Hugging Face integration (scripts/test_hf.sh)"
bash scripts/test_hf.sh

echo "== ASan + UBSan build and tests"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAIRMOE_SANITIZE=ON \
  -DAIRMOE_BUILD_EXAMPLES=OFF -DAIRMOE_BUILD_PYTHON=OFF
cmake --build build-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-asan --output-on-failure --timeout 900

echo "== CUDA build: compile, CPU tests, gpu tests (skipped without a GPU)"
nvcc="$(command -v nvcc || true)"
[ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc
gtest_src=""
[ -f /usr/src/googletest/CMakeLists.txt ] && gtest_src=/usr/src/googletest  # Debian: googletest
if [ -n "$nvcc" ]; then
  cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DAIRMOE_WITH_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$nvcc" -DAIRMOE_WITH_MPI=OFF -DAIRMOE_BUILD_EXAMPLES=OFF \
    -DAIRMOE_GTEST_SOURCE_DIR="$gtest_src"
  cmake --build build-cuda -j"$jobs"
  # The heavy recall test runs in the Release build above; same code here.
  ctest --test-dir build-cuda --output-on-failure --timeout 900 -LE heavy
else
  echo "no nvcc (CUDA toolkit): the CUDA build is skipped"
fi

echo "== libFuzzer: the .npy reader, the message decoders, the checkpoint reader and the request-key records, 20 s each"
bash scripts/fuzz.sh 20
