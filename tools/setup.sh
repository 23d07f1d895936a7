#!/usr/bin/env bash
# Set up chatforge in ./.venv from nothing: torch first (the CPU build on CPU machines, where
# pip finds it locally), then everything else under a constraints file that pins torch, so
# no dependency can pull another torch build. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
TORCH=$(sed -n 's/^torch==//p' constraints.txt)
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" 2>/dev/null; then
  .venv/bin/pip install -q "torch==$TORCH"
fi
# lm-eval: the suite benchmarks an exported model with it (tests/dist/test_hf.py).
.venv/bin/pip install -q -c constraints.txt -e ".[test,lm-eval]"
# An importable module named `apex` (PyPI's apex is an unrelated package) makes megatron pick
# fused kernels that are not there; refuse to run with one.
if .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('apex') is None)"; then
  echo "setup: a module named 'apex' is importable in .venv; megatron would try NVIDIA apex kernels." >&2
  echo "setup: uninstall it (pip uninstall apex) unless it is NVIDIA apex built for your GPU." >&2
fi
