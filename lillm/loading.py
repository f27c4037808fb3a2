"""Find and load a model (and its tokenizer) for inference, from whatever path a user hands a command:
an exported transformers directory, a training run directory, or one of its checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from lillm.config import ModelConfig
from lillm.errors import UserError
from lillm.hf import import_hf
from lillm.lora import LoRAConfig, apply_lora, base_fingerprint, load_lora_state_dict, merge_lora
from lillm.model import LilLM
from lillm.runs import ADAPTER, check_checkpoint, is_checkpoint_path, read_meta, resolve_checkpoint, run_dir_of
from lillm.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available")
    return dev


def load_model(path: str | os.PathLike, **runtime: Any) -> tuple[LilLM, Tokenizer | None]:
    """Load from an exported transformers directory, a training run directory or a checkpoint directory.

    Returns the fp32 model on CPU and the tokenizer found next to it (None when there is none); `runtime`
    goes to the `LilLM` constructor (activation_checkpointing, packed_attention).
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    if (p / "config.json").is_file():
        return import_hf(p, **runtime), stored_tokenizer(p)
    if is_checkpoint_path(p):
        return load_model_from_checkpoint(p, **runtime)
    raise UserError(
        f"{p}: not a model directory (expected an exported directory with config.json, "
        "a training run directory, or a checkpoint directory)"
    )


def trained_tokenizer_fingerprint(path: str | os.PathLike) -> str | None:
    """The fingerprint of the tokenizer a training run or checkpoint was trained with (None for exports)."""
    p = Path(path)
    return read_meta(resolve_checkpoint(p))["tokenizer_fingerprint"] if is_checkpoint_path(p) else None


def stored_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer kept with a model (an export's own, or its training run's), without loading weights."""
    p = Path(path)
    if (p / "config.json").is_file():
        where = p
    elif is_checkpoint_path(p):
        where = run_dir_of(resolve_checkpoint(p)) / "tokenizer"
    else:
        return None
    return load_tokenizer(where) if (where / "tokenizer.json").is_file() else None


def load_model_from_checkpoint(path: str | os.PathLike, **runtime: Any) -> tuple[LilLM, Tokenizer | None]:
    """(LilLM in fp32, Tokenizer or None) from a run directory or checkpoint.

    A LoRA checkpoint holds only its adapter: the base named by `init_from` is loaded, checked against the
    fingerprint the adapter was trained on, and the adapter is merged into it.
    """
    tag_dir = resolve_checkpoint(path)
    assert tag_dir is not None
    check_checkpoint(tag_dir)
    meta = read_meta(tag_dir)
    if (meta.get("lora") or {}).get("rank", 0) > 0:
        model = load_lora_checkpoint(tag_dir, meta, **runtime)
    else:
        model = LilLM(ModelConfig.from_dict(meta["model_config"]), **runtime)
        state = consolidated_state_dict(tag_dir)
        if model.config.tie_embeddings:
            state.setdefault("output.weight", state["tok_embeddings.weight"])
        model.load_state_dict(state)
    return model.eval(), stored_tokenizer(tag_dir)


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights gathered from a ZeRO checkpoint's optimizer shards (any world size)."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    said = io.StringIO()  # DeepSpeed narrates every shard it reads, with a bar even for one file
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except BaseException:
        sys.stderr.write(said.getvalue())
        raise
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def load_lora_checkpoint(tag_dir: Path, meta: dict[str, Any], **runtime: Any) -> LilLM:
    """The base model with this checkpoint's adapter merged in."""
    from safetensors.torch import load_file

    base, _ = load_model(meta["init_from"], **runtime)
    if base_fingerprint(base) != meta["base_fingerprint"]:
        raise UserError(f"{tag_dir}: this LoRA adapter was trained on another base model than the one now at "
                        f"{meta['init_from']} (weights differ); restore that base to use the adapter")
    apply_lora(base, LoRAConfig(**meta["lora"]))
    if not (tag_dir / ADAPTER).is_file():
        raise UserError(f"{tag_dir}: no {ADAPTER} in this LoRA checkpoint")
    load_lora_state_dict(base, load_file(tag_dir / ADAPTER), str(tag_dir / ADAPTER))
    return merge_lora(base)
