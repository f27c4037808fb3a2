#!/usr/bin/env bash
# Set up .venv (see setup_env.sh), lint, and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check lillm tests launch benchmarks
.venv/bin/python -m pytest -q "$@"
