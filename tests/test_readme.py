"""The README's "your own text" block, run as written: a folder of the user's .txt files, then tokenizer,
shards, a 2-rank DeepSpeed pretraining run and a sample, from a working directory like a fresh clone's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

# Only what makes the run test-sized: the README trains debug.yaml's 300 steps.
SHORT = ("--train.max_steps 4 --train.eval_interval 4 --train.ckpt_interval 4 --train.log_interval 2 "
         "--train.warmup_steps 1 --train.sample_tokens 8 --train.seq_len 64 --train.micro_batch_size 2 "
         "--train.grad_accum 1")


def readme_block(after: str) -> list[str]:
    """The command lines of the first ```bash block after the line starting with `after`."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index("\n" + after):], re.S)
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_train_on_your_own_text_as_written(tmp_path, small_texts):
    lines = readme_block("Your own text")
    assert lines[0] == "TEXT=~/my-texts" and any("deepspeed" in line for line in lines)
    texts = tmp_path / "my-texts"
    texts.mkdir()
    for i, doc in enumerate(small_texts[:300]):
        (texts / f"{i:03d}.txt").write_text(doc)
    (texts / "empty.txt").write_text("")
    work = tmp_path / "clone"  # a working directory holding what the block refers to, and nothing else
    work.mkdir()
    (work / "launch").symlink_to(REPO / "launch")
    (work / ".venv").symlink_to(Path(sys.prefix))
    script = [f"TEXT={texts}", *(line + " " + SHORT if "launch/pretrain.py" in line else line for line in lines[1:])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(script)], cwd=work, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == [".venv", "data", "launch", "runs"]  # ignored by git
    vocab = json.loads((work / "data/mine/manifest.json").read_text())["tokenizer"]["vocab_size"]
    tag = (work / "runs/mine/checkpoints/latest").read_text().strip()
    record = json.loads((work / "runs/mine/checkpoints" / tag / "lillm.json").read_text())
    assert record["model_config"]["vocab_size"] == vocab  # the data's vocabulary, no flag needed
    assert "\nOnce upon a time" in r.stdout  # the sample (its text may hold newlines)
