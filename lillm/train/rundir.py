"""The run directory's chores at the start of a run: room for a checkpoint, the run files, the metrics writer.

Every rank checks its own disk (run directories may be node-local), rank 0 writes the files, and all ranks
agree before training starts, so a refusal on one rank stops every rank with its message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lillm.errors import UserError
from lillm.files import write_atomic
from lillm.runs import tensorboard_dir
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
        raise UserError(problem or "another rank could not open the run directory (see its error)")
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
