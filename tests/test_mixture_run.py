"""A mixture end to end through the real `deepspeed` launcher: mix-debug.yaml's two stages on 2 CPU ranks,
per-source validation, and a resume across the stage switch on 2 ranks (bit-identical) and on 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lillm.runs import tensorboard_dir

from .conftest import launch, metrics, run_from_checkpoint

pytestmark = pytest.mark.slow

STAGES = [{"until_step": 8, "weights": {"prose": 0.8, "code": 0.2}},
          {"until_step": 12, "weights": {"prose": 0.5, "code": 0.5}}]
WINDOWS_PER_STEP = 4 * 2 * 2  # micro batch x accumulation x ranks


@pytest.fixture(scope="module")
def code_shards(tmp_path_factory, tokenizer_dir) -> Path:
    """Some of the standard library's sources, prepared with the prose shards' tokenizer."""
    from lillm.data.prepare import prepare
    from lillm.data.sources import iter_texts, open_source

    out = tmp_path_factory.mktemp("code_data")
    src = out / "code.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in iter_texts(open_source("stdlib"), limit=40)))
    prepare(open_source(str(src)), tokenizer_dir, out / "shards", shard_tokens=50_000, val_fraction=0.1,
            num_workers=1, progress=False)
    return out / "shards"


def _launch(prose: Path, code: Path, run_dir: Path, ranks: int = 2, accum: int = 2):
    sources = {"prose": {"dir": str(prose), "weight": 0.8}, "code": {"dir": str(code), "weight": 0.2}}
    args = ["--config", "launch/configs/mix-debug.yaml", "--ds_config", "ds_configs/zero2_cpu.json",
            "--data.sources", json.dumps(sources), "--data.stages", json.dumps(STAGES),
            "--train.run_dir", str(run_dir), "--train.max_steps", "12", "--train.log_interval", "1",
            "--train.eval_interval", "4", "--train.eval_batches", "2", "--train.sample_tokens", "0",
            "--train.ckpt_interval", "4", "--train.keep_checkpoints", "3", "--train.warmup_steps", "3",
            "--train.micro_batch_size", "4", "--train.seq_len", "64", "--train.grad_accum", str(accum)]
    return launch("launch/pretrain.py", args, ranks, timeout=600)


@pytest.fixture(scope="module")
def mix_run(pretrain_shards, code_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "mix"
    r = _launch(pretrain_shards, code_shards, run_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir, r


def test_stages_switch_at_their_step_and_each_source_is_scored(mix_run):
    run_dir, r = mix_run
    assert "mixture of 2 sources: code 0.2, prose 0.8 then 1 more stage(s)" in r.stdout
    code = metrics(run_dir, "train/tokens/code")
    prose = metrics(run_dir, "train/tokens/prose")
    seq = 64
    assert all(code[s] + prose[s] == s * WINDOWS_PER_STEP * seq for s in code)
    assert abs(code[8] / seq - 0.2 * 8 * WINDOWS_PER_STEP) < 1  # stage 1: a fifth, to within one window
    assert code[12] - code[8] == prose[12] - prose[8] == 2 * WINDOWS_PER_STEP * seq  # stage 2 from step 8: half
    vals = {k: metrics(run_dir, k)[12] for k in ("val/loss", "val/bpb", "val/prose/loss", "val/code/loss",
                                                 "val/prose/bpb", "val/code/bpb")}
    assert vals["val/loss"] == pytest.approx(0.8 * vals["val/prose/loss"] + 0.2 * vals["val/code/loss"])
    assert vals["val/bpb"] == pytest.approx(0.8 * vals["val/prose/bpb"] + 0.2 * vals["val/code/bpb"])
    assert vals["val/code/loss"] != vals["val/prose/loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir(run_dir))).Reload()
    assert {"val/prose/loss", "val/code/bpb", "train/tokens/code"} <= set(events.Tags()["scalars"])


def test_resume_across_the_switch_is_exact_on_two_ranks_and_on_one(mix_run, pretrain_shards, code_shards, tmp_path):
    run_dir, _ = mix_run
    ref = metrics(run_dir)
    again = run_from_checkpoint(run_dir, tmp_path / "again", "step_00000004")
    r = _launch(pretrain_shards, code_shards, again)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data mixture changed" not in r.stdout
    got = metrics(again)
    assert sorted(got) == list(range(5, 13)) and all(got[s] == ref[s] for s in got)  # bit-identical
    one = run_from_checkpoint(run_dir, tmp_path / "one", "step_00000004")
    r = _launch(pretrain_shards, code_shards, one, ranks=1, accum=4)  # the same global batch on one rank
    assert r.returncode == 0, r.stderr[-3000:]
    got = metrics(one)  # the same windows; Muon's sums in another order drift by ~1e-4 in 8 steps
    assert sorted(got) == list(range(5, 13)) and all(got[s] == pytest.approx(ref[s], abs=1e-3) for s in got)
    assert metrics(one, "train/tokens/code") == {s: v for s, v in metrics(run_dir, "train/tokens/code").items()
                                                 if s > 4}
