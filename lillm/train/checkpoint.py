"""ZeRO checkpoints for training: what a run is, how to resume it, and one object that saves and restores it.

- `RunIdentity`: what makes a run itself (objective, model shape, tokenizer, LoRA and its base ...), written
  into every checkpoint's lillm.json, and what refuses a checkpoint of another run.
- `plan_resume`: a pure function of `train.resume`, the run directory and this run, deciding before the
  engine exists which checkpoint to load and how (as saved; DeepSpeed's universal format at another world
  size; re-partitioned by lillm for Muon). The engine config is derived from its answer.
- `Checkpoint`: made with the engine and the run's stateful parts (loader, progress); `restore(plan)` once,
  then `save(step)` at every checkpoint step.

Saving is all-or-nothing and durable: every rank writes its shard and fsyncs the files it wrote; rank 0 then
writes `lillm.json`, syncs the tag's directory and its parent, and only then moves `latest` (synced too). A
crash or a power loss at any moment leaves either the new checkpoint on the disk whole or the previous one in
charge, never a `latest` naming files still in memory. The layout is in `lillm.runs`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist

from lillm.errors import UserError
from lillm.files import fsync_dir, fsync_file, fsync_tree, save_safetensors, write_atomic
from lillm.lora import lora_state_dict
from lillm.runs import (
    ADAPTER,
    LATEST,
    META,
    TAG_RE,
    checkpoint_problem,
    checkpoints_dir,
    file_record,
    newest_intact_tag,
    read_latest,
    read_meta,
    resolve_checkpoint,
    tag_for,
    universal_dir,
)
from lillm.train.ds_config import offloads_optimizer, precision
from lillm.train.reshard import full_states, load_full_states, load_scaler_state


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def engine_precision(engine: Any) -> str:
    """'bf16', 'fp16' or 'fp32': what the DeepSpeed engine trains in."""
    if getattr(engine, "bfloat16_enabled", lambda: False)():
        return "bf16"
    if getattr(engine, "fp16_enabled", lambda: False)():
        return "fp16"
    return "fp32"


def universal_info() -> dict[str, Any]:
    """What `ds_to_universal` needs in the client state (lillm uses no tensor or pipeline parallelism)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}


def convert_to_universal(tag_dir: Path) -> Path:
    """Run DeepSpeed's `ds_to_universal` on a tag (once; the result is reused), atomically."""
    out = universal_dir(tag_dir)
    if (out / META).is_file():
        return out
    if read_meta(tag_dir).get("train_config", {}).get("optimizer") == "muon":
        raise UserError(f"{tag_dir} is a Muon checkpoint: it is not converted to the universal format, and needs "
                        "no conversion: a resume at another world size re-partitions its Muon and AdamW states "
                        "itself (just resume it)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"{tmp.parent}: cannot write the universal copy of {tag_dir.name} ({e.strerror})") from None
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = next((line for line in reversed(r.stderr.splitlines()) if line.strip()), f"exit {r.returncode}")
        raise UserError(f"converting {tag_dir} to the universal format failed: {last.strip()}")
    meta = {k: v for k, v in read_meta(tag_dir).items() if k != "files"}  # other files than the original's
    write_atomic(tmp / META, json.dumps(meta, indent=2))
    fsync_tree(tmp)  # on the disk before its name says it is complete
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return out


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """What makes a run itself: a checkpoint resumes only a run with the same identity (its lillm.json holds
    these fields). The train section is recorded whole; of it only the optimizer must match."""

    objective: str
    """'pretrain', 'sft' or 'dpo'."""
    model_config: dict[str, Any]
    tokenizer_fingerprint: str
    train_config: dict[str, Any]
    init_from: str | None = None
    """Post-training: the resolved starting model."""
    lora: dict[str, Any] | None = None
    """Post-training with LoRA: its settings (the checkpoint then holds the adapter, not the base)."""
    base_fingerprint: str | None = None
    """Post-training with LoRA: the base model's weights' fingerprint."""

    @property
    def frozen_base(self) -> bool:
        return bool(self.lora)

    def to_dict(self) -> dict[str, Any]:
        """The lillm.json fields; pretraining has no starting model, so it leaves the post-training ones out."""
        out = dataclasses.asdict(self)
        if self.objective == "pretrain":
            for key in ("init_from", "lora", "base_fingerprint"):
                del out[key]
        return out

    def refusal(self, saved: dict[str, Any], world: int) -> str | None:
        """Why the run that saved `saved` (a checkpoint's lillm.json) is not this one, or cannot be resumed on
        `world` ranks; None when it can."""
        if saved["model_config"] != self.model_config:
            diff = {k: (v, self.model_config.get(k)) for k, v in saved["model_config"].items()
                    if self.model_config.get(k) != v}
            return f"it was trained with another model config (saved, now): {diff}"
        if saved["tokenizer_fingerprint"] != self.tokenizer_fingerprint:
            return "it was trained with another tokenizer"
        was, now = saved.get("train_config", {}).get("optimizer", "adamw"), self.train_config.get("optimizer", "adamw")
        if was != now:
            return f"it was trained with optimizer {was}, this run uses {now} (set train.optimizer {was}, or start a " \
                   "new train.run_dir)"
        if saved.get("objective", "pretrain") != self.objective:
            return f"it is a {saved.get('objective', 'pretrain')} checkpoint, this is a {self.objective} run (start " \
                   "a new train.run_dir, with init_from=<this checkpoint>)"
        if saved.get("lora") != self.lora:
            return f"its LoRA settings {saved.get('lora')} differ from {self.lora}"
        if self.lora and saved.get("base_fingerprint") != self.base_fingerprint:
            return f"its LoRA adapter was trained on another base model than {self.init_from}"
        if self.lora and saved["world_size"] != world:
            # DeepSpeed's universal conversion of a checkpoint without its frozen weights loads back wrong
            # adapter/optimizer states (losses off by 0.25 after resume), so it is refused.
            return f"it is a LoRA checkpoint saved by {saved['world_size']} rank(s), and LoRA checkpoints resume " \
                   f"only at their own world size. Resume with {saved['world_size']} rank(s), or start a new run " \
                   "with init_from=<this checkpoint>"
        return None


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """Which checkpoint a run resumes from and how it loads it."""

    tag_dir: Path | None = None
    """None: a fresh start."""
    saved_world: int = 0
    """The number of ranks that saved it."""
    mode: Literal["fresh", "as_saved", "universal", "reshard"] = "fresh"
    """'as_saved': same world size. 'universal': another world size, through DeepSpeed's universal format.
    'reshard': another world size with Muon, whose momentum lillm re-partitions (`lillm.train.reshard`)."""
    notes: tuple[str, ...] = ()
    """What to tell the user about how it loads (a conversion, a re-partition)."""
    warnings: tuple[str, ...] = ()
    """What went wrong on the way (a damaged latest checkpoint, passed over for an intact one)."""

    @property
    def load_universal(self) -> bool:
        return self.mode == "universal"


def plan_resume(spec: str, run_dir: str | os.PathLike, identity: RunIdentity, world: int,
                ds_cfg: dict[str, Any]) -> ResumePlan:
    """The checkpoint `spec` names ('auto', 'none', a tag or a path), checked against this run and world size:
    what to load and how. Reads files, changes nothing."""
    problem = None
    try:
        tag_dir = resolve_checkpoint(spec, run_dir)
    except UserError as e:  # `latest` itself damaged: auto-resume falls back like for a damaged tag
        if spec != "auto":
            raise
        tag_dir, problem = checkpoints_dir(run_dir) / LATEST, str(e).split("; the newest intact")[0]
    if tag_dir is None:
        return ResumePlan()
    warnings: tuple[str, ...] = ()
    problem = problem or checkpoint_problem(tag_dir)
    if problem and spec == "auto":
        intact = newest_intact_tag(run_dir)
        if intact is None:
            raise UserError(f"cannot resume: the latest checkpoint {tag_dir} is damaged ({problem}) and no older one "
                            "is intact; start afresh with train.resume=none")
        warnings = (f"the latest checkpoint {tag_dir.name} is damaged ({problem}): resuming from {intact.name}, the "
                    "newest intact one",)
        tag_dir = intact
    elif problem:
        raise UserError(f"cannot resume {tag_dir}: it is damaged ({problem})")
    meta = read_meta(tag_dir)
    if why := identity.refusal(meta, world):
        raise UserError(f"cannot resume {tag_dir}: {why}")
    if why := precision_change(tag_dir, meta, precision(ds_cfg)):
        raise UserError(f"cannot resume {tag_dir}: {why}")
    saved = meta["world_size"]
    if saved == world:
        return ResumePlan(tag_dir, saved, "as_saved", warnings=warnings)
    if meta.get("train_config", {}).get("optimizer") != "muon":
        return ResumePlan(tag_dir, saved, "universal", (f"resuming a {saved}-rank checkpoint on {world} ranks: "
                          f"converting {tag_dir.name} to DeepSpeed's universal format",), warnings)
    if offloads_optimizer(ds_cfg):
        raise UserError(f"cannot resume the Muon checkpoint {tag_dir} on {world} rank(s): it was saved by {saved}, and "
                        "with optimizer offload Muon's momentum is kept per partition, which neither DeepSpeed's "
                        f"universal format nor lillm re-partitions. Resume with {saved} rank(s), or without offload")
    return ResumePlan(tag_dir, saved, "reshard", (f"resuming a {saved}-rank checkpoint on {world} ranks: "
                      "re-partitioning its Muon and AdamW states",), warnings)


_RANK_IN_NAME = re.compile(r"(?:pp_rank_|rng_rank)(\d+)")


def _writer_rank(name: str) -> int:
    """Which rank wrote a checkpoint file: DeepSpeed's optimizer partitions (`*zero_pp_rank_R_*`) and lillm's
    RNG states (`rng_rankR.pt`) are each rank's own; the model states, `config.yaml` and an adapter are rank
    0's. Each rank syncs what it wrote, so a run directory on node-local disks is synced too."""
    m = _RANK_IN_NAME.search(name)
    return int(m.group(1)) if m else 0


def saved_precision(tag_dir: Path, meta: dict[str, Any]) -> str:
    """The precision a checkpoint was trained in: recorded in lillm.json, or for older tags read from DeepSpeed's
    file names (its bf16 optimizer writes `bf16_zero_pp_rank_*`, the fp32 and fp16 ones `zero_pp_rank_*`)."""
    if isinstance(meta.get("precision"), str):
        return meta["precision"]
    return "bf16" if any(tag_dir.glob("bf16_zero_pp_rank_*")) else "fp32 or fp16"


def precision_change(tag_dir: Path, meta: dict[str, Any], now: str) -> str | None:
    """Why a checkpoint cannot be resumed in precision `now`, or None. DeepSpeed's bf16 optimizer and its
    fp32/fp16 one keep different state under different file names, so a switch between them would fail deep in
    the load, naming a missing file as if the checkpoint were damaged; said here, before anything slow."""
    was = saved_precision(tag_dir, meta)
    if (was == "bf16") == (now == "bf16"):
        return None
    return (f"it was trained in {was} and this run's DeepSpeed config is {now}: the optimizer state of one does "
            f"not load into the other. Resume with a {was.split()[0]} config (the run's ds_config.json is the one "
            "it ran with), or start a new run from its weights")


class Checkpoint:
    """Saves and restores a run: DeepSpeed's engine (module, optimizer), the named stateful parts, each rank's
    RNG and the run's identity; keeps the last `keep` checkpoints."""

    def __init__(self, run_dir: str | os.PathLike, identity: RunIdentity, config_yaml: str, keep: int,
                 rank: int, world_size: int, engine: Any, **states: Stateful) -> None:
        self.dir = checkpoints_dir(run_dir)
        self.identity, self.config_yaml, self.keep = identity, config_yaml, keep
        self.rank, self.world_size = rank, world_size
        self.engine, self.states = engine, states
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)

    def restore(self, plan: ResumePlan) -> bool:
        """Load the planned checkpoint into the engine and every state; False for a fresh start. RNG states are
        per rank, so they are restored only at the world size that saved them."""
        if plan.tag_dir is None:
            return False
        load_dir = plan.tag_dir
        if plan.mode == "universal":
            if self.rank == 0:
                convert_to_universal(plan.tag_dir)
            dist.barrier()
            load_dir = universal_dir(plan.tag_dir)
        load_path, client = self.engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name,
                                                        load_lr_scheduler_states=False,
                                                        load_module_strict=not self.identity.frozen_base,
                                                        load_module_only=plan.mode == "reshard")
        if load_path is None:
            raise UserError(f"DeepSpeed could not load checkpoint {load_dir}")
        if plan.mode == "reshard":
            load_full_states(self.engine.optimizer, self.engine.module, full_states(plan.tag_dir))
            load_scaler_state(self.engine.optimizer, plan.tag_dir, self.rank)
        saved = client["lillm"]
        for name, state in self.states.items():
            if name not in saved:
                raise UserError(f"cannot resume {plan.tag_dir}: it holds no {name!r} state")
            state.load_state_dict(saved[name])
        rng_file = load_dir / f"rng_rank{self.rank}.pt"
        if rng_file.is_file() and plan.saved_world == self.world_size:
            set_rng_state(torch.load(rng_file, weights_only=False))
        return True

    def save(self, step: int) -> Path:
        """Save on every rank (a collective). A failure on any rank removes the partial tag and leaves the
        previous checkpoint as `latest`."""
        tag = tag_for(step)
        tag_dir = self.dir / tag
        client_state = {"lillm": {name: state.state_dict() for name, state in self.states.items()},
                        "universal_checkpoint_info": universal_info()}
        if self.rank == 0 and tag_dir.exists():  # a damaged tag that a fallback resume replays: start afresh
            shutil.rmtree(tag_dir, ignore_errors=True)
            shutil.rmtree(universal_dir(tag_dir), ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()  # no rank writes into the tag before it is gone
        error = ""
        try:
            self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False,
                                        exclude_frozen_parameters=self.identity.frozen_base)
            torch.save(rng_state(), tag_dir / f"rng_rank{self.rank}.pt")
            if self.rank == 0:
                self._write_extras(tag_dir)
            for f in sorted(tag_dir.iterdir()):  # this rank's files reach the disk before the tag counts
                if f.is_file() and _writer_rank(f.name) == self.rank:
                    fsync_file(f)
        except (OSError, RuntimeError) as e:  # disk full, permissions, a failed collective write
            error = f"{type(e).__name__}: {e}"
        ok = torch.tensor([0 if error else 1], dtype=torch.int64)
        if dist.is_initialized():
            ok = ok.to(self.engine.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not int(ok.item()):
            if self.rank == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)
            try:
                latest = read_latest(self.dir)
            except UserError:
                latest = "damaged"
            raise UserError(f"saving checkpoint {tag} failed ({error or 'on another rank'}); "
                            f"the previous checkpoint ({latest or 'none'}) is intact")
        if self.rank == 0:
            meta = {**self.identity.to_dict(), "step": step, "world_size": self.world_size,
                    "precision": engine_precision(self.engine), "files": file_record(tag_dir)}
            write_atomic(tag_dir / META, json.dumps(meta, indent=2))  # synced, and the tag's directory with it
            fsync_dir(self.dir)  # the tag's own entry
            write_atomic(self.dir / LATEST, tag)
            self._prune(tag)
        if dist.is_initialized():
            dist.barrier()
        return tag_dir

    def _write_extras(self, tag_dir: Path) -> None:
        """Rank 0's files of a tag, written before it counts as complete: the config and a LoRA adapter."""
        write_atomic(tag_dir / "config.yaml", self.config_yaml)
        if self.identity.frozen_base:
            state = {k: v.detach().to("cpu", torch.float32).contiguous()
                     for k, v in lora_state_dict(self.engine.module).items()}
            save_safetensors(state, tag_dir / ADAPTER)

    def _prune(self, latest: str) -> None:
        tags = sorted(d.name for d in self.dir.iterdir() if d.is_dir() and TAG_RE.match(d.name))
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != latest:
                shutil.rmtree(self.dir / old, ignore_errors=True)
                shutil.rmtree(universal_dir(self.dir / old), ignore_errors=True)
