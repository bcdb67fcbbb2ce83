#!/usr/bin/env bash
# The Hugging Face transformers integration, tested as a user installs it:
# a virtualenv, transformers from PyPI, `pip install .` of this checkout,
# then python/tests/test_hf_integration.py (and the examples/hf smoke run)
# against the installed package. Called by scripts/test.sh with the
# defaults: a --system-site-packages virtualenv over Debian's python3
# (torch 1.13, NumPy, pytest, Matplotlib) plus transformers 4.49.0, the
# newest that imports with torch 1.13. scripts/test_hf_latest.sh runs the
# same with torch 2.x and transformers 5.x.
#
# usage: scripts/test_hf.sh [--venv DIR] [--no-system-site-packages] [--requirements "PKG ..."]
# The virtualenv (default .venv-hf, ignored by git) is reused when present.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-hf
system_site=--system-site-packages
requirements="transformers==4.49.0"
while (($#)); do
  case "$1" in
    --venv) venv=$2; shift 2 ;;
    --no-system-site-packages) system_site=""; shift ;;
    --requirements) requirements=$2; shift 2 ;;
    *) echo "test_hf.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

start=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv (/usr/bin/python3 -m venv $system_site)"
  /usr/bin/python3 -m venv $system_site "$venv"
fi
venv=$(cd "$venv" && pwd)
py="$venv/bin/python"
echo "== pip install $requirements"
# shellcheck disable=SC2086 # the requirements are words
"$py" -m pip install --quiet --disable-pip-version-check $requirements
echo "== pip install . (airmoe into $venv)"
"$py" -m pip install --quiet --disable-pip-version-check .
installed=$(cd / && "$py" -c "import airmoe, os; print(os.path.dirname(airmoe.__file__))")
case "$installed" in
  "$venv"/*) ;;
  *) echo "test_hf.sh: import airmoe found $installed, not the package pip installed into $venv" >&2
     exit 1 ;;
esac
"$py" -c "import torch, numpy, transformers; print('== torch', torch.__version__, '| numpy', numpy.__version__, '| transformers', transformers.__version__)"
echo "== setup took $((SECONDS - start)) s"

OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONDONTWRITEBYTECODE=1 \
  "$py" -m pytest -q -rs -p no:cacheprovider python/tests/test_hf_integration.py \
  python/tests/test_hf_example.py
# A tiny Mixtral trained with its MoE blocks on the expert-parallel
# MoELayer (SwiGLU, stock weights loaded): P = 2 equals P = 1.
if "$py" -c "import mpi4py.MPI" 2>/dev/null; then
  for P in 1 2; do
    echo "== hf_moe_mpi_check.py at P=$P"
    OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1 OMPI_ALLOW_RUN_AS_ROOT=1 \
      OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 600 \
      mpiexec --oversubscribe -n "$P" "$py" python/tests/hf_moe_mpi_check.py
  done
else
  echo "== hf_moe_mpi_check.py skipped: $venv has no mpi4py (it needs --system-site-packages)"
fi
echo "== test_hf.sh took $((SECONDS - start)) s"
