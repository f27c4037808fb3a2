"""Shared fixtures and helpers: tiny models, a small tokenizer trained on the built-in corpus, prepared shards,
the launcher and metrics helpers of the end-to-end tests, and a one-rank process group for in-process loop tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lillm import LilLM, ModelConfig

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
QA = [("What is the secret word?", "The secret word is banana."), ("Name a color.", "Blue is a color."),
      ("What is two plus two?", "Two plus two is four."), ("Say hello.", "Hello there, friend!"),
      ("Which animal barks?", "A dog barks."), ("Where is Paris?", "Paris is in France."),
      ("What do bees make?", "Bees make honey."), ("How many legs has a cat?", "A cat has four legs.")]
"""Question/answer pairs a tiny model learns by heart in the post-training tests."""
SYSTEMS = ["", "Be brief.", "You are helpful.", "Answer plainly."]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT"}


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


def launch(script: str, args: list[str], ranks: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """A training script through the real `deepspeed` launcher on `ranks` CPU ranks (1: a plain `python`)."""
    if ranks == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(29500 + os.getpid() % 1000), script, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


def metrics(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """{step: value} of one scalar in a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def run_from_checkpoint(src_run: Path, dst_run: Path, tag: str) -> Path:
    """A new run directory whose only (and latest) checkpoint is `tag` of `src_run`."""
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / tag, dst_run / "checkpoints" / tag)
    (dst_run / "checkpoints/latest").write_text(tag)
    return dst_run


@pytest.fixture(scope="session")
def process_group():
    """A one-rank gloo process group in the test process: training runs in-process, without the launcher.
    The environment it was made from is restored at once, so later subprocesses do not inherit it."""
    import torch.distributed as dist

    from lillm.train.dist import init_distributed

    saved = dict(os.environ)
    init_distributed()
    os.environ.clear()
    os.environ.update(saved)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


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


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory, tokenizer_dir) -> Path:
    """A random debug-shaped model exported with a chat-capable tokenizer: the 'pretrained' starting point."""
    from lillm.hf import export_hf
    from lillm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    out = tmp_path_factory.mktemp("base") / "hf"
    export_hf(tiny_model(vocab_size=tok.vocab_size, max_seq_len=128), out, tokenizer_dir=tok)
    return out
