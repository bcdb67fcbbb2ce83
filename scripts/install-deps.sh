#!/usr/bin/env bash
# Installs the Debian packages airmoe builds and tests with. Idempotent: it
# asks apt only for what is missing, so a second run costs a dpkg query.
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  libopenblas-dev          # the sgemm yardstick in the benchmark, and FAISS
  openmpi-bin libopenmpi-dev   # the distributed runtime's default transport
  libboost-program-options-dev
  libgtest-dev libgmock-dev
  libthrust-dev libcub-dev # the device-emulated backend where no CUDA toolkit (CCCL) exists
  libbenchmark-dev
  nlohmann-json3-dev
  libfaiss-dev             # the benchmark's FAISS IndexIVFFlat peer
  python3 python3-numpy    # .npy fixtures in tests
  python3-dev pybind11-dev # the PyTorch binding (python/)
  python3-venv             # `pip install .` into a virtualenv (scripts/test_hf.sh)
  python3-torch python3-pytest python3-mpi4py  # the binding's tests
  fortunes                 # English text for the language-model example
  dict-gcide               # 40 MB of English for the routing study (examples/lm/study.py)
  iproute2                 # network namespaces as hosts (scripts/multihost.sh)
  python3-matplotlib       # docs charts
  clang libclang-rt-14-dev libomp-14-dev  # scripts/fuzz.sh (libFuzzer, OpenMP for clang)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "[airmoe] installing: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update
  $sudo_cmd apt-get install -y --no-install-recommends "${missing[@]}"
else
  echo "[airmoe] all packages present"
fi
