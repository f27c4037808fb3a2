"""ZeRO checkpoints for training: one object that saves and restores every stateful part of a run.

`Checkpoint` is handed the run's identity (model config, tokenizer, objective, LoRA settings ...) when it
is made, and its stateful parts (the engine, the loader, the progress counters) once they exist. It then
decides everything about resuming: which checkpoint (`train.resume`), whether it fits this run, how to
load one saved by another number of ranks (DeepSpeed's universal format), and what goes where in the
files. The training loop only calls `save(step)`.

Saving is all-or-nothing: every rank writes its shard, rank 0 writes `lillm.json` last and only then moves
`latest`, so a crash mid-save leaves the previous checkpoint in charge. The layout is in `lillm.runs`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from lillm.errors import UserError
from lillm.files import write_atomic
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
    read_meta,
    resolve_checkpoint,
    tag_for,
)
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


def universal_info() -> dict[str, Any]:
    """What `ds_to_universal` needs in the client state (lillm uses no tensor or pipeline parallelism)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}


def convert_to_universal(tag_dir: Path) -> Path:
    """Run DeepSpeed's `ds_to_universal` on a tag (once; the result is reused), atomically."""
    out = tag_dir.with_name(tag_dir.name + "_universal")
    if (out / META).is_file():
        return out
    tmp = tag_dir.with_name(tag_dir.name + "_universal.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"converting {tag_dir} to the universal format failed:\n{r.stderr[-2000:]}")
    meta = {k: v for k, v in read_meta(tag_dir).items() if k != "files"}  # other files than the original's
    write_atomic(tmp / META, json.dumps(meta, indent=2))
    os.replace(tmp, out)
    return out


def check_compatible(meta: dict[str, Any], tag_dir: Path, identity: dict[str, Any], world: int) -> None:
    """Refuse, before anything is loaded, a checkpoint of another run: another model shape, tokenizer,
    objective, LoRA setting or LoRA base; and a LoRA checkpoint at another world size."""
    now = identity["model_config"]
    if meta["model_config"] != now:
        diff = {k: (v, now.get(k)) for k, v in meta["model_config"].items() if now.get(k) != v}
        raise UserError(f"cannot resume {tag_dir}: it was trained with another model config (saved, now): {diff}")
    if meta["tokenizer_fingerprint"] != identity["tokenizer_fingerprint"]:
        raise UserError(f"cannot resume {tag_dir}: it was trained with another tokenizer")
    saved_opt = meta.get("train_config", {}).get("optimizer", "adamw")
    now_opt = identity.get("train_config", {}).get("optimizer", "adamw")
    if saved_opt != now_opt:
        raise UserError(f"cannot resume {tag_dir}: it was trained with optimizer {saved_opt}, this run uses {now_opt} "
                        f"(set train.optimizer {saved_opt}, or start a new train.run_dir)")
    saved, objective = meta.get("objective", "pretrain"), identity["objective"]
    if saved != objective:
        raise UserError(f"cannot resume {tag_dir}: it is a {saved} checkpoint, this is a {objective} run (start a "
                        f"new train.run_dir, with init_from={tag_dir})")
    lora = identity.get("lora")
    if meta.get("lora") != lora:
        raise UserError(f"cannot resume {tag_dir}: its LoRA settings {meta.get('lora')} differ from {lora}")
    if lora and meta.get("base_fingerprint") != identity["base_fingerprint"]:
        raise UserError(f"cannot resume {tag_dir}: its LoRA adapter was trained on another base model than "
                        f"{identity['init_from']}")
    if lora and meta["world_size"] != world:
        # DeepSpeed's universal conversion of a checkpoint without its frozen weights loads back wrong
        # adapter/optimizer states (measured: losses off by 0.25 after resume), so it is refused.
        raise UserError(f"cannot resume the LoRA checkpoint {tag_dir} on {world} rank(s): it was saved by "
                        f"{meta['world_size']}, and LoRA checkpoints resume only at their own world size. Resume "
                        f"with {meta['world_size']} rank(s), or start a new run with init_from={tag_dir}")


class Checkpoint:
    """Saves and restores a run: DeepSpeed's engine (module, optimizer), every registered state, each rank's
    RNG, and the run's identity; keeps the last `keep` checkpoints.

    Use: `find(resume, ds_cfg)` before the engine exists (a resume at another world size changes how the
    engine must be configured), then `register(engine, name=state, ...)`, `restore()`, and `save(step)`.
    """

    def __init__(self, run_dir: str | os.PathLike, identity: dict[str, Any], config_yaml: str, keep: int,
                 rank: int, world_size: int) -> None:
        self.dir = checkpoints_dir(run_dir)
        self.identity, self.config_yaml, self.keep = identity, config_yaml, keep
        self.rank, self.world_size = rank, world_size
        self.frozen_base = bool(identity.get("lora"))  # LoRA: the checkpoint holds the adapter, not the base
        self.engine: Any = None
        self.states: dict[str, Stateful] = {}
        self.resume_from: Path | None = None
        self._load_dir: Path | None = None
        self._saved_world = world_size
        self._reshard = False  # a Muon checkpoint of another world size: re-partitioned by lillm.train.reshard
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)

    def find(self, spec: str, ds_cfg: dict[str, Any], log: Any) -> Path | None:
        """The checkpoint `spec` names ('auto', 'none', a tag or a path), checked against this run. Saved by
        another number of ranks, it is converted to the universal format (once, by rank 0) and `ds_cfg` is
        switched to load that."""
        tag_dir = resolve_checkpoint(spec, self.dir.parent)
        if tag_dir is None:
            return None
        problem = checkpoint_problem(tag_dir)
        if problem and spec == "auto":
            intact = newest_intact_tag(self.dir.parent)
            if intact is None:
                raise UserError(f"cannot resume: the latest checkpoint {tag_dir} is damaged ({problem}) and no "
                                "older one is intact; start afresh with train.resume=none")
            log.warning(f"the latest checkpoint {tag_dir.name} is damaged ({problem}): resuming from "
                        f"{intact.name}, the newest intact one")
            tag_dir = intact
        elif problem:
            raise UserError(f"cannot resume {tag_dir}: it is damaged ({problem})")
        meta = read_meta(tag_dir)
        check_compatible(meta, tag_dir, self.identity, self.world_size)
        self.resume_from, self._load_dir, self._saved_world = tag_dir, tag_dir, meta["world_size"]
        moved = self._saved_world != self.world_size
        muon = meta.get("train_config", {}).get("optimizer") == "muon"
        offload = ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if moved and muon and offload not in (None, "none"):
            raise UserError(f"cannot resume the Muon checkpoint {tag_dir} on {self.world_size} rank(s): it was saved "
                            f"by {self._saved_world}, and with optimizer offload Muon's momentum is kept per "
                            "partition, which neither DeepSpeed's universal format nor lillm re-partitions. Resume "
                            f"with {self._saved_world} rank(s), or without offload")
        if moved and muon:
            log.info(f"resuming a {self._saved_world}-rank checkpoint on {self.world_size} ranks: re-partitioning "
                     f"its Muon and AdamW states")
            self._reshard = True
        elif moved:
            log.info(f"resuming a {self._saved_world}-rank checkpoint on {self.world_size} ranks: converting "
                     f"{tag_dir.name} to DeepSpeed's universal format")
            if self.rank == 0:
                convert_to_universal(tag_dir)
            dist.barrier()
            ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
            self._load_dir = tag_dir.with_name(tag_dir.name + "_universal")
        return tag_dir

    def register(self, engine: Any, **states: Stateful) -> None:
        """The DeepSpeed engine and the other stateful parts, by the names they are saved under."""
        self.engine, self.states = engine, states

    def restore(self) -> bool:
        """Load the checkpoint `find` chose into every registered part; False when there was none. RNG states
        are per rank, so they are restored only at the world size that saved them."""
        if self._load_dir is None:
            return False
        tag_dir = self._load_dir
        load_path, client = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                        load_lr_scheduler_states=False,
                                                        load_module_strict=not self.frozen_base,
                                                        load_module_only=self._reshard)
        if load_path is None:
            raise UserError(f"DeepSpeed could not load checkpoint {tag_dir}")
        if self._reshard:
            load_full_states(self.engine.optimizer, self.engine.module, full_states(tag_dir))
            load_scaler_state(self.engine.optimizer, tag_dir, self.rank)
        saved = client["lillm"]
        if "progress" not in saved and "step" in saved:  # written before the states were registered by name
            saved = {"progress": {"step": saved["step"], "tokens_seen": saved.get("tokens_seen", 0)},
                     "loader": saved["loader"]}
        for name, state in self.states.items():
            if name not in saved:
                raise UserError(f"cannot resume {self.resume_from}: it holds no {name!r} state")
            state.load_state_dict(saved[name])
        rng_file = tag_dir / f"rng_rank{self.rank}.pt"
        if rng_file.is_file() and self._saved_world == self.world_size:
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
            shutil.rmtree(tag_dir.with_name(tag_dir.name + "_universal"), ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()  # no rank writes into the tag before it is gone
        error = ""
        try:
            self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False,
                                        exclude_frozen_parameters=self.frozen_base)
            torch.save(rng_state(), tag_dir / f"rng_rank{self.rank}.pt")
            if self.rank == 0:
                self._write_extras(tag_dir)
        except (OSError, RuntimeError) as e:  # disk full, permissions, a failed collective write
            error = f"{type(e).__name__}: {e}"
        ok = torch.tensor([0 if error else 1], dtype=torch.int64)
        if dist.is_initialized():
            ok = ok.to(self.engine.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not int(ok.item()):
            if self.rank == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)
            latest = (self.dir / LATEST).read_text().strip() if (self.dir / LATEST).is_file() else None
            raise UserError(f"saving checkpoint {tag} failed ({error or 'on another rank'}); "
                            f"the previous checkpoint ({latest or 'none'}) is intact")
        if self.rank == 0:
            meta = {**self.identity, "step": step, "world_size": self.world_size, "files": file_record(tag_dir)}
            write_atomic(tag_dir / META, json.dumps(meta, indent=2))
            write_atomic(self.dir / LATEST, tag)
            self._prune(tag)
        if dist.is_initialized():
            dist.barrier()
        return tag_dir

    def _write_extras(self, tag_dir: Path) -> None:
        """Rank 0's files of a tag, written before it counts as complete: the config and a LoRA adapter."""
        write_atomic(tag_dir / "config.yaml", self.config_yaml)
        if self.frozen_base:
            from safetensors.torch import save_file

            state = {k: v.detach().to("cpu", torch.float32).contiguous()
                     for k, v in lora_state_dict(self.engine.module).items()}
            save_file(state, tag_dir / ADAPTER, metadata={"format": "pt"})

    def _prune(self, latest: str) -> None:
        tags = sorted(d.name for d in self.dir.iterdir() if d.is_dir() and TAG_RE.match(d.name))
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != latest:
                shutil.rmtree(self.dir / old, ignore_errors=True)
                shutil.rmtree(self.dir / (old + "_universal"), ignore_errors=True)


def write_run_files(run_dir: Path, config_yaml: str, ds_cfg: dict[str, Any], tokenizer: Any) -> None:
    """The resolved configuration, the filled ds_config and the tokenizer, next to the checkpoints (rank 0)."""
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
