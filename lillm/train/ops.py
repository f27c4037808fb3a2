"""DeepSpeed's JIT-built ops: where they are built (once per venv) and the build lock that must not wedge a launch.

    python -m lillm.train.ops --build-ops    # what launch/setup_env.sh runs on a CPU machine
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

STALE_BUILD_LOCK_S = 600  # building DeepSpeed's CPU op takes about 100 s; a lock this old has no builder


def use_venv_extensions_dir() -> None:
    """Point DeepSpeed's JIT-built ops at <venv>/torch_extensions (where `launch/setup_env.sh` builds them
    once), unless TORCH_EXTENSIONS_DIR is set; and clear a build lock that no builder holds any more.

    torch's build lock is a bare file: a process killed while building leaves it, and every later launch
    then waits for it forever, silently. In a cache per venv the op is built once at setup, not by the
    first launch, so that window is closed; a lock older than any build is removed with a warning.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None and os.access(sys.prefix, os.W_OK):
        root = os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    if root is None or not os.path.isdir(root):
        return
    for entry in os.scandir(root):
        lock = os.path.join(entry.path, "lock")
        try:
            age = time.time() - os.stat(lock).st_mtime
        except OSError:
            continue
        if age > STALE_BUILD_LOCK_S:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            print(f"lillm: removed a stale DeepSpeed build lock {lock} ({age / 60:.0f} min old: its build was "
                  "interrupted); the op is rebuilt if needed", file=sys.stderr, flush=True)
        else:
            print(f"lillm: waiting for a DeepSpeed op build in progress ({lock}); if no other process is "
                  "building, delete that file", file=sys.stderr, flush=True)


def build_ops() -> None:
    """Build DeepSpeed's CPU communication op into the venv now (setup time), where CPU ranks load it."""
    use_venv_extensions_dir()
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)


if __name__ == "__main__":
    if sys.argv[1:] != ["--build-ops"]:
        sys.exit("usage: python -m lillm.train.ops --build-ops")
    build_ops()
