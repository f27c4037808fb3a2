"""The bad-input campaign, kept: every command handed hostile input, table-driven.

Each row runs one `lillm` command line in-process (the console script's own `main`, which is also what
`lillm pretrain|sft|dpo` dispatch to) against a workspace of real outputs: a tokenizer, shards, a training
run with a checkpoint, its export, and damaged copies of them. Every row must give exit code 2, exactly one
line on stderr naming the problem, no traceback, within a time bound, and leave every file in the
workspace as it was (nothing written, nothing lost). Each row is its own test case, named by its command and
the fragment; LILLM_CAMPAIGN_VERBOSE=1 with pytest -s prints every row's error line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lillm import cli
from lillm.tokenizer import train_tokenizer

from .conftest import ENV, QA

HANG_S = 120
VERBOSE = bool(os.environ.get("LILLM_CAMPAIGN_VERBOSE"))  # print every row's error line


@pytest.fixture(scope="module")
def ws(tmp_path_factory, process_group, tokenizer_dir, pretrain_shards, chat_base, small_texts) -> Path:
    """The workspace: good outputs and damaged copies, built once."""
    from lillm.train import pretrain

    root = tmp_path_factory.mktemp("campaign")
    shutil.copytree(tokenizer_dir, root / "tok")
    shutil.copytree(pretrain_shards, root / "shards")
    shutil.copytree(chat_base, root / "chatbase")
    cfg, yaml = pretrain.parse_config([
        "--config", "debug", "--ds_config", "zero2_cpu", "--model.vocab_size", "1024", "--train.seq_len", "32",
        "--train.micro_batch_size", "2", "--train.grad_accum", "1", "--train.max_steps", "2",
        "--train.warmup_steps", "1", "--train.ckpt_interval", "1", "--train.eval_interval", "0",
        "--train.sample_tokens", "0", "--train.tensorboard", "false", "--data.num_workers", "0",
        "--data.dir", str(root / "shards"), "--train.run_dir", str(root / "run")])
    assert pretrain.build(cfg, yaml).fit() == 0
    assert cli_exit(["export", str(root / "run"), str(root / "export")]) == 0
    (root / "a_file").write_text("keep me\n")
    (root / "ds_conflict.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 16,
                                                       "zero_optimization": {"stage": 2}}))
    (root / "empty.txt").write_text("")
    train_tokenizer([t.upper() for t in small_texts], vocab_size=1024, progress=False).save(root / "other_tok")
    from lillm.data.prepare import prepare
    from lillm.data.sources import open_source

    (root / "upper.jsonl").write_text("".join(json.dumps({"text": t.upper()}) + "\n" for t in small_texts[:60]))
    prepare(open_source(str(root / "upper.jsonl")), root / "other_tok", root / "shards_other_tok",
            shard_tokens=50_000, val_fraction=0.1, num_workers=1, progress=False)

    def damaged_run(name, damage):  # the run's latest tag (step 2) damaged; step 1 stays intact
        shutil.copytree(root / "run", root / name)
        damage(sorted((root / name / "checkpoints").glob("step_*"))[-1])

    damaged_run("run_bad_meta", lambda tag: (tag / "lillm.json").write_text("{"))
    damaged_run("run_meta_list", lambda tag: (tag / "lillm.json").write_text("[1, 2]"))
    damaged_run("run_meta_null", lambda tag: (tag / "lillm.json").write_text("null"))
    damaged_run("run_meta_partial", lambda tag: (tag / "lillm.json").write_text('{"step": 30, "world_size": 2}'))
    damaged_run("run_latest_bytes", lambda tag: (tag.parent / "latest").write_bytes(bytes(range(200, 256))))
    damaged_run("run_truncated", lambda tag: _truncate(next(tag.glob("*optim_states.pt"))))
    damaged_run("run_no_model", lambda tag: next(tag.glob("*model_states.pt")).unlink())
    for name, forge in (("shards_bad_dtype", lambda m: m.update(dtype="float64")),
                        ("shards_no_dtype", lambda m: m.pop("dtype")),
                        ("shards_uint8", lambda m: m.update(dtype="uint8")),
                        ("shards_escape", lambda m: m["splits"]["train"]["shards"][0].update(file="../a_file")),
                        ("shards_no_splits", lambda m: m.pop("splits"))):
        shutil.copytree(root / "shards", root / name)
        manifest = json.loads((root / name / "manifest.json").read_text())
        forge(manifest)
        (root / name / "manifest.json").write_text(json.dumps(manifest))
    (root / "sft_bad.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    hs = {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["d", "e", "f", "g"], "label": "1"}
    (root / "hs_missing.jsonl").write_text(json.dumps({k: v for k, v in hs.items() if k != "endings"}) + "\n")
    (root / "hs_label.jsonl").write_text(json.dumps({**hs, "label": "7"}) + "\n")
    (root / "arc_one.jsonl").write_text(json.dumps({"question": "q", "answerKey": "A",
                                                    "choices": {"text": ["x"], "label": ["A"]}}) + "\n")
    word = "".join(chr(97 + (i * 7 + i // 26) % 26) for i in range(4000))  # one 'word' longer than the context
    (root / "lambada_long.jsonl").write_text(json.dumps({"text": f"the last word is {word}"}) + "\n")
    (root / "sft.jsonl").write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in QA))
    (root / "dpo.jsonl").write_text("".join(json.dumps({"prompt": q, "chosen": a, "rejected": "no"}) + "\n"
                                            for q, a in QA))
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def cli_exit(argv: list[str]) -> int:
    try:
        cli.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root: a file's sha256, or 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def rows(w: Path) -> list[tuple[list[str], str]]:
    """(argv with {w} for the workspace, a fragment the error line must hold)."""
    tr = ["--config", "debug", "--ds_config", "zero2_cpu", "--data.dir", f"{w}/shards", "--train.run_dir", f"{w}/r1",
          "--model.vocab_size", "1024"]
    post = ["--init_from", f"{w}/chatbase", "--ds_config", "zero2_cpu", "--train.run_dir", f"{w}/r2"]
    sft = ["sft", "--config", "sft-debug", *post]

    def mix(sources: str, stages: str = "[]") -> list[str]:
        return ["--data.sources", sources.replace("dir: S", f"dir: {w}/shards"), "--data.stages", stages]

    dpo = ["dpo", "--config", "dpo-debug", *post]
    return [
        # generate
        (["generate", f"{w}/nope", "x"], "no such file"),
        (["generate", f"{w}/export", "x", "--temperature", ".nan"], "finite"),
        (["generate", f"{w}/export", "x", "--top_p", "2"], "top_p must be in (0, 1]"),
        (["generate", f"{w}/export", "x", "--top_p", ".nan"], "top_p must be a finite number"),
        (["generate", f"{w}/export", json.dumps(["x"] * 1000)], "max_batch_size"),
        (["generate", f"{w}/export", "x", "--top_k", "-1"], "top_k"),
        (["generate", f"{w}/export", "x", "--max_new_tokens", "-5"], "max_new_tokens"),
        (["generate", f"{w}/export", "x", "--tokenizer", f"{w}/other_tok"], "--force_tokenizer"),
        (["generate", f"{w}/run", "x", "--tokenizer", f"{w}/other_tok"], "--force_tokenizer"),
        (["generate", f"{w}/export", "x", "--tokenizer", f"{w}/a_file"], "not a valid tokenizer"),
        (["generate", f"{w}/export", "x", "--device", "cuda:0"], "CUDA"),
        (["generate", f"{w}/export", "x", "--dtype", "float8"], "see lillm generate --help"),
        (["generate", f"{w}/shards", "x"], "not a model directory"),
        (["generate", f"{w}/run_bad_meta", "x"], "lillm.json"),
        (["generate", f"{w}/run_truncated", "x"], "optim_states"),
        (["generate", f"{w}/run_no_model", "x"], "model_states"),
        (["generate", f"{w}/export", "x" * 5000], "prompt"),
        (["generate", f"{w}/export"], "see lillm generate --help"),
        # chat
        (["chat", f"{w}/chatbase", "--temperature", ".inf"], "finite"),
        (["chat", f"{w}/chatbase", "--tokenizer", f"{w}/other_tok"], "--force_tokenizer"),
        (["chat", f"{w}/a_file"], "not a model directory"),
        # train-tokenizer
        (["train-tokenizer", "pydoc", f"{w}/a_file", "--vocab_size", "300"], "not a directory"),
        (["train-tokenizer", "pydoc", f"{w}/t1", "--min_frequency", "-3"], "min_frequency"),
        (["train-tokenizer", "pydoc", f"{w}/t2", "--vocab_size", "10"], "vocab_size"),
        (["train-tokenizer", f"{w}/nope.txt", f"{w}/t3"], "no such file"),
        (["train-tokenizer", f"{w}/empty.txt", f"{w}/t4"], "no documents"),
        (["train-tokenizer", "pydoc", f"{w}/t5", "--sample_every", "0"], "sample_every"),
        # prepare
        (["prepare", "pydoc", f"{w}/tok", f"{w}/a_file"], "File exists"),
        (["prepare", "pydoc", f"{w}/nope", f"{w}/p1"], "no tokenizer.json"),
        (["prepare", "pydoc", f"{w}/tok", f"{w}/p2", "--num_workers", "-4"], "num_workers"),
        (["prepare", "pydoc", f"{w}/tok", f"{w}/p3", "--val_fraction", "1.5"], "val_fraction"),
        (["prepare", "pydoc", f"{w}/tok", f"{w}/p4", "--val_fraction", ".nan"], "val_fraction"),
        (["prepare", "pydoc", f"{w}/tok", f"{w}/p5", "--shard_tokens", "10"], "shard_tokens"),
        (["prepare", f"{w}/empty.txt", f"{w}/tok", f"{w}/p6"], "no documents"),
        (["prepare", "pydoc", f"{w}/tok", f"{w}/shards"], "--overwrite"),
        (["prepare", "pydoc", f"{w}/tok", f"{w}/shards_bad_dtype"], "'dtype' is 'float64'"),
        # shards
        (["shards", f"{w}/shards_bad_dtype"], "'dtype' is 'float64'"),
        (["shards", f"{w}/shards_no_dtype"], "'dtype' is None"),
        (["shards", f"{w}/shards_uint8"], "'dtype' is 'uint8'"),
        (["shards", f"{w}/shards_escape"], "'../a_file'"),
        (["shards", f"{w}/shards_no_splits"], "'splits'"),
        (["shards", f"{w}/nope"], "no manifest.json"),
        (["shards", f"{w}/a_file"], "no manifest.json"),
        # export
        (["export", f"{w}/run", f"{w}/a_file"], "File exists"),
        (["export", f"{w}/run_truncated", f"{w}/e1"], "optim_states"),
        (["export", f"{w}/run_bad_meta", f"{w}/e2"], "lillm.json"),
        (["export", f"{w}/shards", f"{w}/e3"], "no lillm.json"),
        (["export", f"{w}/run", f"{w}/e4", "--dtype", "int8"], "see lillm export --help"),
        # run files damaged by a crash, a copy or a person: one line naming the file and the intact tag to use
        *[([cmd, f"{w}/{run}", *extra], fragment) for cmd, extra in (("generate", ["x"]), ("export", [f"{w}/e5"]),
                                                                      ("checkpoint", []))
          for run, fragment in (("run_meta_list", "a JSON list, not an object (damaged); the newest intact "
                                                  "checkpoint of this run is"),
                                ("run_meta_null", "lillm.json: a JSON NoneType"),
                                ("run_meta_partial", "no 'model_config' object (damaged)"),
                                ("run_latest_bytes", "latest: not text (damaged); the newest intact"))],
        # checkpoint
        (["checkpoint", f"{w}/run", "--convert_universal", "true"], "is a Muon checkpoint: it is not converted"),
        (["checkpoint", f"{w}/run_bad_meta"], "lillm.json"),
        (["checkpoint", f"{w}/run_no_model"], "model_states"),
        (["checkpoint", f"{w}/nope"], "not found"),
        # eval
        (["eval", f"{w}/nope"], "no such file"),
        (["eval", f"{w}/export", "--tasks", "nope"], "unknown task 'nope'"),
        (["eval", f"{w}/export", "--tasks", "bpb"], "bpb needs a text source"),
        (["eval", f"{w}/export", "--tasks", "pydoc-continuation:x"], "takes no source"),
        (["eval", f"{w}/export", "--tasks", f"hellaswag:{w}/nope.jsonl"], "no such file"),
        (["eval", f"{w}/export", "--tasks", f"hellaswag:{w}/hs_missing.jsonl"], "missing field 'endings'"),
        (["eval", f"{w}/export", "--tasks", f"hellaswag:{w}/hs_label.jsonl"], "field 'label' is 7"),
        (["eval", f"{w}/export", "--tasks", f"arc_easy:{w}/arc_one.jsonl"], "1 choice(s)"),
        (["eval", f"{w}/export", "--tasks", f"piqa:{w}/sft_bad.jsonl"], "missing field 'sol1'"),
        (["eval", f"{w}/export", "--tasks", f"lambada:{w}/lambada_long.jsonl"], "longer than the model's context"),
        (["eval", f"{w}/export", "--tasks", f"bpb:{w}/empty.txt"], "no documents"),
        (["eval", f"{w}/export", "--limit", "0"], "limit must be >= 1"),
        (["eval", f"{w}/export", "--out", f"{w}/shards"], "is a directory"),
        # pretrain (each refused before any process group or run directory exists)
        (["pretrain", *tr, "--train.lr", ".nan"], "lr must be a finite number, got nan"),
        (["pretrain", *tr, "--train.grad_clip", ".nan"], "grad_clip must be a finite number"),
        (["pretrain", *tr, "--train.run_dir", f"{w}/a_file"], "is a file"),
        (["pretrain", *tr, "--train.run_dir", f"{w}/a_file/run"], "is a file"),
        (["pretrain", *tr, "--data.dir", f"{w}/shards_bad_dtype"], "'dtype' is 'float64'"),
        (["pretrain", *tr, "--data.dir", f"{w}/nope"], "no manifest.json"),
        (["pretrain", *tr, "--data.num_workers", "-4"], "num_workers"),
        (["pretrain", *tr, "--model.vocab_size", "100"], "model.vocab_size is 100"),
        (["pretrain", *tr, "--ds_config", f"{w}/nope.json"], "nope.json: no such file"),
        (["pretrain", *tr, "--ds_config", f"{w}/a_file"], "a_file: invalid JSON"),
        (["pretrain", *tr, "--train.micro_batch_size", "0"], "micro_batch_size must be positive"),
        (["pretrain", *tr, "--train.bogus", "1"], "see lillm pretrain --help"),
        (["pretrain", "--config", f"{w}/nope.yaml"], "File does not exist"),
        (["pretrain", *tr, "--train.global_batch_tokens", "1000"], "not a multiple"),
        (["pretrain", *tr, "--ds_config", f"{w}/ds_conflict.json"], "conflicts with the training config"),
        (["pretrain", *tr, "--train.run_dir", f"{w}/run", "--model.n_layers", "2"], "another model config"),
        (["pretrain", *tr, "--train.run_dir", f"{w}/run", "--ds_config", "zero2"],
         "it was trained in fp32 and this run's DeepSpeed config is bf16"),
        # pretrain on a mixture (data.sources, data.stages)
        (["pretrain", *tr, *mix("{a: {dir: S, weight: -1}, b: {dir: S}}")], "sources.a.weight must be a number from 0"),
        (["pretrain", *tr, *mix("{a: {dir: S, weight: 0}, b: {dir: S, weight: 0}}")], "sum to 0"),
        (["pretrain", *tr, *mix("{a: {dir: S, weight: .nan}, b: {dir: S}}")], "sources.a.weight must be a number"),
        (["pretrain", *tr, *mix("{1: {dir: S}}")], "1 is not a usable source name"),
        (["pretrain", *tr, *mix("{a: {dir: S}}", "[{until_step: 9, weights: {c: 1}}]")],
         "stages[0].weights names 'c', which is not a source"),
        (["pretrain", *tr, *mix("{a: {dir: S}}", "[{until_step: 9, weights: {a: .inf}}]")],
         "stages[0].weights.a must be a number from 0"),
        (["pretrain", *tr, *mix("{a: {dir: S}, b: {dir: S}}", "[{until_step: 9, weights: {a: 1}}, "
                                "{until_step: 5, weights: {b: 1}}]")], "stages go in order"),
        (["pretrain", *tr, *mix("{a: {dir: S}}", "[{until_step: 9, weights: {a: 0}}]")], "stages[0].weights sum to 0"),
        (["pretrain", *tr, *mix("{a: {dir: S}}", "[{until_step: 400, weights: {a: 1}}]")],
         "until_step=400 is past the run's last step (300)"),
        (["pretrain", *tr, "--data.stages", "[{until_step: 9, weights: {a: 1}}]"], "stages need data.sources"),
        (["pretrain", *tr, *mix(f"{{a: {{dir: S}}, b: {{dir: {w}/shards_other_tok}}}}")],
         "were prepared with different tokenizers"),
        (["pretrain", *tr, *mix(f"{{a: {{dir: S}}, b: {{dir: {w}/nope}}}}")], "no manifest.json"),
        (["pretrain", *tr, "--train.run_dir", f"{w}/run", "--train.seq_len", "32", "--train.micro_batch_size", "2",
          "--train.grad_accum", "1", "--train.max_steps", "4", *mix("{a: {dir: S}}")], "trained on one data.dir"),
        # sft and dpo
        ([*sft, "--data.source", f"{w}/sft.jsonl", "--train.lr", ".inf"], "lr must be a finite number, got inf"),
        ([*sft, "--data.source", f"{w}/nope.jsonl"], "no such file"),
        ([*sft, "--data.source", f"{w}/sft_bad.jsonl"], "sft_bad.jsonl"),
        ([*sft, "--data.source", f"{w}/sft.jsonl", "--init_from", f"{w}/shards"], "not a model directory"),
        ([*sft, "--data.source", f"{w}/sft.jsonl", "--init_from", f"{w}/run_truncated"], "optim_states"),
        ([*dpo, "--data.source", f"{w}/dpo.jsonl", "--dpo.beta", ".nan"], "beta must be a positive finite number"),
        ([*dpo, "--data.source", f"{w}/sft.jsonl"], "chosen"),
        ([*dpo, "--data.source", f"{w}/dpo.jsonl", "--lora.rank", "-1"], "rank must be >= 0"),
    ]


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` in the code under test swallows it."""


W = "{w}"  # the workspace in a row, replaced by its path when the row runs
ROWS = rows(Path(W))


def _row_id(row: tuple[list[str], str]) -> str:
    argv, fragment = row
    return f"{argv[0]}-{fragment[:40]}"


@pytest.fixture(scope="module")
def pristine(ws) -> dict[str, str]:
    """The workspace as built; every row must leave it so (a row that changes it restores it for the next)."""
    return snapshot(ws)


@pytest.mark.parametrize("row", ROWS, ids=[f"{i:02d}-{_row_id(r)}" for i, r in enumerate(ROWS)])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(row, ws, pristine, monkeypatch, capsys):
    """One command line of the campaign: exit 2, exactly one stderr line holding the fragment, no traceback,
    no hang, and every file of the workspace as it was."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)  # training rows keep the session's group
    argv = [a.replace(W, str(ws)) for a in row[0]]
    fragment = row[1]
    err, out = io.StringIO(), io.StringIO()

    def alarm(*_):
        raise Hang

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_S)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli_exit(argv)
    except Hang:
        code = "hang"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        after = snapshot(ws)
        changed = sorted(set(after.items()) ^ set(pristine.items()))
        if changed:
            _restore(ws, pristine, after)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if VERBOSE and lines:
        with capsys.disabled():
            print(f"\n{argv[0]}: {lines[0].replace(str(ws), W)[:150]}")
    assert code == 2, f"exit {code}; stderr {err.getvalue()[-2000:]}"
    assert "Traceback" not in err.getvalue(), err.getvalue()[-2000:]
    assert len(lines) == 1 and fragment in lines[0], lines
    assert not changed, f"files changed: {changed[:4]}"


def test_the_campaign_has_its_rows_and_covers_every_command():
    assert len(ROWS) >= 100
    covered = {argv[0] for argv, _ in ROWS}
    assert covered == {*cli.COMMANDS, *cli.TRAINING}, {*cli.COMMANDS, *cli.TRAINING} - covered


def _restore(ws: Path, before: dict[str, str], after: dict[str, str]) -> None:
    """Remove what a failing row created, so the next rows start from the same workspace."""
    for rel in sorted(set(after) - set(before), key=len, reverse=True):
        p = ws / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def test_a_tokenizer_of_the_same_model_is_accepted_and_force_overrides(ws, capsys):
    # An export's tokenizer (with its prompt prefix) and its run's are the same encoding.
    assert cli_exit(["generate", f"{ws}/run", "x", "--tokenizer", f"{ws}/export", "--max_new_tokens", "2"]) == 0
    assert cli_exit(["generate", f"{ws}/export", "x", "--tokenizer", f"{ws}/tok", "--max_new_tokens", "2"]) == 0
    assert cli_exit(["generate", f"{ws}/export", "x", "--tokenizer", f"{ws}/other_tok", "--max_new_tokens", "2",
                     "--force_tokenizer", "true"]) == 0
    assert "error" not in capsys.readouterr().err


def test_a_full_disk_at_startup_is_one_line_before_training(ws, tmp_path):
    """The real command, its run directory on a full file system: refused at startup, nothing trained."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        (mnt / "fill").write_bytes(b"\0" * (200 << 10))
        r = subprocess.run([sys.executable, "-m", "lillm.train.pretrain", "--config", "debug", "--ds_config",
                            "zero2_cpu", "--data.dir", str(ws / "shards"), "--model.vocab_size", "1024",
                            "--train.run_dir", str(mnt / "run"), "--train.max_steps", "5", "--data.num_workers", "0"],
                           capture_output=True, text=True, timeout=300, env=ENV)
        errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len(errors) == 1 and "free on its disk" in errors[0] and "needs about" in errors[0], errors
        assert not (mnt / "run" / "checkpoints").exists() or not any((mnt / "run" / "checkpoints").iterdir())
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("run,resumed_from", [("run_meta_list", 1), ("run_meta_null", 1), ("run_meta_partial", 1),
                                              ("run_latest_bytes", 2)])
def test_auto_resume_falls_back_past_damaged_run_files(ws, tmp_path, monkeypatch, run, resumed_from):
    """A damaged lillm.json of the latest tag, or a damaged `latest`: auto-resume goes on from the newest
    intact tag, and the run ends with an intact latest checkpoint."""
    import torch.distributed as dist

    from lillm.runs import checkpoint_problem, read_meta, resolve_checkpoint

    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    shutil.copytree(ws / run, tmp_path / run)
    code = cli_exit(["pretrain", "--config", "debug", "--ds_config", "zero2_cpu", "--model.vocab_size", "1024",
                     "--train.seq_len", "32", "--train.micro_batch_size", "2", "--train.grad_accum", "1",
                     "--train.max_steps", "3", "--train.warmup_steps", "1", "--train.ckpt_interval", "1",
                     "--train.eval_interval", "0", "--train.sample_tokens", "0", "--train.tensorboard", "false",
                     "--data.num_workers", "0", "--data.dir", str(ws / "shards"), "--train.run_dir",
                     str(tmp_path / run)])
    assert code == 0
    latest = resolve_checkpoint("auto", tmp_path / run)
    assert latest.name == "step_00000003" and checkpoint_problem(latest) is None
    step2 = tmp_path / run / "checkpoints/step_00000002/lillm.json"
    assert read_meta(step2.parent)["step"] == 2  # a damaged tag was trained again from step 1 and replaced
    assert (step2.read_bytes() == (ws / run / "checkpoints/step_00000002/lillm.json").read_bytes()) == \
        (resumed_from == 2)  # an intact step 2 (only `latest` damaged) was resumed from, not rewritten
