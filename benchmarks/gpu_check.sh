#!/usr/bin/env bash
# The GPU validation in one command (see benchmarks/gpu_check.py): run it first thing on any GPU machine.
#   bash benchmarks/gpu_check.sh            # GPU: under 10 minutes on one GPU; JSON + markdown in $OUT or
#                                           # benchmarks/results/gpu_check; exit 1 if any step failed
#   bash benchmarks/gpu_check.sh --smoke    # CPU, tiny shapes (the test suite runs this)
# Python: .venv if there is one, else python3 (a GPU image's own torch). Packages that python lacks are
# installed from .whl/ when that folder exists (an offline machine): fill it here first with
# `bash benchmarks/gpu_wheels.sh`, then carry .whl to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
NEEDS="import deepspeed, deepspeed.runtime.engine, jsonargparse, tokenizers, transformers, safetensors"
if ! "$PY" -c "$NEEDS" 2>/dev/null; then
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lillm_site .whl/*.whl
    export PYTHONPATH="/tmp/lillm_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! "$PY" -c "$NEEDS"; then
    echo "gpu_check: $PY lacks lillm's packages (above); run bash launch/setup_env.sh where there is a network," \
      "or fill .whl/ with bash benchmarks/gpu_wheels.sh and carry it" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_check.py "$@"
