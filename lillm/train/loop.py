"""The training loop, written once: steps, gradient accumulation, the stop flag, logging, evaluation and
checkpoints, for every task.

A task is an `Objective`: it owns its micro-batch stream (the loader), the loss of a micro-batch, its
validation and its text sample. Pretraining, SFT and DPO are three objectives (`lillm.train.pretrain`,
`lillm.train.posttrain`); every `train.*` option means the same in each because this loop is the only
place that reads them. Resume is the `Checkpoint`'s business: the loop registers its stateful parts with it
once and calls `save(step)`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from lillm.errors import UserError
from lillm.train.checkpoint import Checkpoint, check_free_space, checkpoint_bytes, write_run_files
from lillm.train.config import BatchPlan, TrainConfig
from lillm.train.engine import StopFlag, all_reduce
from lillm.train.metrics import MetricsWriter, detect_peak_tflops, format_duration
from lillm.train.schedule import apply_lr

AGREE_EVERY = 10
AGREE_SECONDS = 5.0
"""Outside log, eval and checkpoint steps, the ranks agree on stopping (a signal) and on non-finite losses
every AGREE_EVERY steps, or sooner so that about AGREE_SECONDS of training pass between agreements (from the
step time all ranks measured up to the last one): the only other points where the loop waits for the device.
A signal is answered within max(AGREE_SECONDS, one step), well inside the 30 s DeepSpeed's launcher gives
before it kills a rank; a non-finite loss is found before any checkpoint could hold it."""


class Objective:
    """What a task adds to the loop. Subclasses set the attributes and implement `loss`, `evaluate` and
    `sample`; the other hooks have neutral defaults."""

    name: str
    """'pretrain', 'sft' or 'dpo': the progress bar's label and the checkpoint's objective."""
    loader: Any
    """This rank's endless micro-batch stream; its state_dict/load_state_dict are checkpointed."""
    has_validation: bool
    """False when there is no validation data: evaluation is skipped."""
    flops_per_token: float
    """Training FLOPs per processed token, for MFU."""

    def begin_step(self, micro: list[Any]) -> None:
        """Called with an optimizer step's micro-batches (on the CPU) before their losses (a collective)."""

    def num_tokens(self, batch: Any) -> int:
        """Tokens a micro-batch feeds the model (throughput)."""
        raise NotImplementedError

    def loss(self, engine: Any, batch: Any) -> torch.Tensor:
        """The loss of one micro-batch (on the device), scaled so that DeepSpeed's averaging over
        accumulation steps and ranks yields the step's loss."""
        raise NotImplementedError

    def window_scalars(self) -> dict[str, float]:
        """Task-specific training scalars since the last call (a collective, at every log step)."""
        return {}

    def log_suffix(self, scalars: dict[str, float]) -> str:
        """What the console line adds after the loss."""
        return ""

    def evaluate(self, engine: Any) -> dict[str, float]:
        """Validation scalars, with 'val/loss' among them (a collective; eval mode, no gradients)."""
        raise NotImplementedError

    def sample(self, model: Any) -> str:
        """A short generation from train.sample_prompt (rank 0)."""
        raise NotImplementedError

    def start_scalars(self) -> dict[str, float]:
        """Scalars written once at step 0 (e.g. data statistics)."""
        return {}

    def hparams(self) -> dict[str, Any]:
        """What TensorBoard's hparams table records besides the train section."""
        return {}

    def done_hint(self) -> str:
        """The last log line's advice."""
        return ""


@dataclasses.dataclass
class Progress:
    """Where training stands: optimizer steps taken, tokens fed to the model by all ranks."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


@dataclasses.dataclass
class Window:
    """Sums over the steps since the last log line."""

    t0: float = dataclasses.field(default_factory=time.perf_counter)
    data: float = 0.0  # seconds spent waiting for micro-batches
    steps: int = 0
    tokens: float = 0.0  # all ranks, counted at each agreement
    loss: Any = 0.0  # this rank's step losses: a tensor on the device, read at the log step


@dataclasses.dataclass
class StepRecord:
    """An optimizer step not yet agreed on: what a diagnosis needs, and its losses on the device."""

    step: int
    lr: float
    micro: list[Any]  # the micro-batches, on the CPU
    losses: torch.Tensor  # (grad_accum,) on the device
    tokens: int  # this rank's


@dataclasses.dataclass
class Trainer:
    """Runs an objective on a DeepSpeed engine until train.max_steps, a signal or an error."""

    engine: Any
    optimizer: Any
    objective: Objective
    checkpoint: Checkpoint
    train: TrainConfig
    plan: BatchPlan
    rank: int
    world: int
    device: torch.device
    log: Any
    precision: str
    progress: Progress = dataclasses.field(default_factory=Progress)

    def start(self, config_yaml: str, ds_cfg: dict[str, Any], tokenizer: Any) -> None:
        """Restore the checkpoint chosen by `checkpoint.find` (if any) and open the run directory."""
        self.checkpoint.register(self.engine, progress=self.progress, loader=self.objective.loader)
        if self.checkpoint.restore():
            self.log.info(f"resumed from {self.checkpoint.resume_from} at step {self.progress.step} "
                          f"({self.progress.tokens_seen:,} tokens)")
        run_dir = Path(self.train.run_dir)
        problem = ""
        try:  # every rank checks its own disk (node-local run directories), rank 0 writes; all agree before going on
            check_free_space(run_dir, checkpoint_bytes(self.engine.module), self.train.keep_checkpoints, self.log)
            if self.rank == 0:
                write_run_files(run_dir, config_yaml, ds_cfg, tokenizer)
        except UserError as e:
            problem = str(e)
        if all_reduce([float(bool(problem))], self.device)[0]:
            raise UserError(problem or "another rank could not open the run directory (see its error)")
        self.writer = MetricsWriter(str(run_dir / "tensorboard") if self.rank == 0 and self.train.tensorboard else None,
                                    run_dir / "metrics.jsonl" if self.rank == 0 else None, self.progress.step)
        if self.rank == 0 and self.progress.step == 0:
            self.writer.text("config", "```\n" + config_yaml + "\n```", 0)
            if scalars := self.objective.start_scalars():
                self.writer.scalars(scalars, 0)

    def fit(self) -> int:
        """Train; returns the process exit code (0, or 2 after an error that left the last checkpoint intact)."""
        train, plan, progress = self.train, self.plan, self.progress
        stop, exit_code, last_val = StopFlag(), 0, float("nan")
        self.engine.train()
        batches = iter(self.objective.loader)
        self.bar = tqdm(total=plan.max_steps, initial=progress.step, desc=self.objective.name, unit="step",
                        disable=self.rank != 0, dynamic_ncols=True, mininterval=2.0, file=sys.stderr)
        self.window, self.start_step, self.run_start, self.bad_steps = Window(), progress.step, time.perf_counter(), 0
        self.next_agreement, self.last_agreement = progress.step + 1, time.perf_counter()  # the first step measures
        self.pending: list[StepRecord] = []
        self.finite = None
        hooks = self.gate_gradients() if train.max_bad_steps > 0 else []
        try:
            while progress.step < plan.max_steps:
                lr = apply_lr(self.optimizer, progress.step, train, plan.max_steps)
                warm_up = progress.step == self.start_step and getattr(self.engine, "is_compiled", False)
                t, graphs = time.perf_counter(), compiled_graphs() if warm_up else 0
                self.train_step(batches, lr)
                if warm_up:
                    self.report_compile(time.perf_counter() - t, compiled_graphs() - graphs)
                progress.step += 1
                self.window.steps += 1
                self.bar.update(1)
                last = progress.step == plan.max_steps
                log = progress.step % train.log_interval == 0 or last
                evaluate = self.objective.has_validation and train.eval_interval > 0 and (
                    progress.step % train.eval_interval == 0 or last)
                save = progress.step % train.ckpt_interval == 0 or last
                if not (log or evaluate or save or progress.step >= self.next_agreement):
                    continue  # the device runs ahead: nothing here waits for it
                signalled = self.agree(stop)
                if log:
                    self.log_window(lr)
                if evaluate:
                    last_val = self.evaluate()
                if signalled:
                    self.log.info(f"{stop.reason or 'stopping on another rank'}: saving at step {progress.step} "
                                  "and exiting")
                    self.save()
                    break
                if save:
                    self.save()
                self.last_agreement = time.perf_counter()  # the next step time leaves out logging and saving
        except UserError as e:
            self.log.error(f"error: {e}")
            exit_code = 2
        finally:
            for h in hooks:
                h.remove()
            stop.close()
            self.bar.close()
            self.writer.hparams({**dataclasses.asdict(train), **self.objective.hparams(), "world_size": self.world,
                                 "precision": self.precision}, {"hparam/val_loss": last_val})
            self.writer.close()
        if exit_code == 0:
            self.log.info(f"done at step {progress.step}; {self.objective.done_hint()}")
        return exit_code

    def train_step(self, batches: Iterator[Any], lr: float) -> None:
        """One optimizer step over grad_accum micro-batches, queued without waiting for the device: the
        losses and their finiteness stay there until the next agreement (`agree`)."""
        t = time.perf_counter()
        micro = [next(batches) for _ in range(self.plan.grad_accum)]
        self.window.data += time.perf_counter() - t
        self.objective.begin_step(micro)
        tokens, losses, step_loss = 0, [], 0.0
        for batch in micro:
            tokens += self.objective.num_tokens(batch)
            loss = self.objective.loss(self.engine, batch.to(self.device, non_blocking=True))
            if self.finite is not None:
                self.finite.copy_(torch.isfinite(loss.detach()))  # what the gradient gates read
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            value = loss.detach().double()
            step_loss = step_loss + value.nan_to_num(0.0, 0.0, 0.0) / self.plan.grad_accum  # a skipped one adds 0
            losses.append(value)
        self.window.loss = self.window.loss + step_loss
        self.pending.append(StepRecord(self.progress.step, lr, micro, torch.stack(losses), tokens))

    def report_compile(self, seconds: float, graphs: int) -> None:
        """The torch.compile warm-up (the first step compiles on the host), and whether anything compiled."""
        if graphs:
            self.log.info(f"torch.compile warm-up: the first step took {seconds:.1f}s ({graphs} graph(s) compiled)")
        else:
            self.log.warning("torch.compile compiled nothing (see the warnings above): training runs eagerly")

    def gate_gradients(self) -> list[Any]:
        """With train.max_bad_steps > 0: every parameter's gradient passes through a gate that zeroes it for a
        micro-batch whose loss is not finite, so a skipped micro-batch changes nothing, decided on the device."""
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)
        return [p.register_hook(lambda g: g.where(self.finite, 0.0))
                for p in self.engine.module.parameters() if p.requires_grad]

    def agree(self, stop: StopFlag) -> bool:
        """The ranks' one collective outside log and eval steps, and the loop's one wait for the device: the
        stop flag, the token count, this rank's step time and which pending micro-batches had a non-finite
        loss, summed over ranks. Returns whether to stop; raises past train.max_bad_steps."""
        pending, self.pending = self.pending, []
        now = time.perf_counter()
        step_time = (now - self.last_agreement) / len(pending) / self.world
        head = torch.tensor([float(stop.requested()), sum(r.tokens for r in pending), step_time], dtype=torch.float64)
        bad = (~torch.cat([r.losses for r in pending]).isfinite()).double()  # (steps x grad_accum,)
        totals = torch.cat([head.to(self.device), bad])
        if dist.is_initialized():
            dist.all_reduce(totals)
        signalled, tokens, step_time, *bad_micro = totals.tolist()
        self.progress.tokens_seen += int(tokens)
        self.window.tokens += tokens
        gas = self.plan.grad_accum
        for i, record in enumerate(pending):
            if count := sum(n > 0 for n in bad_micro[i * gas : (i + 1) * gas]):
                self.skip_or_stop(record, count)
        # Every rank derives the same next agreement from the same summed numbers.
        interval = int(AGREE_SECONDS / max(step_time, 1e-9))
        self.next_agreement = self.progress.step + max(1, min(AGREE_EVERY, interval))
        return signalled > 0

    def skip_or_stop(self, record: StepRecord, count: int) -> None:
        """Count a step's micro-batches with a non-finite loss on any rank; past train.max_bad_steps, each rank
        that had one saves it for diagnosis, and training stops."""
        self.bad_steps += count
        if self.bad_steps > self.train.max_bad_steps:
            diag = Path(self.train.run_dir) / f"nonfinite_step{record.step}_rank{self.rank}.pt"
            finite = record.losses.isfinite().tolist()
            if False in finite:
                k = finite.index(False)
                diag.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"step": record.step, "batch": record.micro[k], "loss": float(record.losses[k]),
                            "lr": record.lr}, diag)
            raise UserError(f"non-finite loss at step {record.step} (lr {record.lr:.3g}); the batch is saved in "
                            f"{diag.with_name(f'nonfinite_step{record.step}_rank*.pt')} by the rank(s) that had it; "
                            "the last checkpoint is untouched. Lower train.lr or raise train.max_bad_steps to skip "
                            "batches")
        self.log.warning(f"step {record.step}: {count} micro-batch(es) with a non-finite loss skipped "
                         f"({self.bad_steps} so far)")

    def log_window(self, lr: float) -> None:
        """Scalars to TensorBoard and metrics.jsonl, and one console line (a collective)."""
        w, step, max_steps = self.window, self.progress.step, self.plan.max_steps
        elapsed = time.perf_counter() - w.t0
        loss_avg = all_reduce([w.loss / w.steps], self.device)[0] / self.world
        tok_s = w.tokens / elapsed
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        scalars = {"train/loss": loss_avg, "train/lr": lr, "train/grad_norm": grad_norm, "perf/tokens_per_s": tok_s,
                   "perf/step_time_s": elapsed / w.steps, "perf/data_wait_frac": w.data / elapsed,
                   "train/tokens_seen": self.progress.tokens_seen, **self.objective.window_scalars()}
        peak = detect_peak_tflops(self.train.peak_tflops)
        mfu = tok_s * self.objective.flops_per_token / (peak * 1e12 * self.world) if peak else None
        if mfu is not None:
            scalars["perf/mfu"] = mfu
        if self.device.type == "cuda":
            scalars["perf/max_mem_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.writer.scalars(scalars, step)
        done = step - self.start_step
        eta = (time.perf_counter() - self.run_start) / done * (max_steps - step) if done else 0
        if self.rank == 0:
            self.bar.write(
                f"step {step}/{max_steps} | loss {loss_avg:.4f}{self.objective.log_suffix(scalars)} | lr {lr:.2e} | "
                f"gnorm {grad_norm:.2f} | {tok_s:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu is not None else "")
                + f" | data {w.data / elapsed:.1%} | eta {format_duration(eta)}",
                file=sys.stdout,
            )
        self.window = Window()

    def evaluate(self) -> float:
        """Validation (and a text sample on rank 0); returns the validation loss."""
        step = self.progress.step
        self.engine.eval()
        with torch.no_grad():
            vals = self.objective.evaluate(self.engine)
        self.engine.train()
        self.writer.scalars(vals, step)
        self.log.info(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in vals.items()))
        if self.rank == 0 and self.train.sample_tokens:
            sample = self.objective.sample(self.engine.module)
            self.writer.text("samples", "```\n" + sample + "\n```", step)  # TensorBoard renders Markdown
            self.log.info(f"sample @ step {step}: {sample!r}")
        return vals["val/loss"]

    def save(self) -> None:
        path = self.checkpoint.save(self.progress.step)
        self.log.info(f"saved checkpoint {path}")


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))
