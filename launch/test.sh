#!/usr/bin/env bash
# Set up .venv (see setup_env.sh), lint, and run the test suite on CPU.
#   bash launch/test.sh          the full suite (what CI runs)
#   bash launch/test.sh --fast   the fast tier for the edit-test loop: everything not marked slow (no
#                                `deepspeed` launcher runs, no installed-wheel or long in-process runs)
# Other arguments go to pytest (e.g. `bash launch/test.sh --fast -k loader`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export TOKENIZERS_PARALLELISM=false
echo "test: $(date -u +%H:%M:%S) lint"
.venv/bin/ruff check lillm tests launch benchmarks
echo "test: $(date -u +%H:%M:%S) tests"
if [ "${1:-}" = "--fast" ]; then
  shift
  exec .venv/bin/python -m pytest -q -m "not slow" "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
