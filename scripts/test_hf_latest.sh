#!/usr/bin/env bash
# The optional second job of the Hugging Face integration: the same tests as
# scripts/test_hf.sh, in a plain virtualenv (no system packages) with the
# newest torch 2.x and transformers 5.x from PyPI, where Qwen3-MoE,
# Qwen3-Next, torch.compile, float16 on the CPU and the transformers Trainer
# run as well. About 3 GB of wheels (PyPI's torch brings its CUDA
# libraries); not called by scripts/test.sh. See docs/hf.md.
set -euo pipefail
exec bash "$(dirname "$0")/test_hf.sh" --venv .venv-hf-latest --no-system-site-packages \
  --requirements "torch>=2 transformers>=5 accelerate pytest matplotlib" "$@"
