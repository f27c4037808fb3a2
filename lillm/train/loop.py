"""The training loop, written once: steps, gradient accumulation, the stop flag, logging, evaluation and
checkpoints, for every task.

A task is an `Objective`: it owns its micro-batch stream (the loader), the loss of a micro-batch, its
validation and its text sample. Pretraining, SFT and DPO are three objectives (`lillm.train.pretrain`,
`lillm.train.posttrain`); every `train.*` option means the same in each because this loop is the only
place that reads them. `Cadence` decides at which steps the loop stops to log, evaluate, save or agree;
`Checkpoint` saves. A `Trainer` is assembled by `lillm.train.assemble`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from lillm.errors import UserError
from lillm.train.checkpoint import Checkpoint
from lillm.train.config import BatchPlan, TrainConfig
from lillm.train.dist import Process, StopFlag, all_reduce
from lillm.train.metrics import MetricsWriter, detect_peak_tflops, format_duration
from lillm.train.rundir import RunLock
from lillm.train.schedule import apply_lr
from lillm.train.watchdog import Watchdog

AGREE_EVERY = 10
ETA_WINDOWS = 5  # log intervals the ETA's pace is taken over
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

    t0: float
    data: float = 0.0  # seconds spent waiting for micro-batches
    steps: int = 0
    tokens: float = 0.0  # all ranks, counted at each agreement
    loss: Any = 0.0  # this rank's step losses: a tensor on the device, read at the log step


class Pace:
    """The ETA of the log line: seconds left at the pace of the last few log intervals (evaluations and saves
    included, as they will be again). The first interval holds the warm-up (the first step, a compile), so it
    counts only until there is another."""

    def __init__(self, t0: float, step0: int) -> None:
        self._marks: collections.deque[tuple[float, int]] = collections.deque([(t0, step0)], maxlen=ETA_WINDOWS)
        self._warm_up = True

    def eta(self, now: float, step: int, max_steps: int) -> float:
        """Seconds left at a log line at `step`; the line is remembered as a mark of the pace."""
        t0, s0 = self._marks[0]
        if self._warm_up:
            self._marks.clear()
            self._warm_up = False
        self._marks.append((now, step))
        return (now - t0) / (step - s0) * (max_steps - step) if step > s0 else 0.0


@dataclasses.dataclass
class StepRecord:
    """An optimizer step not yet agreed on: what a diagnosis needs, and its losses on the device."""

    step: int
    lr: float
    micro: list[Any]  # the micro-batches, on the CPU
    losses: torch.Tensor  # (grad_accum,) on the device
    tokens: int  # this rank's


@dataclasses.dataclass
class Stops:
    """What the loop does after a step besides training on."""

    log: bool
    evaluate: bool
    save: bool
    agree: bool

    def any(self) -> bool:
        return self.log or self.evaluate or self.save or self.agree


@dataclasses.dataclass
class Cadence:
    """At which steps the loop logs, evaluates, saves and agrees: train.*_interval, the last step, and the
    agreements between them (see AGREE_EVERY)."""

    max_steps: int
    log_interval: int
    eval_interval: int
    ckpt_interval: int
    has_validation: bool
    agree_every: int = AGREE_EVERY
    agree_seconds: float = AGREE_SECONDS

    @classmethod
    def of(cls, train: TrainConfig, max_steps: int, has_validation: bool) -> Cadence:
        return cls(max_steps, train.log_interval, train.eval_interval, train.ckpt_interval, has_validation)

    def after(self, step: int, next_agreement: int) -> Stops:
        """What follows optimizer step `step` (1-based: the steps taken so far)."""
        last = step == self.max_steps
        return Stops(log=step % self.log_interval == 0 or last,
                     evaluate=self.has_validation and self.eval_interval > 0 and (step % self.eval_interval == 0
                                                                                 or last),
                     save=step % self.ckpt_interval == 0 or last, agree=step >= next_agreement)

    def next_agreement(self, step: int, step_time: float) -> int:
        """The step of the next agreement after one at `step`, from the step time all ranks measured (so every
        rank derives the same)."""
        return step + max(1, min(self.agree_every, int(self.agree_seconds / max(step_time, 1e-9))))


class Hooks:
    """Points where a caller (a test, a profiler) may watch the loop; the defaults do nothing."""

    def before_step(self, trainer: Trainer) -> None:
        """At the top of every loop iteration, before the learning rate is set."""

    def after_agreement(self, trainer: Trainer) -> None:
        """After the ranks agreed (at progress.step)."""


@dataclasses.dataclass
class LoopState:
    """What `fit` keeps between steps (Progress, which is checkpointed, apart)."""

    start_step: int
    run_start: float
    window: Window
    next_agreement: int
    last_agreement: float
    pending: list[StepRecord] = dataclasses.field(default_factory=list)
    """Optimizer steps queued on the device and not yet agreed on."""
    bad_steps: int = 0
    """Micro-batches with a non-finite loss skipped so far."""
    start_tokens: int = 0
    """Tokens seen when this session started (a resumed run's count from before is not this session's)."""
    best_val: dict[str, float] = dataclasses.field(default_factory=dict)
    """The evaluation with the lowest val/loss so far, with its "step"."""
    last_saved: str | None = None
    """The checkpoint this session saved last."""
    pace: Pace | None = None


class Trainer:
    """Runs an objective on a DeepSpeed engine until train.max_steps, a signal or an error.

    `cadence`, `hooks` and `clock` may be replaced before `fit` (tests do); everything else is the run's."""

    def __init__(self, engine: Any, objective: Objective, checkpoint: Checkpoint, train: TrainConfig,
                 plan: BatchPlan, process: Process, precision: str, progress: Progress, writer: MetricsWriter,
                 optimizer: Any, downstream: Callable[[Any, Process], dict[str, float]] | None = None) -> None:
        self.engine, self.objective, self.checkpoint, self.train, self.plan = engine, objective, checkpoint, train, plan
        self.process, self.precision, self.progress, self.writer = process, precision, progress, writer
        self.optimizer = optimizer
        self.downstream = downstream  # train.eval_tasks (lillm.train.downstream), scored with each validation
        self.cadence = Cadence.of(train, plan.max_steps, objective.has_validation)
        self.hooks = Hooks()
        self.clock: Callable[[], float] = time.perf_counter
        self._state: LoopState | None = None
        self._bar: Any = None
        self._finite: torch.Tensor | None = None  # with gradient gates: is the current micro-batch's loss finite
        self.run_lock: RunLock | None = None  # rank 0's hold on the run directory, released when fit ends
        self._watchdog = Watchdog(process.rank, process.world, train.watchdog_s)  # watches fit() for hung ranks

    @property
    def device(self) -> torch.device:
        return self.process.device

    def fit(self) -> int:
        """Train; returns the process exit code (0, or 2 after an error that left the last checkpoint intact)."""
        train, plan, progress, log = self.train, self.plan, self.progress, self.process.log
        now = self.clock()
        # The first step measures the step time, so the first agreement follows it.
        state = self._state = LoopState(progress.step, now, Window(now), progress.step + 1, now,
                                        start_tokens=progress.tokens_seen, pace=Pace(now, progress.step))
        stop, exit_code = StopFlag(), 0
        self.engine.train()
        batches = iter(self.objective.loader)
        self._bar = tqdm(total=plan.max_steps, initial=progress.step, desc=self.objective.name, unit="step",
                         # None: drawn on a terminal only. In a log file (`> log 2>&1`) its redraws would
                         # glue themselves to the step lines, which carry the progress there.
                         disable=True if self.process.rank != 0 else None,
                         dynamic_ncols=True, mininterval=2.0, file=sys.stderr)
        gates = self._gate_gradients() if train.max_bad_steps > 0 else []
        self._watchdog.start()
        try:
            while progress.step < plan.max_steps:
                self.hooks.before_step(self)
                lr = apply_lr(self.optimizer, progress.step, train, plan.max_steps)
                self._timed_step(batches, lr)
                progress.step += 1
                state.window.steps += 1
                self._bar.update(1)
                stops = self.cadence.after(progress.step, state.next_agreement)
                if not stops.any():
                    continue  # the device runs ahead: nothing here waits for it
                signalled = self._agree(stop)
                if stops.log:
                    self._log_window(lr)
                if stops.evaluate and not signalled:
                    signalled = not self._evaluate(stop)
                if signalled:
                    log.info(f"{stop.reason or 'stopping on another rank'}: saving at step {progress.step} and exiting")
                if signalled or stops.save:
                    self._save()
                if signalled:
                    break
                state.last_agreement = self.clock()  # the next step time leaves out logging and saving
        except UserError as e:
            log.error(f"error: {e}")
            exit_code = 2
        finally:
            self._watchdog.stop()
            for gate in gates:
                gate.remove()
            stop.close()
            self._bar.close()
            try:
                self._close_metrics()
            except UserError:
                if exit_code == 0:
                    raise  # a failing disk met first here; after a reported error, the same disk says it again
            finally:
                if self.run_lock is not None:
                    self.run_lock.release()
        if exit_code == 0:
            log.info(self._summary())
        return exit_code

    def _summary(self) -> str:
        """The run's last line: how far it got, in what time, its best evaluation, and where to look."""
        state, step = self._state, self.progress.step
        seconds = self.clock() - state.run_start
        tokens = self.progress.tokens_seen - state.start_tokens
        what = "done" if step >= self.plan.max_steps else "stopped"
        parts = [f"{what} at step {step}/{self.plan.max_steps}: {step - state.start_step:,} steps, "
                 f"{tokens:,} tokens in {format_duration(seconds)} ({tokens / max(seconds, 1e-9):,.0f} tok/s)"]
        if best := state.best_val:
            parts.append(f"best val/loss {best['val/loss']:.4f}"
                         + (f" (bpb {best['val/bpb']:.4f})" if "val/bpb" in best else "") + f" at step {best['step']}")
        if state.last_saved:
            parts.append(f"checkpoint {state.last_saved}")
        if hint := self.objective.done_hint():
            parts.append(hint)
        return "; ".join(parts)

    def _timed_step(self, batches: Iterator[Any], lr: float) -> None:
        """`_train_step`, and on the first step of a compiled engine the compile warm-up it took."""
        warm_up = self.progress.step == self._state.start_step and getattr(self.engine, "is_compiled", False)
        t, graphs = self.clock(), compiled_graphs() if warm_up else 0
        self._train_step(batches, lr)
        if not warm_up:
            return
        seconds, graphs = self.clock() - t, compiled_graphs() - graphs
        if graphs:
            self.process.log.info(f"torch.compile warm-up: the first step took {seconds:.1f}s ({graphs} graph(s) "
                                  "compiled)")
        else:
            self.process.log.warning("torch.compile compiled nothing (see the warnings above): training runs eagerly")

    def _train_step(self, batches: Iterator[Any], lr: float) -> None:
        """One optimizer step over grad_accum micro-batches, queued without waiting for the device: the
        losses and their finiteness stay there until the next agreement (`_agree`)."""
        window = self._state.window
        t = self.clock()
        micro = [next(batches) for _ in range(self.plan.grad_accum)]
        window.data += self.clock() - t
        self.objective.begin_step(micro)
        tokens, losses, step_loss = 0, [], 0.0
        for batch in micro:
            self._watchdog.beat(self.progress.step, "training")
            tokens += self.objective.num_tokens(batch)
            loss = self.objective.loss(self.engine, batch.to(self.device, non_blocking=True))
            if self._finite is not None:
                self._finite.copy_(torch.isfinite(loss.detach()))  # what the gradient gates read
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            value = loss.detach().double()
            step_loss = step_loss + value.nan_to_num(0.0, 0.0, 0.0) / self.plan.grad_accum  # a skipped one adds 0
            losses.append(value)
        window.loss = window.loss + step_loss
        self._state.pending.append(StepRecord(self.progress.step, lr, micro, torch.stack(losses), tokens))

    def _gate_gradients(self) -> list[Any]:
        """With train.max_bad_steps > 0: every parameter's gradient passes through a gate that zeroes it for a
        micro-batch whose loss is not finite, so a skipped micro-batch changes nothing, decided on the device."""
        self._finite = finite = torch.ones((), dtype=torch.bool, device=self.device)
        return [p.register_hook(lambda g: g.where(finite, 0.0))
                for p in self.engine.module.parameters() if p.requires_grad]

    def _agree(self, stop: StopFlag) -> bool:
        """The ranks' one collective outside log and eval steps, and the loop's one wait for the device: the
        stop flag, the token count, this rank's step time and which pending micro-batches had a non-finite
        loss, summed over ranks. Returns whether to stop; raises past train.max_bad_steps."""
        state, world = self._state, self.process.world
        pending, state.pending = state.pending, []
        step_time = (self.clock() - state.last_agreement) / len(pending) / world
        head = torch.tensor([float(stop.requested()), sum(r.tokens for r in pending), step_time], dtype=torch.float64)
        bad = (~torch.cat([r.losses for r in pending]).isfinite()).double()  # (steps x grad_accum,)
        totals = torch.cat([head.to(self.device), bad])
        if dist.is_initialized():
            dist.all_reduce(totals)
        signalled, tokens, step_time, *bad_micro = totals.tolist()
        self.progress.tokens_seen += int(tokens)
        state.window.tokens += tokens
        gas = self.plan.grad_accum
        for i, record in enumerate(pending):
            if count := sum(n > 0 for n in bad_micro[i * gas : (i + 1) * gas]):
                self._skip_or_stop(record, count)
        state.next_agreement = self.cadence.next_agreement(self.progress.step, step_time)
        self.hooks.after_agreement(self)
        return signalled > 0

    def _skip_or_stop(self, record: StepRecord, count: int) -> None:
        """Count a step's micro-batches with a non-finite loss on any rank; past train.max_bad_steps, each rank
        that had one saves it for diagnosis, and training stops."""
        state = self._state
        state.bad_steps += count
        if state.bad_steps > self.train.max_bad_steps:
            diag = Path(self.train.run_dir) / f"nonfinite_step{record.step}_rank{self.process.rank}.pt"
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
        self.process.log.warning(f"step {record.step}: {count} micro-batch(es) with a non-finite loss skipped "
                                 f"({state.bad_steps} so far)")

    def _log_window(self, lr: float) -> None:
        """Scalars to TensorBoard and metrics.jsonl, and one console line (a collective)."""
        state, step, max_steps, world = self._state, self.progress.step, self.plan.max_steps, self.process.world
        w = state.window
        now = self.clock()
        elapsed = now - w.t0
        loss_avg = all_reduce([w.loss / w.steps], self.device)[0] / world
        tok_s = w.tokens / elapsed
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        scalars = {"train/loss": loss_avg, "train/lr": lr, "train/grad_norm": grad_norm, "perf/tokens_per_s": tok_s,
                   "perf/step_time_s": elapsed / w.steps, "perf/data_wait_frac": w.data / elapsed,
                   "train/tokens_seen": self.progress.tokens_seen, **self.objective.window_scalars()}
        peak = detect_peak_tflops(self.train.peak_tflops)
        mfu = tok_s * self.objective.flops_per_token / (peak * 1e12 * world) if peak else None
        if mfu is not None:
            scalars["perf/mfu"] = mfu
        if self.device.type == "cuda":
            scalars["perf/max_mem_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.writer.scalars(scalars, step)
        eta = state.pace.eta(now, step, max_steps)
        if self.process.rank == 0:
            self._bar.write(
                f"step {step}/{max_steps} | loss {loss_avg:.4f}{self.objective.log_suffix(scalars)} | lr {lr:.2e} | "
                f"gnorm {grad_norm:.2f} | {tok_s:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu is not None else "")
                + f" | data {w.data / elapsed:.1%} | eta {format_duration(eta)}",
                file=sys.stdout,
            )
        state.window = Window(self.clock())

    def _evaluate(self, stop: StopFlag) -> bool:
        """Validation, the evaluation tasks, and a text sample on rank 0; the best evaluation is kept. A stop
        requested meanwhile cuts it short (`StopAware`): the partial scores are dropped and False is returned
        on every rank, so that the run saves at once."""
        step, log = self.progress.step, self.process.log
        model = StopAware(self.engine, stop.requested, lambda: self._watchdog.beat(step, "evaluation"))
        self.engine.eval()
        with torch.no_grad():
            vals = self.objective.evaluate(model)
            if self.downstream:
                vals.update(self.downstream(model, self.process))
        self.engine.train()
        if all_reduce([float(model.cut)], self.device)[0]:
            log.info(f"eval @ step {step}: cut short by a stop request, not recorded")
            return False
        self.writer.scalars(vals, step)
        log.info(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in vals.items()))
        best = self._state.best_val.get("val/loss", math.nan)
        if not self._state.best_val or vals["val/loss"] < best or math.isnan(best):  # a NaN is never the best
            self._state.best_val = {**vals, "step": step}
        if self.process.rank == 0 and self.train.sample_tokens and not stop.requested():
            sample = self.objective.sample(self.engine.module)
            self.writer.text("samples", "```\n" + sample + "\n```", step)  # TensorBoard renders Markdown
            log.info(f"sample @ step {step}: {sample!r}")
        return True

    def _save(self) -> None:
        self._watchdog.beat(self.progress.step, "saving")
        path = self.checkpoint.save(self.progress.step)
        self._watchdog.beat(self.progress.step, "training")
        self._state.last_saved = str(path)
        self.process.log.info(f"saved checkpoint {path}")

    def _close_metrics(self) -> None:
        """The hparams table (against the run's val/loss and val/bpb series) and the writer's files."""
        hparams = {**dataclasses.asdict(self.train), **self.objective.hparams(), "world_size": self.process.world,
                   "precision": self.precision}
        self.writer.hparams(hparams, ["val/loss", "val/bpb"])
        self.writer.close()


class StopAware:
    """The engine as an evaluation sees it. Once a stop is requested (a signal, the launcher gone), every
    forward pass returns zero logits of the right shape instead of computing: the evaluation loops, and the
    collectives that sum their results, then run to their end in moments on every rank in the same order, and
    the run saves well inside the launcher's grace period (30 s before it kills a rank). Anything else is the
    engine's. `cut` tells whether this evaluation was cut short; `beat` is called on every forward pass."""

    def __init__(self, engine: Any, requested: Callable[[], bool], beat: Callable[[], None]) -> None:
        self._engine, self._requested, self._beat = engine, requested, beat
        self.cut = False

    def stopped(self) -> bool:
        """Whether this evaluation is cut short (checked once per batch)."""
        self.cut = self.cut or self._requested()
        return self.cut

    def __call__(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._beat()  # progress, for the watchdog
        if self.stopped():
            self.cut = True
            vocab = self._engine.module.config.vocab_size
            return torch.zeros((*ids.shape, vocab), device=ids.device)
        return self._engine(ids, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def until_stopped(model: Any, batches: Iterable[Any]) -> Iterator[Any]:
    """An objective's validation batches, ended early once the evaluation is cut short (`StopAware`): reading
    and scoring them is skipped too, while the reductions after the loop still run on every rank."""
    for batch in batches:
        if isinstance(model, StopAware) and model.stopped():
            return
        yield batch


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))
