#!/usr/bin/env bash
# The GPU check in one command: scripts/gpu_check.sh OUT_DIR
#
# On a machine with a GPU, the CUDA toolkit (nvcc), CMake, Ninja, Python with
# PyTorch 2.x and pybind11, and no network, it builds the CUDA libraries, the
# tests and the Python extension (routers, and the MoE layer on one rank:
# comm=None) from this tree
# (-DAIRMOE_WITH_CUDA=ON, no MPI, no examples), prints the machine's GPU,
# driver, CUDA, cuBLAS and NCCL versions, runs every `gpu`-labelled test
# (the ops on cuda:0; the exchange test body on cuda:0 buffers with P = 1..4
# in-process ranks sharing the GPU, and on NCCL at P = 1 when the build
# found NCCL: configure.log and the summary say whether it did),
# runs the ops tests' cuda cases again under compute-sanitizer (memcheck)
# where it exists, runs the Python tests (their cuda cases: routers on the
# GPU against the CPU, bf16 and f32, torch's current stream; the MoE layer
# on cuda:0 with comm=None against the host layer), then
# the benchmark rows (examples/bench_device.py --device cuda: AIR at each m,
# dense, product keys, torch.topk(h @ W.T) in bf16 and f32, at E = 65,536,
# d = 512, T = 16,384, and at E = 1,048,576, d = 1,024, T = 4,096 without
# the project's dense router (it alone would outrun the step), JSON in
# OUT_DIR/bench_device.json and bench_device_1m.json), and the MoE layer
# rows (airmoe_layer_bench --backend cuda:0: P = 1 and P = 4 ranks as
# threads of one process sharing the GPU through the in-process exchange on
# device buffers, air against dense-replicated, forward and backward, at
# E = 65,536, d = 512, 4,096 tokens per rank; capped at 40 s and 50 s; JSON
# in OUT_DIR/bench_layer_P1.json and bench_layer_P4.json; "not run" with
# the reason where the build has no airmoe_layer_bench).
# Everything it prints also lands in OUT_DIR (one log per step, summary.txt
# last); each step has a timeout so that the whole check ends within about
# 8 minutes. On a machine without a GPU it still builds, the gpu tests
# report themselves skipped with the reason, and it exits with status 2.
#
# What it needs besides the tree: GoogleTest's sources, either in
# third_party/googletest (copy Debian's: cp -r /usr/src/googletest
# third_party/ and carry third_party/googletest, 4 MB) or named by
# AIRMOE_GTEST_SOURCE_DIR. For the Python tests: pytest, from the machine or
# carried in third_party/python (`pip install --target third_party/python
# pytest` on any machine: pure Python, about 5 MB); without it they are
# reported not run. Optional: CUDACXX (default: nvcc on PATH, else
# /usr/local/cuda/bin/nvcc), PYTHON (default: python3 on PATH, the one with
# torch), BUILD_DIR (default build-gpu), JOBS.
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
  # The extension against this Python's torch and pybind11 (pip's pybind11
  # tells CMake where its config is).
  local pybind11_dir
  pybind11_dir="$("$PYTHON" -m pybind11 --cmakedir 2>/dev/null || true)"
  # Ninja, unless the build dir exists already (it keeps its generator).
  local generator=(-G Ninja)
  [[ -f "$build/CMakeCache.txt" ]] && generator=()
  cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DAIRMOE_WITH_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$CUDACXX" -DAIRMOE_WITH_MPI=OFF -DAIRMOE_BUILD_EXAMPLES=OFF \
    -DAIRMOE_BUILD_PYTHON=ON -DPython3_EXECUTABLE="$PYTHON" ${pybind11_dir:+-Dpybind11_DIR="$pybind11_dir"} \
    -DAIRMOE_GTEST_SOURCE_DIR="$gtest"
}

# PYTHONPATH for the Python steps: the built package, and pytest where it
# was carried.
py_path() {
  local p="$PWD/$build/python"
  [[ -d third_party/python ]] && p="$p:$PWD/third_party/python"
  echo "$p"
}

# The Python router and layer tests; their cuda cases run here (skips
# listed, -rs).
py_tests() {
  if [[ ! -f "$build/python/airmoe/__init__.py" ]] || ! ls "$build"/python/airmoe/_airmoe*.so >/dev/null 2>&1; then
    echo "the Python extension was not built (no pybind11 or Python headers? see configure.log)"
    return 1
  fi
  if ! PYTHONPATH="$(py_path)" "$PYTHON" -c "import pytest" 2>/dev/null; then
    echo "python tests not run: no pytest (carry it: pip install --target third_party/python pytest)"
    return 0
  fi
  PYTHONPATH="$(py_path)" "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    python/tests/test_devices.py python/tests/test_routers.py python/tests/test_air_gate.py \
    python/tests/test_layer_backends.py
}

# The benchmark rows on the GPU (tokens/s, recall@8, mass recall), after a
# small asserted run (--check: AIR with every list probed equals the dense
# router, every row filled).
py_bench() {
  PYTHONPATH="$(py_path)" "$PYTHON" examples/bench_device.py --device cuda --repeat 2 \
    --experts 4096 --dim 64 --tokens 1024 --probes 1,4,all --check || return 1
  PYTHONPATH="$(py_path)" "$PYTHON" examples/bench_device.py --device cuda --repeat 3 \
    --experts 65536 --dim 512 --tokens 16384 --probes 1,2,4,8,16,32 \
    --json "$out/bench_device.json" || return 1
  # At a million experts without the project's dense router (about 3 s per
  # 16,384 tokens already at 65,536 experts on an H200, so minutes here):
  # recall is then against torch's float32 top-k.
  PYTHONPATH="$(py_path)" "$PYTHON" examples/bench_device.py --device cuda --repeat 3 \
    --experts 1048576 --dim 1024 --tokens 4096 --probes 1,2,4,8,16,32 --skip dense \
    --json "$out/bench_device_1m.json"
}

# The MoE layer on cuda:0 (bench/airmoe_layer_bench: experts, token vectors
# and the exchange's buffers on the GPU, routing on the host), P ranks as
# threads of this process sharing the one GPU. It needs no MPI or Boost, so
# the gpu build has it. Each rank gets an equal share of the cores for the
# host routing (OpenMP teams are per rank thread). One GPU cannot show
# NCCL across ranks, NVLink or network bandwidth: the exchange here is
# device-to-device copies within one GPU.
layer_bench_exe() {
  local exe="$build/bench/airmoe_layer_bench"
  [[ -x "$exe" ]] && echo "$exe"
}
layer_bench() {
  local P="$1"
  OMP_NUM_THREADS=$(($(nproc) / P > 0 ? $(nproc) / P : 1)) "$(layer_bench_exe)" \
    --backend cuda:0 --ranks "$P" --experts 65536 --dim 512 --num-tokens 4096 --codewords 256 \
    --probes 4 --strategies air,dense-replicated --warmup 1 --repeats 2 \
    --json "$out/bench_layer_P$P.json"
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

CUDACXX="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
PYTHON="${PYTHON:-$(command -v python3 || echo python3)}"
export CUDACXX PYTHON build jobs out
export -f versions configure gpu_test_executables sanitize py_path py_tests py_bench layer_bench_exe \
  layer_bench
note "tree $(git rev-parse --short HEAD 2>/dev/null || echo '?'), build dir $build, $jobs jobs, logs in $out"
step versions 60 versions
step configure 90 configure || { note "summary: FAILED (configure)"; exit 1; }
grep -h "airmoe NCCL backend" "$out/configure.log" | tee -a "$summary"
step build 330 cmake --build "$build" -j"$jobs" || { note "summary: FAILED (build)"; exit 1; }
step gpu_tests 120 ctest --test-dir "$build" -L gpu --output-on-failure
grep -hE "tests passed" "$out/gpu_tests.log" | tee -a "$summary"
skipped=$(grep -c "(Skipped)" "$out/gpu_tests.log")
if ((skipped > 0)); then
  exe="$(gpu_test_executables | head -1)"
  reason="$("$exe" --gtest_filter='*cuda*' 2>&1 | grep -m1 -A1 "Skipped" | tail -1)"
  note "gpu_tests: $skipped skipped: $reason"
fi
step py_tests 60 py_tests
grep -hE "passed|failed|not run|SKIPPED" "$out/py_tests.log" | tail -4 | tee -a "$summary"
# The benchmark before the sanitizer: its rows are what a GPU session is
# for; the sanitizer gets the time left (up to 100 s).
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  note "py_bench: not run (torch sees no CUDA device)"
  skipped=$((skipped + 1))
else
  step py_bench 150 py_bench
fi
if [[ -z "$(layer_bench_exe)" ]]; then
  note "layer_bench: not run ($build/bench/airmoe_layer_bench was not built; see build.log)"
elif ((skipped > 0)); then
  note "layer_bench: not run (no GPU ran the gpu tests)"
else
  # P = 1 first: its row survives a P = 4 that runs out of time.
  step layer_bench_P1 40 layer_bench 1
  step layer_bench_P4 50 layer_bench 4
  grep -h "air / dense-replicated" "$out"/layer_bench_P*.log | tee -a "$summary"
fi
step sanitizer 100 sanitize && grep -h "skipped" "$out/sanitizer.log" | tee -a "$summary"
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
