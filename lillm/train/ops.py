"""DeepSpeed's JIT-built ops: where they are built (once per venv) and the build lock that must not wedge a launch.

    python -m lillm.train.ops --build-ops    # what launch/setup_env.sh runs on a CPU machine
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time

CPU_OP = "deepspeed_shm_comm"  # the op DeepSpeed's CPU accelerator JIT-builds for its collectives
STALE_BUILD_LOCK_S = 600  # building DeepSpeed's CPU op takes about 100 s; a lock this old has no builder


def use_venv_extensions_dir(announce: bool = True) -> None:
    """Point DeepSpeed's JIT-built ops at <venv>/torch_extensions (where `launch/setup_env.sh` builds them
    once), unless TORCH_EXTENSIONS_DIR is set; build them with the venv's ninja whatever PATH says; say so when
    a launch has to build; and clear a build lock that no builder holds any more.

    Why one ninja: torch runs `ninja` from PATH, and ninja versions read each other's build logs as foreign,
    so a build made with the system's ninja (setup with the plain PATH) is rebuilt from scratch by the venv's
    (an activated venv, the quickstart), and back again, two to three minutes each time.

    torch's build lock is a bare file: a process killed while building leaves it, and every later launch
    then waits for it forever, silently. In a cache per venv the op is built once at setup, not by the
    first launch, so that window is closed; a lock older than any build is removed with a warning.
    """
    use_venv_ninja()
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None and os.access(sys.prefix, os.W_OK):
        root = os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    if root is None:
        return
    if announce and os.environ.get("LOCAL_RANK", "0") == "0" and _cpu_accelerator() \
            and not os.path.isfile(os.path.join(root, CPU_OP, CPU_OP + ".so")):
        print(f"lillm: building DeepSpeed's CPU communication op into {root} (once per venv, about 2 minutes; "
              "launch/setup_env.sh does it at setup)", file=sys.stderr, flush=True)
    if not os.path.isdir(root):
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


def use_venv_ninja() -> None:
    """Put the ninja of lillm's environment (the `ninja` package DeepSpeed depends on) first on PATH."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != ninja.BIN_DIR:
        os.environ["PATH"] = ninja.BIN_DIR + (os.pathsep + path if path else "")


# Packages whose presence makes DeepSpeed pick another accelerator than CUDA or the CPU.
OTHER_ACCELERATORS = ("intel_extension_for_pytorch", "torch_npu", "torch_sdaa", "habana_frameworks", "torch_mlu")


def name_cpu_accelerator() -> None:
    """Set DS_ACCELERATOR=cpu where DeepSpeed would find nothing but the CPU: its detection otherwise says so
    itself, "Setting accelerator to CPU ...", once in every process that imports it. Left alone when already
    set, on a machine with an NVIDIA driver (/proc/driver/nvidia) or an AMD one (/dev/kfd, ROCm), on macOS
    (Apple's MPS), or when another accelerator's package is installed. Checked from files, without importing
    torch, so that `lillm --help` stays quick; child processes (data workers, ranks) inherit the setting."""
    if "DS_ACCELERATOR" in os.environ or sys.platform == "darwin" \
            or any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/kfd")) \
            or any(importlib.util.find_spec(p) for p in OTHER_ACCELERATORS):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


def _cpu_accelerator() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def build_ops() -> None:
    """Build DeepSpeed's CPU communication op into the venv now (setup time), where CPU ranks load it."""
    use_venv_extensions_dir(announce=False)  # setup_env.sh says it is building
    from deepspeed.accelerator import get_accelerator

    if _cpu_accelerator():
        get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)


if __name__ == "__main__":
    if sys.argv[1:] != ["--build-ops"]:
        sys.exit("usage: python -m lillm.train.ops --build-ops")
    build_ops()
