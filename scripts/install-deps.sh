#!/usr/bin/env bash
# Installs the Debian packages airmoe builds and tests with, and PyPI's
# faiss-cpu for Debian's python3. Idempotent: it asks apt only for what is
# missing and pip only when faiss-cpu is not there, so a second run costs a
# dpkg query and one Python import.
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
  python3-pip python3-packaging  # faiss-cpu from PyPI (below); its loader imports packaging
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

sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
if ((${#missing[@]})); then
  echo "[airmoe] installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update
  $sudo_cmd apt-get install -y --no-install-recommends "${missing[@]}"
else
  echo "[airmoe] all packages present"
fi

# FAISS built for this CPU (faiss-cpu ships generic, AVX2 and AVX-512
# builds and loads the best one): the router benchmark's baseline that scans
# AIR's lists (examples/bench_baselines.py). 1.8.0 is the newest release that
# runs on Debian's NumPy 1.24 (1.9 and later require NumPy >= 1.25);
# --no-deps keeps pip away from Debian's NumPy and torch, and
# --break-system-packages lets it write /usr/local (PEP 668).
faiss_cpu=1.8.0
if /usr/bin/python3 -c "import sys, faiss; sys.exit(faiss.__version__ != '$faiss_cpu')" 2>/dev/null; then
  echo "[airmoe] faiss-cpu $faiss_cpu present"
else
  echo "[airmoe] installing faiss-cpu $faiss_cpu from PyPI for /usr/bin/python3"
  $sudo_cmd /usr/bin/python3 -m pip install --quiet --root-user-action=ignore \
    --break-system-packages --no-deps "faiss-cpu==$faiss_cpu"
  /usr/bin/python3 -c "import torch, numpy, faiss; print('[airmoe] faiss-cpu', faiss.__version__, 'imports next to torch', torch.__version__, 'and numpy', numpy.__version__)"
fi
