"""Rank-aware logging and metrics: one logger that speaks on rank 0, a small writer interface."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
from tqdm import tqdm

from lillm.errors import UserError

# Dense bf16 peak TFLOP/s per device, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0, "L4": 121.0,
               "A10G": 125.0, "4090": 165.0}


def get_logger(rank: int) -> logging.Logger:
    """The `lillm` logger: INFO on rank 0, warnings only elsewhere."""
    log = logging.getLogger("lillm")
    if not log.handlers:
        handler = BarAwareHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return log


class BarAwareHandler(logging.StreamHandler):
    """Writes each record through `tqdm.write`: a line logged while the training bar is drawn (an eval, a
    sample, a save) then gets a line of its own, the bar cleared and redrawn under it, instead of being
    glued to the bar's end."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def detect_peak_tflops(configured: float) -> float:
    """Peak TFLOP/s per device for MFU: the configured value, else a known GPU's, else 0 (no MFU)."""
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return 0.0


class MetricsWriter:
    """TensorBoard (when given a directory) and a metrics.jsonl mirror (when given a file) on rank 0; a no-op
    everywhere else."""

    def __init__(self, log_dir: str | None, jsonl: str | os.PathLike | None = None, resume_step: int = 0) -> None:
        """resume_step > 0 (a resumed run): what an earlier attempt logged after that step, the steps about to
        be replayed, is dropped from metrics.jsonl and hidden in TensorBoard, so each step shows once."""
        self.tb, self.jsonl, self.log_dir = None, jsonl, log_dir
        if jsonl is not None and resume_step and os.path.isfile(jsonl):
            _truncate_after(jsonl, resume_step)
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_thread_errors()
            with self._writing_events():
                self.tb = SummaryWriter(log_dir, purge_step=resume_step + 1 if resume_step else None)

    @contextlib.contextmanager
    def _writing_events(self) -> Iterator[None]:
        """A TensorBoard write that fails (a full disk, a directory made read-only) ends the run with one line
        naming the directory; TensorBoard's writer thread keeps its error for the next call, which raises it."""
        try:
            yield
        except OSError as e:
            raise UserError(f"{self.log_dir}: {e.strerror or e} (writing TensorBoard events)") from None

    def scalars(self, values: dict[str, float], step: int) -> None:
        """One row of scalars at `step`: TensorBoard events and a JSON line {"step": ..., **values}. A row that
        cannot be written whole (a full disk) is cut back off, so metrics.jsonl never ends in a partial line."""
        if self.tb is not None:
            with self._writing_events():
                for k, v in values.items():
                    self.tb.add_scalar(k, v, step)
        if self.jsonl is not None:
            size = os.path.getsize(self.jsonl) if os.path.isfile(self.jsonl) else 0
            try:
                with open(self.jsonl, "a") as fh:
                    fh.write(json.dumps({"step": step, **values}) + "\n")
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.truncate(self.jsonl, size)
                raise UserError(f"{self.jsonl}: {e.strerror or e}") from None

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            with self._writing_events():
                self.tb.add_text(tag, text, step)

    def hparams(self, hparams: dict[str, Any], metrics: list[str]) -> None:
        """TensorBoard's hparams table: this run's settings, against the last value of each scalar series named
        in `metrics` (which TensorBoard reads from the run's own series: no extra card, no NaN placeholder)."""
        if self.tb is not None:
            from torch.utils.tensorboard.summary import hparams as hparams_summaries

            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            with self._writing_events():
                for summary in hparams_summaries(clean, dict.fromkeys(metrics, 0.0)):
                    self.tb.file_writer.add_summary(summary)

    def flush(self) -> None:
        if self.tb is not None:
            with self._writing_events():
                self.tb.flush()

    def close(self) -> None:
        """Close the event files; an error here (the disk that failed a write before) is not reported again."""
        if self.tb is not None:
            tb, self.tb = self.tb, None
            with contextlib.suppress(OSError):
                tb.close()


_default_thread_hook = None


def _quiet_tensorboard_thread_errors() -> None:
    """TensorBoard writes events from a thread that re-raises a failed write (OSError) after keeping it for the
    writer's next call, so Python prints a thread traceback; the next call reports it in one line instead
    (`MetricsWriter._writing_events`). Other threads' errors print as before."""
    global _default_thread_hook
    if _default_thread_hook is not None:
        return
    _default_thread_hook = threading.excepthook

    def hook(args: Any) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return
        _default_thread_hook(args)

    threading.excepthook = hook


def _truncate_after(path: str | os.PathLike, step: int) -> None:
    """Keep the rows of a metrics.jsonl up to `step` (and any unreadable tail is dropped), atomically."""
    from lillm.files import write_atomic

    kept = []
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by a crash
            if row.get("step", 0) > step:
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, "".join(kept))


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
