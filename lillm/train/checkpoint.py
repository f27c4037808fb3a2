"""ZeRO checkpoints: atomic `latest`, keep-last-K, resume resolution, world-size changes, consolidation.

Layout under a run directory:
  checkpoints/step_00001000/          DeepSpeed's files (one optimizer shard per rank), plus
      rng_rank{r}.pt                  each rank's RNG states
      lillm.json                      step, world size, model config, tokenizer fingerprint (rank 0, last)
  checkpoints/step_00001000_universal/  made on demand by `ds_to_universal` for another world size
  checkpoints/latest                  the newest complete tag; replaced atomically after every rank wrote
  tokenizer/, config.yaml             the run's tokenizer and resolved configuration
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lillm.errors import UserError
from lillm.files import write_atomic

TAG_RE = re.compile(r"^step_(\d{8})$")
META = "lillm.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


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


def read_meta(tag_dir: Path) -> dict[str, Any]:
    f = tag_dir / META
    if not f.is_file():
        raise UserError(f"{tag_dir}: not a complete lillm checkpoint (no {META})")
    return json.loads(f.read_text())


def resolve_checkpoint(spec: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> Path | None:
    """A checkpoint tag directory from 'auto', 'none', a tag name, a run dir, a checkpoints dir or a tag dir."""
    spec = str(spec)
    if spec == "none":
        return None
    if spec == "auto":
        if run_dir is None:
            return None
        latest = Path(run_dir) / "checkpoints" / "latest"
        return Path(run_dir) / "checkpoints" / latest.read_text().strip() if latest.is_file() else None
    p = Path(spec)
    if not p.exists() and run_dir is not None and (Path(run_dir) / "checkpoints" / spec).is_dir():
        p = Path(run_dir) / "checkpoints" / spec
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if not p.is_dir():
        raise UserError(f"checkpoint {spec!r}: not found")
    read_meta(p)
    return p


def is_checkpoint_path(p: Path) -> bool:
    return (p / "checkpoints" / "latest").is_file() or (p / "latest").is_file() or (p / META).is_file()


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
    shutil.copy2(tag_dir / META, tmp / META)
    os.replace(tmp, out)
    return out


class Checkpointer:
    """Saves on every rank, moves `latest` only once all ranks finished, prunes to the last K."""

    def __init__(self, run_dir: str | os.PathLike, keep: int, rank: int, world_size: int) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep, self.rank, self.world_size = keep, rank, world_size
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, engine: Any, step: int, client_state: dict[str, Any], meta: dict[str, Any],
             exclude_frozen: bool = False, on_saved: Callable[[Path], None] | None = None) -> Path:
        """Save on every rank. exclude_frozen: leave frozen weights (a LoRA base) out of the files.
        on_saved(tag_dir) runs on rank 0 after DeepSpeed's files and before the tag counts as complete."""
        import torch.distributed as dist

        tag = tag_for(step)
        tag_dir = self.dir / tag
        error = ""
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False,
                                   exclude_frozen_parameters=exclude_frozen)
            torch.save(rng_state(), tag_dir / f"rng_rank{self.rank}.pt")
            if on_saved is not None and self.rank == 0:
                on_saved(tag_dir)
        except (OSError, RuntimeError) as e:  # disk full, permissions, a failed collective write
            error = f"{type(e).__name__}: {e}"
        ok = torch.tensor([0 if error else 1], dtype=torch.int64)
        if dist.is_initialized():
            ok = ok.to(engine.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not int(ok.item()):
            if self.rank == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)
            latest = (self.dir / "latest").read_text().strip() if (self.dir / "latest").is_file() else None
            raise UserError(
                f"saving checkpoint {tag} failed ({error or 'on another rank'}); "
                f"the previous checkpoint ({latest or 'none'}) is intact"
            )
        if self.rank == 0:
            write_atomic(tag_dir / META, json.dumps({**meta, "step": step, "world_size": self.world_size}, indent=2))
            write_atomic(self.dir / "latest", tag)
            self._prune(tag)
        if dist.is_initialized():
            dist.barrier()
        return tag_dir

    def _prune(self, latest: str) -> None:
        tags = sorted(d.name for d in self.dir.iterdir() if d.is_dir() and TAG_RE.match(d.name))
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != latest:
                shutil.rmtree(self.dir / old, ignore_errors=True)
                shutil.rmtree(self.dir / (old + "_universal"), ignore_errors=True)


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights gathered from a ZeRO checkpoint's optimizer shards (any world size)."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed narrates every shard it reads
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def load_model_from_checkpoint(path: Path) -> tuple[Any, Any]:
    """(LilLM in fp32, Tokenizer or None) from a run directory or checkpoint.

    A LoRA checkpoint holds only its adapter: the base named by `init_from` is loaded, checked against the
    fingerprint the adapter was trained on, and the adapter is merged into it.
    """
    from lillm.config import ModelConfig
    from lillm.model import LilLM
    from lillm.tokenizer import load_tokenizer

    tag_dir = resolve_checkpoint(path)
    assert tag_dir is not None
    meta = read_meta(tag_dir)
    if (meta.get("lora") or {}).get("rank", 0) > 0:
        model = load_lora_checkpoint(tag_dir, meta)
    else:
        model = LilLM(ModelConfig.from_dict(meta["model_config"]))
        state = consolidated_state_dict(tag_dir)
        if model.config.tie_embeddings:
            state.setdefault("output.weight", state["tok_embeddings.weight"])
        model.load_state_dict(state)
    tok_dir = tag_dir.parent.parent / "tokenizer"
    tokenizer = load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").is_file() else None
    return model.eval(), tokenizer


ADAPTER = "adapter.safetensors"


def load_lora_checkpoint(tag_dir: Path, meta: dict[str, Any]) -> Any:
    """The base model with this checkpoint's adapter merged in."""
    from safetensors.torch import load_file

    from lillm.loading import load_model
    from lillm.lora import LoRAConfig, apply_lora, base_fingerprint, load_lora_state_dict, merge_lora

    base, _ = load_model(meta["init_from"])
    if base_fingerprint(base) != meta["base_fingerprint"]:
        raise UserError(f"{tag_dir}: this LoRA adapter was trained on another base model than the one now at "
                        f"{meta['init_from']} (weights differ); restore that base to use the adapter")
    apply_lora(base, LoRAConfig(**meta["lora"]))
    if not (tag_dir / ADAPTER).is_file():
        raise UserError(f"{tag_dir}: no {ADAPTER} in this LoRA checkpoint")
    load_lora_state_dict(base, load_file(tag_dir / ADAPTER), str(tag_dir / ADAPTER))
    return merge_lora(base)


def tag_for_world_size(tag_dir: Path, meta: dict[str, Any], world: int, rank: int, ds_cfg: dict[str, Any],
                       log: Any) -> Path:
    """The tag to load at this world size: the checkpoint itself, or (saved by another number of ranks) its
    universal conversion, made once by rank 0, with `ds_cfg` switched to load the universal format."""
    import torch.distributed as dist

    if meta["world_size"] == world:
        return tag_dir
    log.info(f"resuming a {meta['world_size']}-rank checkpoint on {world} ranks: converting {tag_dir.name} to "
             "DeepSpeed's universal format")
    if rank == 0:
        convert_to_universal(tag_dir)
    dist.barrier()
    ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
    return tag_dir.with_name(tag_dir.name + "_universal")


def load_engine_checkpoint(engine: Any, tag_dir: Path, meta: dict[str, Any], world: int, rank: int,
                           strict: bool = True) -> dict[str, Any]:
    """Load DeepSpeed's states (module, optimizer) and this rank's RNG; returns lillm's client state.

    strict=False for LoRA checkpoints, which hold no frozen weights. RNG states are per rank, so they are
    restored only at the world size that saved them.
    """
    load_path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_lr_scheduler_states=False,
                                               load_module_strict=strict)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {tag_dir}")
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if rng_file.is_file() and meta["world_size"] == world:
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client["lillm"]


def write_run_files(run_dir: Path, config_yaml: str, ds_cfg: dict[str, Any], tokenizer: Any) -> None:
    """The resolved configuration, the filled ds_config and the tokenizer, next to the checkpoints (rank 0)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_yaml)
    (run_dir / "ds_config.json").write_text(json.dumps(ds_cfg, indent=2) + "\n")
    tokenizer.save(run_dir / "tokenizer")
