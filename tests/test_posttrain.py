"""SFT, DPO and LoRA end to end through the real `deepspeed` launcher on 2 CPU ranks; export, chat, bad input.

Launches are shared: one SFT run (packed, full fine-tuning) and one DPO run (LoRA, on top of the SFT run)
serve most assertions; each resume test adds one launch.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lillm.hf import export_hf

from .conftest import ENV, QA, REPO, SYSTEMS, launch, metrics, run_cli, tiny_model
from .conftest import run_from_checkpoint as _run_from_checkpoint

pytestmark = pytest.mark.slow

def _common(run_dir: Path, steps: int, ckpt: int) -> list[str]:
    return ["--ds_config", "ds_configs/zero2_cpu.json", "--train.run_dir", str(run_dir),
            "--train.max_steps", str(steps), "--train.log_interval", "1", "--train.ckpt_interval", str(ckpt),
            "--train.warmup_steps", "2", "--train.seq_len", "128", "--train.sample_tokens", "8",
            "--train.sample_prompt", QA[0][0]]


def sft_args(base: Path, data: Path, run_dir: Path, steps: int = 80, *extra: str) -> list[str]:
    return ["--config", "launch/configs/sft-debug.yaml", "--init_from", str(base), "--data.source", str(data),
            "--data.val_fraction", "0.1", "--data.packing", "true", "--train.micro_batch_size", "2",
            "--train.lr", "5e-3", "--train.min_lr", "5e-4", "--train.eval_interval", "40",
            *_common(run_dir, steps, 40), *extra]


def dpo_args(init: Path, data: Path, run_dir: Path, steps: int = 16, *extra: str) -> list[str]:
    return ["--config", "launch/configs/dpo-debug.yaml", "--init_from", str(init), "--data.source", str(data),
            "--data.val_fraction", "0", "--train.micro_batch_size", "2", "--train.lr", "3e-3",
            "--train.eval_interval", "0", "--lora.rank", "4", *_common(run_dir, steps, 8), *extra]


@pytest.fixture(scope="module")
def base(chat_base) -> Path:
    return chat_base


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "conversations.jsonl"
    with open(path, "w") as fh:
        for system in SYSTEMS:
            for q, a in QA:
                if system:
                    msgs = [{"role": "system", "content": system}, {"role": "user", "content": q},
                            {"role": "assistant", "content": a}]
                    fh.write(json.dumps({"messages": msgs}) + "\n")
                else:
                    fh.write(json.dumps({"prompt": q, "response": a}) + "\n")
    return path


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dpo") / "prefs.jsonl"
    with open(path, "w") as fh:
        for k, (q, a) in enumerate(QA):
            fh.write(json.dumps({"prompt": q, "chosen": a, "rejected": "I do not know." if k % 2 else "No."}) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_run(base, sft_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "sft"
    r = launch("launch/sft.py", sft_args(base, sft_data, run_dir))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir, r


@pytest.fixture(scope="module")
def dpo_run(sft_run, dpo_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "dpo"
    r = launch("launch/dpo.py", dpo_args(sft_run[0], dpo_data, run_dir))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir, r


def _greedy_reply(model_path: Path, question: str) -> str:
    from lillm.chat import ChatSession
    from lillm.generate import SamplingConfig
    from lillm.loading import load_model

    model, tok = load_model(model_path)
    session = ChatSession(model, tok, SamplingConfig(max_new_tokens=24, temperature=0))
    return "".join(session.reply(question))


def test_sft_learns_fixed_answers(sft_run):
    run_dir, r = sft_run
    losses = metrics(run_dir)
    assert sorted(losses) == list(range(1, 81)) and losses[80] < 0.2 * losses[1]
    assert "lillm sft:" in r.stdout and "2 rank(s) on cpu" in r.stdout and "step 80/80 | loss" in r.stdout
    assert sorted(metrics(run_dir, "val/loss")) == [40, 80]
    # The seen prompt gets its answer, greedily, through the chat path.
    for question, answer in QA[:4]:
        assert _greedy_reply(run_dir, question) == answer


def test_sft_resume_is_bit_identical(sft_run, base, sft_data, tmp_path):
    run_dir, _ = sft_run
    resumed = _run_from_checkpoint(run_dir, tmp_path / "resumed", "step_00000040")
    r = launch("launch/sft.py", sft_args(base, sft_data, resumed))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 40" in r.stdout
    ref, got = metrics(run_dir), metrics(resumed)
    assert sorted(got) == list(range(41, 81)) and all(got[s] == ref[s] for s in got), (got, ref)


def test_sft_resume_on_one_rank_from_a_two_rank_checkpoint(sft_run, base, sft_data, tmp_path):
    run_dir, _ = sft_run
    one = _run_from_checkpoint(run_dir, tmp_path / "one", "step_00000040")
    # The same global batch on one rank: twice the accumulation.
    r = launch("launch/sft.py", sft_args(base, sft_data, one, 80, "--train.grad_accum", "2"), ranks=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "universal format" in r.stdout and "at step 40" in r.stdout
    ref, got = metrics(run_dir), metrics(one)
    assert sorted(got) == list(range(41, 81))
    for s in got:
        assert got[s] == pytest.approx(ref[s], abs=1e-5)


def test_dpo_with_lora_raises_the_margin_and_saves_only_the_adapter(dpo_run, sft_run):
    from safetensors.torch import load_file

    run_dir, r = dpo_run
    margins = metrics(run_dir, "dpo/reward_margin")
    acc = metrics(run_dir, "dpo/accuracy")
    assert abs(margins[1]) < 0.05 and margins[16] > 0.5 and acc[16] == 1.0
    for key in ("dpo/rewards_chosen", "dpo/rewards_rejected", "dpo/logps_chosen", "dpo/logps_rejected"):
        assert len(metrics(run_dir, key)) == 16
    assert "LoRA rank 4" in r.stdout
    tag = run_dir / "checkpoints/step_00000016"
    adapter = load_file(tag / "adapter.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    module = torch.load(next(tag.glob("*model_states.pt")), weights_only=False)["module"]
    assert all("lora_" in k for k in module), [k for k in module if "lora_" not in k][:3]  # no base weights


def test_dpo_resume_is_bit_identical(dpo_run, sft_run, dpo_data, tmp_path):
    run_dir, _ = dpo_run
    resumed = _run_from_checkpoint(run_dir, tmp_path / "resumed", "step_00000008")
    r = launch("launch/dpo.py", dpo_args(sft_run[0], dpo_data, resumed))
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got = metrics(run_dir), metrics(resumed)
    assert sorted(got) == list(range(9, 17)) and all(got[s] == ref[s] for s in got), (got, ref)


def test_export_of_a_lora_run_answers_like_lillm_chat_in_transformers(dpo_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    run_dir, _ = dpo_run
    out = tmp_path / "exported"
    r = run_cli("export", str(run_dir), str(out))
    assert r.returncode == 0, r.stderr
    ours = _greedy_reply(out, QA[0][0])
    assert ours == _greedy_reply(run_dir, QA[0][0])  # merged export == run directory
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    got = pipe([{"role": "user", "content": QA[0][0]}], max_new_tokens=24, do_sample=False)
    assert got[0]["generated_text"][-1] == {"role": "assistant", "content": ours}


def _read_until(fd: int, marker: str, timeout: float = 120) -> str:
    buf, deadline = "", time.time() + timeout
    while marker not in buf:
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {marker!r}; got {buf!r}")
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                buf += os.read(fd, 4096).decode(errors="replace")
            except OSError:
                break
    return buf


def test_chat_in_a_pseudo_terminal(sft_run):
    run_dir, _ = sft_run
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "lillm.cli", "chat", str(run_dir), "--temperature", "0"],
                            stdin=follower, stdout=follower, stderr=follower, cwd=REPO, env=ENV, close_fds=True)
    os.close(follower)
    try:
        _read_until(leader, "you> ")
        os.write(leader, (QA[0][0] + "\n").encode())
        out = _read_until(leader, "you> ")
        assert "assistant> " + QA[0][1] in out
        os.write(leader, b"/system Answer plainly.\n")
        assert "system message set" in _read_until(leader, "you> ")
        os.write(leader, b"/set top_k -1\n")
        assert "invalid value" in _read_until(leader, "you> ")
        os.write(leader, b"/history\n")
        assert "system: Answer plainly." in _read_until(leader, "you> ")
        os.write(leader, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


def test_full_dpo_with_a_reference_copy_and_ipo(process_group, sft_run, dpo_data, tmp_path):
    from lillm.train import posttrain

    run_dir = tmp_path / "ipo"
    args = dpo_args(sft_run[0], dpo_data, run_dir, 4, "--lora.rank", "0", "--dpo.loss", "ipo", "--train.lr", "1e-3")
    trainer = posttrain.build(*posttrain.parse_config("dpo", args), "dpo")
    assert trainer.objective.reference is not None  # a frozen copy outside the engine
    assert trainer.fit() == 0
    assert metrics(run_dir, "dpo/reward_margin")[4] > metrics(run_dir, "dpo/reward_margin")[1]
    assert (run_dir / "checkpoints/step_00000004").is_dir()


def _no_chat_tokens_base(tmp_path: Path, small_texts) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lillm.tokenizer import EOS, Tokenizer

    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(small_texts[:50], trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                                                  show_progress=False))
    out = tmp_path / "nochat"
    export_hf(tiny_model(vocab_size=512, max_seq_len=128), out, tokenizer_dir=Tokenizer(raw))
    return out


def _refused(task: str, args: list[str]) -> str:
    """The UserError message of building a post-training run in-process (nothing is trained)."""
    from lillm.errors import UserError
    from lillm.train import posttrain

    with pytest.raises(UserError) as e:
        posttrain.build(*posttrain.parse_config(task, args), task)
    return str(e.value)


def test_bad_inputs_are_refused(process_group, base, sft_run, dpo_run, sft_data, dpo_data, tmp_path, small_texts):
    def bad(name: str, records: list) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(x) + "\n" for x in records))
        return path

    # Through the real command: one line on stderr, exit 2, no traceback.
    r = launch("launch/sft.py", sft_args(_no_chat_tokens_base(tmp_path, small_texts), sft_data, tmp_path / "r5"),
               ranks=1, timeout=300)
    assert r.returncode == 2 and "lacks the chat tokens" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    # The same code path in-process, for each bad record.
    ok = {"prompt": "Hi", "response": "Hello."}
    cases = [
        ("sft", sft_args(base, bad("role.jsonl", [ok, {"messages": [{"role": "robot", "content": "x"}]}]),
                         tmp_path / "r1"), "role.jsonl:2: message 0 has unknown role 'robot'"),
        ("sft", sft_args(base, bad("empty.jsonl", [{"messages": [{"role": "user", "content": "q"}, {
            "role": "assistant", "content": ""}]}]), tmp_path / "r2"), "empty assistant turn"),
        ("sft", sft_args(base, bad("noasst.jsonl", [{"messages": [{"role": "user", "content": "q"}]}]),
                         tmp_path / "r3"), "no assistant turn"),
        ("dpo", dpo_args(base, bad("same.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}]),
                         tmp_path / "r4"), "identical"),
    ]
    for task, args, msg in cases:
        assert msg in _refused(task, args)
    # A LoRA adapter for another base: resuming the DPO run on the raw base instead of the SFT model.
    dpo_dir, _ = dpo_run
    before = sorted(p.name for p in (dpo_dir / "checkpoints").iterdir())
    assert "trained on another base model" in _refused("dpo", dpo_args(base, dpo_data, dpo_dir, 20))
    # A LoRA checkpoint at another world size: refused (DeepSpeed's universal conversion gets it wrong).
    assert "resume only at their own world size" in _refused("dpo", dpo_args(sft_run[0], dpo_data, dpo_dir, 20))
    assert sorted(p.name for p in (dpo_dir / "checkpoints").iterdir()) == before
    # ... and merging it into a base that changed since.
    meta = json.loads((dpo_dir / "checkpoints/step_00000016/lillm.json").read_text())
    copy = tmp_path / "dpo_copy"
    shutil.copytree(dpo_dir, copy)
    meta["init_from"] = str(base)
    (copy / "checkpoints/step_00000016/lillm.json").write_text(json.dumps(meta))
    r = run_cli("export", str(copy), str(tmp_path / "never"))
    assert r.returncode == 2 and "another base model" in r.stderr and not (tmp_path / "never").exists(), r.stderr
