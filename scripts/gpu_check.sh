#!/usr/bin/env bash
# The GPU check in one command: scripts/gpu_check.sh OUT_DIR
#
# On a machine with a GPU, the CUDA toolkit (nvcc), CMake, Ninja and no
# network, it builds the CUDA libraries and the tests from this tree
# (-DAIRMOE_WITH_CUDA=ON, no MPI, no examples), prints the machine's GPU,
# driver, CUDA, cuBLAS and NCCL versions, runs every `gpu`-labelled test,
# runs the ops tests' cuda cases again under compute-sanitizer (memcheck)
# where it exists, then the benchmark's cuda rows where the benchmark has a
# cuda mode.
# Everything it prints also lands in OUT_DIR (one log per step, summary.txt
# last); each step has a timeout so that the whole check ends within about
# 8 minutes. On a machine without a GPU it still builds, the gpu tests
# report themselves skipped with the reason, and it exits with status 2.
#
# What it needs besides the tree: GoogleTest's sources, either in
# third_party/googletest (copy Debian's: cp -r /usr/src/googletest
# third_party/ and carry third_party/googletest, 4 MB) or named by
# AIRMOE_GTEST_SOURCE_DIR. Optional: CUDACXX (default: nvcc on PATH, else
# /usr/local/cuda/bin/nvcc), BUILD_DIR (default build-gpu), JOBS.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${1:?usage: scripts/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
build="${BUILD_DIR:-build-gpu}"
jobs="${JOBS:-$(nproc)}"
start=$(date +%s)
budget=470  # seconds for everything, leaving a margin under 8 minutes
summary="$out/summary.txt"
: >"$summary"
failed=0

note() { echo "[gpu_check] $*" | tee -a "$summary"; }
left() { echo $((budget - ($(date +%s) - start))); }
# step NAME CAP CMD...: runs CMD with a timeout of min(CAP, time left),
# output to OUT_DIR/NAME.log and the terminal; records its status.
step() {
  local name="$1" cap="$2"
  shift 2
  local limit
  limit=$(left)
  ((limit > cap)) && limit=$cap
  if ((limit < 10)); then
    note "$name: not run (out of time)"
    failed=1
    return 1
  fi
  local t0=$(date +%s)
  # bash -c: a step may be one of the functions below (exported).
  timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - t0))
  if ((rc == 0)); then
    note "$name: ok (${took} s)"
  elif ((rc == 124 || rc == 137)); then
    note "$name: TIMED OUT after ${limit} s"
    failed=1
  else
    note "$name: FAILED (exit $rc, ${took} s; see $name.log)"
    failed=1
  fi
  return "$rc"
}

versions() {
  echo "== GPU and driver"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  echo "== CUDA compiler"
  "$CUDACXX" --version
  local inc
  inc="$(dirname "$(dirname "$(readlink -f "$CUDACXX")")")/include"
  echo "== cuBLAS (header in $inc)"
  grep -hE "#define CUBLAS_VER_(MAJOR|MINOR|PATCH) " "$inc/cublas_api.h" 2>/dev/null ||
    echo "cublas_api.h: not found"
  echo "== NCCL"
  grep -hE "#define NCCL_(MAJOR|MINOR|PATCH) " "$inc/nccl.h" 2>/dev/null || echo "nccl.h: not found"
  for py in python3 python; do
    if command -v "$py" >/dev/null; then
      timeout 60 "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cuBLAS via torch', torch.backends.cuda.is_built(), 'NCCL', torch.cuda.nccl.version() if torch.cuda.is_available() else 'n/a')" 2>&1 |
        tail -1 || true
      break
    fi
  done
  echo "== compute-sanitizer"
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -2 ||
    echo "compute-sanitizer: not found"
}

configure() {
  local gtest="${AIRMOE_GTEST_SOURCE_DIR:-}"
  if [[ -z "$gtest" && -f third_party/googletest/CMakeLists.txt ]]; then
    gtest="$PWD/third_party/googletest"
  fi
  if [[ -z "$gtest" ]]; then
    echo "no GoogleTest sources: copy them to third_party/googletest or set AIRMOE_GTEST_SOURCE_DIR"
    return 2
  fi
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DAIRMOE_WITH_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$CUDACXX" -DAIRMOE_WITH_MPI=OFF -DAIRMOE_BUILD_EXAMPLES=OFF \
    -DAIRMOE_BUILD_PYTHON=OFF -DAIRMOE_GTEST_SOURCE_DIR="$gtest"
}

# The test executables that hold gpu-labelled ctest entries.
gpu_test_executables() {
  ctest --test-dir "$build" -L gpu --show-only=json-v1 |
    python3 -c '
import json, sys
exes = {t["command"][0] for t in json.load(sys.stdin).get("tests", []) if t.get("command")}
print("\n".join(sorted(exes)))'
}

# The ops tests' cuda cases (every op; gtest filter *cuda*) once more under
# memcheck, at the small sizes AIRMOE_TEST_SMALL asks for.
sanitize() {
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer not found: skipped"
    return 0
  fi
  local exe="$build/tests/airmoe_ops_tests"
  echo "== compute-sanitizer memcheck: $exe --gtest_filter=*cuda*"
  AIRMOE_TEST_SMALL=1 compute-sanitizer --tool memcheck --error-exitcode 99 --leak-check no \
    "$exe" --gtest_filter='*cuda*'
}

bench() {
  local exe
  exe="$(find "$build" -name airmoe_bench -type f -perm -u+x | head -1)"
  if [[ -z "$exe" ]]; then
    echo "benchmark rows skipped: this build has no airmoe_bench (examples are off without MPI)"
    return 0
  fi
  if ! "$exe" router --help 2>&1 | grep -q -- "--device"; then
    echo "benchmark rows skipped: airmoe_bench router has no --device option yet"
    return 0
  fi
  "$exe" router --device cuda
}

CUDACXX="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
export CUDACXX build jobs
export -f versions configure gpu_test_executables sanitize bench
note "tree $(git rev-parse --short HEAD 2>/dev/null || echo '?'), build dir $build, $jobs jobs, logs in $out"
step versions 60 versions
step configure 90 configure || { note "summary: FAILED (configure)"; exit 1; }
step build 330 cmake --build "$build" -j"$jobs" || { note "summary: FAILED (build)"; exit 1; }
step gpu_tests 120 ctest --test-dir "$build" -L gpu --output-on-failure
grep -hE "tests passed" "$out/gpu_tests.log" | tee -a "$summary"
skipped=$(grep -c "(Skipped)" "$out/gpu_tests.log")
if ((skipped > 0)); then
  exe="$(gpu_test_executables | head -1)"
  reason="$("$exe" --gtest_filter='*cuda*' 2>&1 | grep -m1 -A1 "Skipped" | tail -1)"
  note "gpu_tests: $skipped skipped: $reason"
fi
step sanitizer 150 sanitize && grep -h "skipped" "$out/sanitizer.log" | tee -a "$summary"
step bench 90 bench && grep -h "skipped" "$out/bench.log" | tee -a "$summary"
took=$(($(date +%s) - start))
if ((failed)); then
  note "summary: FAILED (${took} s)"
  exit 1
fi
if ((skipped > 0)); then
  note "summary: built and tested, but no GPU ran the gpu tests (${took} s)"
  exit 2
fi
note "summary: ok (${took} s)"
