"""Shared fixtures: tiny models, a small tokenizer trained on the built-in corpus, prepared shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lillm import LilLM, ModelConfig

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_model(seed: int = 0, **overrides) -> LilLM:
    """A debug-shaped model with random weights (vocab shrunk for speed)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("debug", **{"vocab_size": 512, **overrides})
    model = LilLM(cfg)
    model.init_weights()
    return model.eval()


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m lillm.cli ...` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "lillm.cli", *args], cwd=cwd or REPO, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})}, input=input,
    )


@pytest.fixture(scope="session")
def small_texts() -> list[str]:
    """A few hundred documents of the built-in corpus."""
    from lillm.data.sources import iter_texts, open_source

    return list(iter_texts(open_source("pydoc"), limit=400))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, small_texts) -> Path:
    """A 1024-token BPE tokenizer trained on part of the built-in corpus, saved to disk."""
    from lillm.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(small_texts, vocab_size=1024, progress=False).save(out)
    return out


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory, tokenizer_dir, small_texts) -> Path:
    """The few hundred documents prepared into train/val shards with the 1024-token tokenizer."""
    import json

    from lillm.data.prepare import prepare
    from lillm.data.sources import open_source

    out = tmp_path_factory.mktemp("pretrain_data")
    src = out / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in small_texts))
    prepare(open_source(str(src)), tokenizer_dir, out / "shards", shard_tokens=50_000, val_fraction=0.1,
            num_workers=1, progress=False)
    return out / "shards"
