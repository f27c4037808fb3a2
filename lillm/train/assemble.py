"""One run assembly: a task and its configuration in, a ready `Trainer` out, restored when resuming.

An entry point (`lillm.train.pretrain`, `lillm.train.posttrain`) brings what is its own as a `Task`: the
model (built, not yet under an engine), its tokenizer, the run's identity, and how to make its objective
once the ranks exist. The rest is the same for every task and happens here, in this order:

1. the batch plan, the filled DeepSpeed JSON and the evaluation tasks' items: every input is checked
   before the process group exists, so bad input fails in a second on every rank;
2. the process group, and the run directory's lock (one run at a time in it, taken by rank 0); the task's
   collective data check, if it has one;
3. the resume plan (which checkpoint, loaded how), from which the engine's config is derived;
4. the engine, the objective, and the checkpoint holding the run's stateful parts, restored;
5. the run directory: room for a checkpoint, the run files (the filled JSON as it ran), the metrics writer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from lillm.errors import PeerRefusal, UserError
from lillm.model import LilLM
from lillm.tokenizer import Tokenizer
from lillm.train.checkpoint import Checkpoint, RunIdentity, plan_resume
from lillm.train.config import BatchPlan, TrainConfig, plan_batches
from lillm.train.dist import Process, all_reduce, launched_world_size, start_process
from lillm.train.downstream import TaskEvaluation
from lillm.train.ds_config import fill_ds_config, precision
from lillm.train.engine import build_engine, optimizer_summary
from lillm.train.loop import Objective, Progress, Trainer
from lillm.train.rundir import RunLock, open_run_dir, refuse_fresh_start_over_checkpoints


@dataclasses.dataclass
class Task:
    """What an entry point brings to a run."""

    model: LilLM
    """The model to train, initialised or loaded (with LoRA applied), on the CPU."""
    tokenizer: Tokenizer
    identity: RunIdentity
    seq_len: int
    """Tokens per training row."""
    make_objective: Callable[[Process, BatchPlan, Any], Objective]
    """(this rank, the batch plan, the engine) -> the task's objective with its loader."""
    describe: Callable[[Trainer], str]
    """The task's part of the start-up line."""
    check_data: Callable[[Process], None] | None = None
    """A collective check of the data once the ranks exist (pretraining's `--data.verify`), before the engine."""


def assemble(task: Task, train: TrainConfig, ds_path: str, raw_ds: dict[str, Any], config_yaml: str) -> Trainer:
    """Everything a run needs, restored from its checkpoint when resuming; `.fit()` trains. `raw_ds` is the
    DeepSpeed JSON read from `ds_path` (the entry point reads it first, so a bad path fails first)."""
    plan = plan_batches(train, task.seq_len, launched_world_size())
    ds_cfg = fill_ds_config(raw_ds, train, plan, ds_path)
    downstream = TaskEvaluation(train, task.tokenizer, task.model.config.max_seq_len, task.model.config.vocab_size)
    refuse_fresh_start_over_checkpoints(train.run_dir, train.resume)
    process = start_process(train.verbose)
    lock = lock_run_dir(train.run_dir, process)
    try:
        return _assemble(task, train, ds_path, ds_cfg, config_yaml, plan, downstream, process, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def lock_run_dir(run_dir: str, process: Process) -> RunLock | None:
    """Rank 0 takes the run directory's lock; a refusal there stops every rank (a collective)."""
    lock, problem = RunLock(run_dir, process.log) if process.rank == 0 else None, ""
    if lock is not None:
        try:
            lock.acquire()
        except UserError as e:
            problem = str(e)
    if all_reduce([float(bool(problem))], process.device)[0]:
        if problem:
            raise UserError(problem)
        raise PeerRefusal("the run directory is in use by another run (see rank 0's error)")
    return lock


def _assemble(task: Task, train: TrainConfig, ds_path: str, ds_cfg: dict[str, Any], config_yaml: str,
              plan: Any, downstream: TaskEvaluation, process: Process, lock: RunLock | None) -> Trainer:
    if task.check_data is not None:
        task.check_data(process)
    resume = plan_resume(train.resume, train.run_dir, task.identity, process.world, ds_cfg)
    for line in resume.warnings:
        process.log.warning(line)
    for line in resume.notes:
        process.log.info(line)
    engine, optimizer = build_engine(task.model, train, ds_cfg, ds_path, process.device, resume.load_universal)
    optimizer_line = optimizer_summary(task.model, train)
    objective = task.make_objective(process, plan, engine)
    progress = Progress()
    checkpoint = Checkpoint(train.run_dir, task.identity, config_yaml, train.keep_checkpoints, process.rank,
                            process.world, engine, progress=progress, loader=objective.loader)
    if checkpoint.restore(resume):
        process.log.info(f"resumed from {resume.tag_dir} at step {progress.step} ({progress.tokens_seen:,} tokens)")
    writer = open_run_dir(train.run_dir, process, model=engine.module, keep=train.keep_checkpoints,
                          config_yaml=config_yaml, ds_cfg=ds_cfg, tokenizer=task.tokenizer,
                          tensorboard=train.tensorboard, step=progress.step)
    if progress.step == 0 and (scalars := objective.start_scalars()):
        writer.scalars(scalars, 0)
    trainer = Trainer(engine, objective, checkpoint, train, plan, process, precision(ds_cfg), progress, writer,
                      optimizer, downstream)
    trainer.run_lock = lock
    stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
    process.log.info(f"lillm {task.describe(trainer)}; {process.world} rank(s) on {process.device.type}, "
                     f"{trainer.precision}, ZeRO stage {stage}, {optimizer_line}")
    return trainer
