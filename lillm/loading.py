"""Find and load a model (and its tokenizer) from whatever path a user hands a command."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lillm.errors import UserError
from lillm.model import LilLM
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


def load_model(path: str | os.PathLike) -> tuple[LilLM, Tokenizer | None]:
    """Load from an exported transformers directory, a training run directory or a checkpoint directory.

    Returns the fp32 model on CPU and the tokenizer found next to it (None when there is none).
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    if (p / "config.json").is_file():
        from lillm.hf import import_hf

        model = import_hf(p)
        tokenizer = load_tokenizer(p) if (p / "tokenizer.json").is_file() else None
        return model, tokenizer
    from lillm.train.checkpoint import is_checkpoint_path, load_model_from_checkpoint

    if is_checkpoint_path(p):
        return load_model_from_checkpoint(p)
    raise UserError(
        f"{p}: not a model directory (expected an exported directory with config.json, "
        "a training run directory, or a checkpoint directory)"
    )
