"""The processes of a run: the process group, this rank's device and logger, the stop signals, and the
collectives the loop reads numbers with."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import signal
import socket
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist

from lillm.errors import JobEnding, UserError, run_command
from lillm.train.metrics import get_logger
from lillm.train.ops import name_cpu_accelerator, remove_shm_buffer, use_venv_extensions_dir, uses_shm_buffers


@dataclasses.dataclass(frozen=True)
class Process:
    """This rank of the run: its index, the number of ranks, its device and its rank-aware logger."""

    rank: int
    world: int
    device: torch.device
    log: logging.Logger


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world_size() -> int:
    """The number of ranks the launcher started (1 for a plain `python`), known before the process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


_LAUNCHERS: list[Any] | None = None  # DeepSpeed launcher processes above this rank, from start_process()


def init_distributed(verbose: bool = False) -> tuple[int, int, int]:
    """Initialise the process group (also for a plain single-process `python launch/pretrain.py`). Unless
    `verbose`, DeepSpeed's print on loading its CPU op is held back (and shown if joining fails)."""
    import deepspeed

    use_venv_extensions_dir()

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    expected = launched_world_size()
    remove_shm_buffer()  # a stale one of an earlier job on this port
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(sys.stdout if verbose else said):
            deepspeed.init_distributed()
    except BaseException as e:
        if port_taken(e):
            port, free = os.environ.get("MASTER_PORT", "?"), _free_port()
            raise UserError(f"the rendezvous port {port} on {os.environ.get('MASTER_ADDR', '?')} is in use (another "
                            f"job on this machine?): launch with a free one, e.g. `deepspeed --master_port {free} "
                            "...` (launch/quickstart.sh and the shipped launch scripts pick one when MASTER_PORT is "
                            "unset)") from None
        sys.stderr.write(said.getvalue())
        raise
    if dist.get_world_size() != expected:
        raise UserError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE says {expected}")
    if uses_shm_buffers():
        if dist.get_world_size() > 1:
            dist.barrier()  # every rank has mapped every rank's shared-memory buffer
        remove_shm_buffer(dist.get_rank())
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def port_taken(error: BaseException) -> bool:
    """Whether joining the process group failed because its rendezvous port belongs to another process."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("EADDRINUSE" in text or "address already in use" in text.lower())


def start_process(verbose: bool = False) -> Process:
    """Join the process group (or reuse the one this process already joined); unless `verbose`, without the
    libraries' chatter (`hide_library_chatter`)."""
    global _LAUNCHERS
    _LAUNCHERS = _launcher_ancestors()  # now, while they are all alive (StopFlag watches them)
    if runner_gone(_LAUNCHERS):  # Ctrl-C killed the `deepspeed` command as it started its launcher
        raise KeyboardInterrupt
    if not verbose:
        hide_library_chatter()
    rank, world, local_rank = init_distributed(verbose)
    return Process(rank, world, local_device(local_rank), get_logger(rank))


def hide_library_chatter() -> None:
    """Hide torch.distributed's deprecation FutureWarnings (`all_gather_into_tensor` and the like): DeepSpeed's
    ZeRO calls those functions, not lillm, and each rank printed them on its first step."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def local_device(local_rank: int) -> torch.device:
    """This rank's device: its GPU under the CUDA accelerator, else the CPU."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        share_cpu_threads()
        return torch.device("cpu")
    device = torch.device(accel.device_name(local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def share_cpu_threads() -> None:
    """CPU ranks split this machine's cores between them, unless OMP_NUM_THREADS says otherwise: torch gives
    each process every core, so N ranks on one machine would otherwise run N x cores threads."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    ranks_here = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)  # deepspeed; torchrun
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // ranks_here))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that ask a run to save and exit: a scheduler's or `kill`'s TERM, Ctrl-C, and the terminal closing
(HUP, sent to every process of the job)."""


class StopFlag:
    """Set by SIGTERM/SIGINT/SIGHUP, or when the `deepspeed` command that started this rank has exited (DeepSpeed's
    launcher dies on SIGTERM without passing it on, so its ranks would otherwise train unattended); the loop
    finishes the step, saves and exits 0. `close()` puts the previous handlers back."""

    def __init__(self) -> None:
        self.signum = 0
        self.reason = ""
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        self._launchers = _LAUNCHERS if _LAUNCHERS is not None else _launcher_ancestors()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.reason = f"received signal {signal.Signals(signum).name}"

    def requested(self) -> bool:
        """Whether to stop after this step (a local check; the loop agrees on it across ranks)."""
        if not self.signum and self._launchers and (not all(_alive(p) for p in self._launchers)
                                                    or runner_gone(self._launchers)):
            self.signum = signal.SIGTERM
            self.reason = "the deepspeed command that started this run has exited"
        return self.signum > 0

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _alive(process: Any) -> bool:
    """Running, and not a zombie (a dead launcher waits as one until whoever started it collects it)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def runner_gone(launchers: list[Any]) -> bool:
    """Whether the `deepspeed` command above DeepSpeed's per-node launcher has died while the launcher lives on:
    the launcher is then an orphan, adopted by init (pid 1, which is not itself a DeepSpeed command). A Ctrl-C in
    the moment the command starts its launcher kills the command and misses the launcher, whose ranks would
    otherwise train on unattended."""
    import psutil

    try:
        nodes = [p for p in launchers if "deepspeed.launcher.launch" in " ".join(p.cmdline()[:4])]
        return any(p.ppid() == 1 and not any("deepspeed" in part for part in psutil.Process(1).cmdline()[:4])
                   for p in nodes)
    except psutil.Error:
        return False


def _launcher_ancestors() -> list[Any]:
    """This process's ancestors that are DeepSpeed launcher processes (none for a plain `python ...`)."""
    import psutil

    try:
        return [p for p in psutil.Process().parents() if any("deepspeed" in part for part in p.cmdline()[:4])]
    except psutil.Error:
        return []


def all_reduce(values: list[Any], device: torch.device, op: Any = None) -> list[float]:
    """Sum (or `op`) numbers over ranks, read back on the host: numbers or 0-dim tensors already on the device.
    A wait for the device: for log, eval and agreement steps only."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """Host numbers as a float64 device tensor without waiting for the device (pinned, asynchronous copy)."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def run_training(name: str, body: Any) -> None:
    """Run a training entry point through `lillm.errors.run_command`, its output unable to stop it
    (`ReaderlessStream`); the process group is torn down either way. DeepSpeed is told it runs on the CPU
    where it has nothing else (`name_cpu_accelerator`), before anything imports it."""
    name_cpu_accelerator()
    sys.stdout, sys.stderr = ReaderlessStream.wrap(sys.stdout), ReaderlessStream.wrap(sys.stderr)

    def guarded() -> Any:
        try:
            return body()
        except RuntimeError as e:  # torch's DistBackendError is one
            if dist.is_initialized() and peer_gone(e):
                raise JobEnding(str(e)) from None
            raise

    run_command(name, guarded, cleanup=lambda: dist.destroy_process_group() if dist.is_initialized() else None)


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "communicator was aborted",
              "NCCL communicator", "is aborted")


def peer_gone(error: BaseException) -> bool:
    """A collective failed because another rank's process ended (gloo's closed or reset connection, NCCL's
    aborted communicator): that rank reports why; this one ends quietly (`JobEnding`)."""
    return any(s in str(error) for s in _PEER_GONE)


class ReaderlessStream:
    """A text stream whose writes never raise once its reader is gone: when output goes through a pipe and
    the reader exits (`| head`, or `| tee` killed by the same Ctrl-C that asks the run to stop), a write raises
    BrokenPipeError, and on a terminal that was closed (SIGHUP) it raises EIO; either would end a rank mid-save.
    From then on output is dropped and the run goes on, so a stop still saves its checkpoint."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False

    @classmethod
    def wrap(cls, stream: Any) -> Any:
        return stream if stream is None or isinstance(stream, cls) else cls(stream)

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):  # a closed pipe, a hung-up terminal (EIO); ValueError: written after close
                self._break()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._break()

    def _break(self) -> None:
        """Drop output from now on; the descriptor goes to /dev/null, so that Python's own flush of what the
        stream still buffers at exit succeeds too (a failed one turns exit status 0 into 120)."""
        self.broken = True
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding ... of the stream underneath
        return getattr(self._stream, name)
