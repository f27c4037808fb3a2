#!/usr/bin/env bash
# Wheels of what a GPU image with PyTorch, transformers, tokenizers and accelerate lacks for lillm, into .whl/
# (x86-64 Linux, CPython $PYVER: the GPU image's, 3.12 by default), for an offline GPU machine:
# benchmarks/gpu_check.sh installs them from there. `datasets` is left out: the check reads the built-in corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PYVER=${PYVER:-3.12}
[ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
DS=$("$PY" -c "from importlib.metadata import version; print(version('deepspeed'))")
# DeepSpeed ships a source distribution only; built here without ops it is a pure-Python wheel.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$DS"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
NAMES="jsonargparse docstring-parser typeshed-client hjson pydantic pydantic-core annotated-types typing-inspection
  einops msgpack py-cpuinfo"
# The versions this venv runs (pydantic and pydantic-core must match each other), else the newest.
PINNED=$("$PY" - $NAMES <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PYEOF
)
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${PLAT[@]}" -d .whl \
  $PINNED
ls -1 .whl
