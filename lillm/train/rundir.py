"""The run directory's chores at the start of a run: one run at a time (`RunLock`), room for a checkpoint,
the run files, the metrics writer.

Every rank checks its own disk (run directories may be node-local), rank 0 writes the files, and all ranks
agree before training starts, so a refusal on one rank stops every rank with its message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch

from lillm.errors import PeerRefusal, UserError
from lillm.files import write_atomic
from lillm.runs import LATEST, checkpoints_dir, tensorboard_dir
from lillm.train.dist import Process, all_reduce
from lillm.train.metrics import MetricsWriter


def open_run_dir(run_dir: str, process: Process, *, model: torch.nn.Module, keep: int, config_yaml: str,
                 ds_cfg: dict[str, Any], tokenizer: Any, tensorboard: bool, step: int) -> MetricsWriter:
    """Check the disk, write the run files (rank 0) and open the metrics writer at `step` (a collective)."""
    run_dir = Path(run_dir)
    problem = ""
    try:
        check_free_space(run_dir, checkpoint_bytes(model), keep, process.log)
        if process.rank == 0:
            write_run_files(run_dir, config_yaml, ds_cfg, tokenizer)
    except UserError as e:
        problem = str(e)
    if all_reduce([float(bool(problem))], process.device)[0]:
        if problem:
            raise UserError(problem)
        raise PeerRefusal("another rank could not open the run directory (see its error)")
    rank0 = process.rank == 0
    writer = MetricsWriter(str(tensorboard_dir(run_dir)) if rank0 and tensorboard else None,
                           run_dir / "metrics.jsonl" if rank0 else None, step)
    if rank0 and step == 0:
        writer.text("config", "```\n" + config_yaml + "\n```", 0)
    return writer


def write_run_files(run_dir: Path, config_yaml: str, ds_cfg: dict[str, Any], tokenizer: Any) -> None:
    """The resolved configuration, the filled ds_config (the JSON that ran, every "auto" filled) and the tokenizer,
    next to the checkpoints (rank 0)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.yaml", config_yaml)
        write_atomic(run_dir / "ds_config.json", json.dumps(ds_cfg, indent=2) + "\n")
        tokenizer.save(run_dir / "tokenizer")
    except OSError as e:
        raise UserError(f"{e.filename or run_dir}: cannot write the run directory ({e.strerror or e})") from None


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About how much one checkpoint takes: per trainable parameter, fp32 master weights and two Adam moments
    (12 bytes) and the module's own copy (frozen weights, a LoRA base, are not saved)."""
    return sum((12 + p.element_size()) * p.numel() for p in model.parameters() if p.requires_grad)


def check_free_space(run_dir: Path, needed: int, keep: int, log: Any) -> None:
    """Refuse to start a run whose first checkpoint cannot fit on the run directory's disk (better now than
    after hours of training); warn when `keep` checkpoints plus the one being written will not."""
    where = run_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # nothing to measure on (a permission, an odd mount): the save reports its own failure
    if free < needed:
        raise UserError(f"{run_dir}: {free / 2**20:,.1f} MiB free on its disk, but a checkpoint of this model "
                        f"needs about {needed / 2**20:,.1f} MiB; free some space or choose another --train.run_dir")
    if free < (keep + 1) * needed:
        log.warning(f"{run_dir}: {free / 2**20:,.1f} MiB free holds fewer than train.keep_checkpoints + 1 = "
                    f"{keep + 1} checkpoints of about {needed / 2**20:,.1f} MiB")


LOCK = "lillm.lock"
HEARTBEAT_S = 30.0
"""How often the owner of a run directory touches its lock file."""
STALE_S = 300.0
"""A lock whose owner is on another host and has not touched it for this long is stale (its host died, or the
run was killed there); on the owner's own host, whether its process is alive decides at once."""


class RunLock:
    """One run per run directory: `run_dir/lillm.lock` holds the owner's host, pid, the pid's start time and
    the run's start, and is touched every HEARTBEAT_S seconds. A second run is refused in one line naming the
    owner. A lock is stale, and taken over with a note, when its owner's process is gone (same host: the pid is
    not running, or is another process now) or its heartbeat stopped (another host: untouched for STALE_S, for
    a run directory on a shared filesystem). Taken by rank 0 before anything is written; released at the end."""

    def __init__(self, run_dir: str | os.PathLike, log: Any = None) -> None:
        self.path = Path(run_dir) / LOCK
        self.log = log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owned = False
        self._created: list[Path] = []

    @staticmethod
    def _me() -> dict[str, Any]:
        import psutil

        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": psutil.Process().create_time(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def acquire(self) -> None:
        """Take the lock or raise UserError naming the run that holds it."""
        missing = self.path.parent
        while not missing.exists() and missing != missing.parent:
            self._created.append(missing)  # deepest first: removed again if a refusal leaves them empty
            missing = missing.parent
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{e.filename or self.path.parent}: cannot create the run directory "
                            f"({e.strerror or e})") from None
        me = self._me()
        for _ in range(3):  # a lost race with another starter, or a stale lock taken over
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                owner = self._read()
                if owner is not None and (owner.get("host"), owner.get("pid"), owner.get("pid_started")) == \
                        (me["host"], me["pid"], me["pid_started"]):
                    break  # this process's own (a run that ended without releasing it, in-process)
                if why := self._stale(owner):
                    if self.log is not None:
                        self.log.warning(f"{self.path}: taking over the lock of {self._describe(owner)} ({why})")
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise UserError(f"{self.path.parent} is in use by {self._describe(owner)} (lock {self.path}): wait "
                                "for it to end, or choose another --train.run_dir; if that run is gone for good, "
                                "delete the lock file") from None
            except OSError as e:
                raise UserError(f"{self.path}: cannot write the run directory's lock ({e.strerror or e})") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            break
        else:
            raise UserError(f"{self.path}: could not take the run directory's lock (another run keeps taking it)")
        self._owned = True
        self._thread = threading.Thread(target=self._heartbeat, name="lillm-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Remove the lock if this process holds it, and the directories `acquire` made if they are empty."""
        self._stop.set()
        if self._owned:
            self._owned = False
            owner = self._read()
            if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                with contextlib.suppress(OSError):
                    self.path.unlink()
        for d in self._created:  # a run refused after taking the lock leaves no empty directory behind
            with contextlib.suppress(OSError):
                d.rmdir()
        self._created = []

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _read(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None

    def _stale(self, owner: dict[str, Any] | None) -> str:
        """Why the lock's owner is gone ('' while it may be alive)."""
        import psutil

        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was just released"
        if owner is None:
            # Unreadable: a starter between creating and writing it, or damage; only an old one is stale.
            return f"an unreadable lock untouched for {age:.0f} s" if age > STALE_S else ""
        if owner.get("host") == socket.gethostname():
            try:
                proc = psutil.Process(int(owner.get("pid", -1)))
                if abs(proc.create_time() - float(owner.get("pid_started", 0))) > 1.0:
                    return "its pid now belongs to another process"
                if proc.status() == psutil.STATUS_ZOMBIE:
                    return "its process has exited"
                return ""
            except (psutil.NoSuchProcess, ValueError, TypeError):
                return "its process is gone"
            except psutil.Error:
                return ""
        return f"no heartbeat for {age:.0f} s" if age > STALE_S else ""

    @staticmethod
    def _describe(owner: dict[str, Any] | None) -> str:
        if owner is None:
            return "another run"
        return f"the run of pid {owner.get('pid')} on {owner.get('host')} started {owner.get('started')}"


def refuse_fresh_start_over_checkpoints(run_dir: str | os.PathLike, resume: str) -> None:
    """train.resume none into a directory that holds another run's checkpoints would mix two runs in it (its
    latest, its run files and metrics): refused, with the ways out."""
    ckpts = checkpoints_dir(run_dir)
    if resume != "none" or not ckpts.is_dir():
        return
    tags = sorted(p.name for p in ckpts.iterdir() if p.is_dir() and (p / "lillm.json").is_file())
    if tags or (ckpts / LATEST).is_file():
        held = ", ".join(tags[-3:]) or LATEST
        raise UserError(f"train.resume none, but {run_dir} holds another run's checkpoints ({held}): choose another "
                        f"--train.run_dir, resume it (train.resume auto), or delete {ckpts} to start afresh there")
