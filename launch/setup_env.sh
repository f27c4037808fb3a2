#!/usr/bin/env bash
# Create or reuse .venv at the repository root and install lillm into it (with the dev extra).
# Where no CUDA GPU is present, torch==2.13.0 (CPU) is installed first, so resolving lillm's dependencies
# never pulls the multi-GB CUDA wheels; with a GPU, pip's normal (CUDA) torch is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q "torch>=2.5"
  else
    # The CPU build: a local file on lillm's CI machines; elsewhere point LILLM_TORCH_INDEX at
    # https://download.pytorch.org/whl/cpu to avoid PyPI's CUDA build.
    $PIP install -q "torch==2.13.0" ${LILLM_TORCH_INDEX:+--index-url "$LILLM_TORCH_INDEX"}
  fi
fi
if ! .venv/bin/python -c "import lillm, transformers, pytest" 2>/dev/null \
   || [ setup.cfg -nt .venv/.lillm-installed ]; then
  $PIP install -q -e ".[dev]"
  touch .venv/.lillm-installed
fi
# DeepSpeed's CPU communication op, built once into this venv (.venv/torch_extensions, where lillm's CPU
# ranks look for it): no launch compiles it, and a build interrupted in a shared cache cannot wedge later
# runs. On GPU machines NCCL is used and there is nothing to build.
if [ ! -f .venv/torch_extensions/deepspeed_shm_comm/deepspeed_shm_comm.so ] \
   && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  echo "setup: building DeepSpeed's CPU communication op (once, about 2 minutes)"
  start=$SECONDS
  timeout 1200 .venv/bin/python -m lillm.train.ops --build-ops >/dev/null \
    || echo "setup: warning: the op build failed; the first training launch will try again" >&2
  echo "setup: op build ended after $((SECONDS - start)) s"
fi

