"""DeepSpeed's JIT-built ops: where they are built (once per venv) and the build lock that must not wedge a launch.

    python -m lillm.train.ops --build-ops    # what launch/setup_env.sh runs on a CPU machine
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import socket
import sys
import time
from collections.abc import Iterator

from lillm.errors import UserError

CPU_OP = "deepspeed_shm_comm"  # the op DeepSpeed's CPU accelerator JIT-builds for its collectives
BUILD_LOCK = "lillm-build.lock"
"""lillm's own lock around loading (and so building) an op, in the extensions directory: an OS lock (flock) that
dies with its holder, so a killed builder never blocks a later launch. The file records the holder."""
WAIT_ENV = "LILLM_OP_BUILD_WAIT_S"
WAIT_S = 900.0  # building DeepSpeed's CPU op takes about 2 minutes on 2 cores; a holder past this is stuck
REPORT_EVERY_S = 10.0  # a wait is reported after this, and again as often (a sibling rank's load takes ~1 s)


def use_venv_extensions_dir(announce: bool = True) -> None:
    """Point DeepSpeed's JIT-built ops at <venv>/torch_extensions (where `launch/setup_env.sh` builds them
    once), unless TORCH_EXTENSIONS_DIR is set; build them with the venv's ninja whatever PATH says; and, with
    the CPU accelerator, load the CPU op now under `build_lock` (building it, and saying so, if needed).

    Why one ninja: torch runs `ninja` from PATH, and ninja versions read each other's build logs as foreign,
    so a build made with the system's ninja (setup with the plain PATH) is rebuilt from scratch by the venv's
    (an activated venv, the quickstart), and back again, two to three minutes each time.

    Why the lock: torch's own build lock is a bare file that a process killed while building leaves behind,
    and every later load then waits for it forever. Every lillm process loads the op under `build_lock`
    first, so a torch lock found while holding it belongs to nobody and is removed; DeepSpeed's own load,
    later, finds the op built.
    """
    use_venv_ninja()
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None and os.access(sys.prefix, os.W_OK):
        root = os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    if root is None or not _cpu_accelerator():
        return
    with build_lock(root):
        if announce and os.environ.get("LOCAL_RANK", "0") == "0" \
                and not os.path.isfile(os.path.join(root, CPU_OP, CPU_OP + ".so")):
            print(f"lillm: building DeepSpeed's CPU communication op into {root} (once per venv, about 2 minutes; "
                  "launch/setup_env.sh does it at setup)", file=sys.stderr, flush=True)
        _load_cpu_op()


@contextlib.contextmanager
def build_lock(root: str, wait_s: float | None = None) -> Iterator[None]:
    """Hold lillm's op-build lock in `root` (see BUILD_LOCK); on the way in, remove the torch build locks that
    no live process holds. A wait for another holder says who it is every REPORT_EVERY_S seconds and ends with
    a UserError after `wait_s` (default: $LILLM_OP_BUILD_WAIT_S, else WAIT_S)."""
    wait_s = float(os.environ.get(WAIT_ENV, WAIT_S)) if wait_s is None else wait_s
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, BUILD_LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        start = last_report = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited > wait_s:
                    raise UserError(f"waited {waited:.0f} s for the DeepSpeed op build lock {path}, held by "
                                    f"{_holder(fd)}: if that process is stuck, end it and launch again") from None
                if time.monotonic() - last_report >= REPORT_EVERY_S:
                    print(f"lillm: waiting {waited:.0f} s so far for a DeepSpeed op build by {_holder(fd)} "
                          f"({path}; at most {wait_s:.0f} s)", file=sys.stderr, flush=True)
                    last_report = time.monotonic()
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        _remove_orphaned_torch_locks(root)
        yield
    finally:
        os.close(fd)  # releases the flock


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    except OSError:
        return "another process"


def _remove_orphaned_torch_locks(root: str) -> None:
    """torch's build locks under `root`, found while holding BUILD_LOCK: their builders were killed mid-build."""
    for entry in os.scandir(root):
        lock = os.path.join(entry.path, "lock")
        if entry.is_dir() and os.path.exists(lock):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            print(f"lillm: removed a DeepSpeed build lock that no process holds ({lock}: its build was "
                  "interrupted); the op is rebuilt if needed", file=sys.stderr, flush=True)


def _load_cpu_op() -> None:
    """Load (and if needed build) the op as DeepSpeed's TorchBackend will, where DeepSpeed counts it usable."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)


SHM_DIR = "/dev/shm"


def shm_buffer_path(rank: int | None = None) -> str | None:
    """Where DeepSpeed's CPU op keeps this rank's all-reduce buffer: it `shm_open`s
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (about 70 MB) when every rank of the job
    is on one machine, and never removes it. None where there is no such name (no /dev/shm, no rendezvous)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if not addr or not port or not os.path.isdir(SHM_DIR):
        return None
    return os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def remove_shm_buffer(rank: int | None = None) -> None:
    """Remove this rank's shared-memory buffer name (see `shm_buffer_path`), with the CPU accelerator.

    Before joining the process group: a buffer of this rank's name left by an earlier job on the same address and
    port (one killed while it started) is stale. Were it left, a peer could map it before this rank
    rewrites it and read old collective flags in its first all-reduce: a wrong sum or a rank spinning forever.
    No peer maps it yet: peers open each other's buffers only after the rendezvous, which waits for this rank.

    After joining, once every rank has mapped every buffer (`init_distributed` passes a barrier first): the
    mappings live on until the ranks exit, however they end, and the kernel frees the memory then; left named,
    every launch would keep its buffers in RAM (/dev/shm) until the machine restarts."""
    path = shm_buffer_path(rank)
    if path is not None and _cpu_accelerator():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def uses_shm_buffers() -> bool:
    """Whether DeepSpeed's CPU op may have made shared-memory buffers for this job (the same on every rank)."""
    return shm_buffer_path(0) is not None and _cpu_accelerator()


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


if __name__ == "__main__":
    if sys.argv[1:] != ["--build-ops"]:
        sys.exit("usage: python -m lillm.train.ops --build-ops")
    build_ops()
