"""Training components without a process group: schedule, batch arithmetic, ds_config, checkpoints, configs."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from lillm import LilLM, ModelConfig
from lillm.errors import UserError
from lillm.runs import resolve_checkpoint
from lillm.train.checkpoint import Checkpoint, RunIdentity
from lillm.train.config import TrainConfig, plan_batches
from lillm.train.ds_config import fill_ds_config, load_ds_config
from lillm.train.pretrain import parse_config
from lillm.train.schedule import lr_at

from .conftest import REPO


def test_cosine_schedule_warms_up_and_ends_at_min_lr():
    kw = dict(lr=6e-4, min_lr=6e-5, warmup_steps=2000, max_steps=15259, schedule="cosine")
    assert lr_at(0, **kw) == pytest.approx(6e-4 / 2000)
    assert lr_at(1999, **kw) == pytest.approx(6e-4)
    assert lr_at(15258, **kw) == pytest.approx(6e-5)
    lrs = [lr_at(s, **kw) for s in range(2000, 15259, 50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_linear_wsd_constant_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(109, schedule="linear", **kw) == pytest.approx(0.1)
    assert lr_at(60, schedule="linear", **kw) == pytest.approx(0.55, abs=0.01)
    assert lr_at(50, schedule="wsd", decay_fraction=0.2, **kw) == 1.0
    assert lr_at(109, schedule="wsd", decay_fraction=0.2, **kw) == pytest.approx(0.1)
    assert lr_at(100, schedule="constant", **kw) == 1.0


def test_batch_arithmetic():
    train = TrainConfig(micro_batch_size=32, global_batch_tokens=524288, max_tokens=8_000_000_000)
    plan = plan_batches(train, 512, 2)
    assert plan.grad_accum == 16 and plan.tokens_per_step == 524288 and plan.max_steps == 15259
    assert plan_batches(train, 512, 4).grad_accum == 8
    with pytest.raises(UserError, match="not a multiple"):
        plan_batches(train, 512, 3)
    with pytest.raises(UserError, match="disagrees"):
        plan_batches(TrainConfig(micro_batch_size=32, grad_accum=4, global_batch_tokens=524288, max_steps=1), 512, 2)
    with pytest.raises(ValueError, match="set max_steps or max_tokens"):
        TrainConfig()


def test_ds_config_auto_is_filled_and_conflicts_rejected():
    train = TrainConfig(micro_batch_size=4, grad_accum=2, max_steps=10, lr=1e-3, grad_clip=0.5)
    plan = plan_batches(train, 128, 2)
    cfg = fill_ds_config(load_ds_config(REPO / "ds_configs/zero2.json"), train, plan)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 16 and cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    same = fill_ds_config({"train_micro_batch_size_per_gpu": 4}, train, plan)
    assert same["train_micro_batch_size_per_gpu"] == 4
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu=8 conflicts"):
        fill_ds_config({"train_micro_batch_size_per_gpu": 8}, train, plan)
    with pytest.raises(UserError, match="optimizer.params.lr=0.1 conflicts"):
        fill_ds_config({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, train, plan)
    with pytest.raises(UserError, match=r"unknown keys \['zero_optimisation'\]"):
        fill_ds_config({"zero_optimisation": {}}, train, plan)
    with pytest.raises(UserError, match="unknown zero_optimization keys"):
        fill_ds_config({"zero_optimization": {"stage": 2, "overlap_com": True}}, train, plan)
    with pytest.raises(UserError, match="scheduler"):
        fill_ds_config({"scheduler": {"type": "WarmupLR"}}, train, plan)


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_ds_config_fills(path):
    train = TrainConfig(micro_batch_size=2, max_steps=1)
    cfg = fill_ds_config(load_ds_config(path), train, plan_batches(train, 64, 2))
    assert cfg["zero_optimization"]["stage"] == 2
    assert "auto" not in json.dumps(cfg)


CONFIGS = sorted((REPO / "launch/configs").glob("*.yaml"))
POSTTRAIN_CONFIGS = [p for p in CONFIGS if p.name.startswith(("sft-", "dpo-"))]
PRETRAIN_CONFIGS = [p for p in CONFIGS if p not in POSTTRAIN_CONFIGS]


@pytest.mark.parametrize("path", POSTTRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_posttraining_yaml_parses(path):
    from lillm.train.posttrain import parse_config as parse_post

    objective = path.name[:3]
    cfg, yaml = parse_post(objective, ["--config", str(path)])
    assert cfg.init_from and cfg.data.source and "lora:" in yaml
    assert (cfg.dpo is not None) == (objective == "dpo")
    assert plan_batches(cfg.train, 512, 2).max_steps == cfg.train.max_steps


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_parses(path):
    cfg, yaml = parse_config(["--config", str(path)])
    assert "train:" in yaml
    if cfg.model.vocab_size is None:  # the data's vocabulary (debug.yaml): the quickstart's 4096-token tokenizer
        cfg.model = dataclasses.replace(cfg.model, vocab_size=4096)
    assert cfg.model.num_params() > 0
    if path.name == "lil-39m-2xa100.yaml":
        assert cfg.model.num_params() == 39_596_544
        plan = plan_batches(cfg.train, cfg.model.max_seq_len, 2)
        assert plan.tokens_per_step == 524_288 and 15_000 <= plan.max_steps <= 15_300
        assert cfg.train.schedule == "cosine"
    # Every shipped pretraining recipe takes its learning rates from the one rule, at its own width, depth and
    # tokens per optimizer step (debug.yaml's on one rank, the learning benchmark's setting).
    from lillm.train.recipe import WARMUP_FRACTION, rule_lrs

    tokens = plan_batches(cfg.train, cfg.model.max_seq_len, 1).tokens_per_step
    expected = rule_lrs(cfg.model.d_model, cfg.model.n_layers, tokens, cfg.train.optimizer)
    assert {k: getattr(cfg.train, k) for k in expected} == expected, path.name
    assert cfg.train.warmup_steps is None and cfg.train.warmup_fraction == WARMUP_FRACTION, path.name


def test_cli_overrides_and_invalid_values():
    cfg, _ = parse_config(["--config", str(REPO / "launch/configs/debug.yaml"), "--train.lr", "5e-2"])
    assert cfg.train.lr == 5e-2
    with pytest.raises((UserError, SystemExit)):
        parse_config(["--config", str(REPO / "launch/configs/debug.yaml"), "--model.n_heads", "3"])


class _FailingEngine:
    device = torch.device("cpu")

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters=False):
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        (d / "partial.pt").write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")


class _Engine(_FailingEngine):
    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters=False):
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        torch.save(client_state, d / "mp_rank_00_model_states.pt")


IDENTITY = RunIdentity("pretrain", {}, "x", {})


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path):
    Checkpoint(tmp_path, IDENTITY, "a: 1\n", keep=2, rank=0, world_size=1, engine=_Engine()).save(5)
    ck = Checkpoint(tmp_path, IDENTITY, "a: 1\n", keep=2, rank=0, world_size=1, engine=_FailingEngine())
    with pytest.raises(UserError, match=r"No space left on device.*step_00000005\) is intact"):
        ck.save(10)
    assert (tmp_path / "checkpoints/latest").read_text() == "step_00000005"
    assert not (tmp_path / "checkpoints/step_00000010").exists()
    assert resolve_checkpoint("auto", tmp_path).name == "step_00000005"


class _RankedEngine(_FailingEngine):
    """Writes the files DeepSpeed's ZeRO-2 save writes: rank 0's model states and two ranks' optimizer
    partitions (as if this process were rank 0 and rank 1 had already written its own)."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters=False):
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        torch.save(client_state, d / "mp_rank_00_model_states.pt")
        for r in (0, 1):
            torch.save({"r": r}, d / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")


def test_save_reaches_the_disk_before_latest_moves(tmp_path, monkeypatch):
    # Every file this rank wrote, the tag's directory and its parent are fsynced before `latest` is replaced,
    # and `latest`'s directory after; the other rank's partition is left to that rank.
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    Checkpoint(tmp_path, IDENTITY, "a: 1\n", keep=2, rank=0, world_size=2, engine=_RankedEngine()).save(5)
    ck, tag = tmp_path / "checkpoints", tmp_path / "checkpoints/step_00000005"
    moved = events.index(("replace", str(ck / "latest")))
    synced_before = {p for kind, p in events[:moved] if kind == "fsync"}
    mine = {str(f) for f in tag.iterdir() if "pp_rank_1_" not in f.name and f.name != "lillm.json"}
    mine.add(str(tag / "lillm.json.tmp"))  # synced under its temporary name, then renamed
    assert mine <= synced_before, mine - synced_before
    assert str(tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt") not in synced_before
    assert {str(tag), str(ck)} <= synced_before
    assert ("fsync", str(ck)) in events[moved + 1:]
    # The tag's files are synced before its lillm.json names it complete.
    assert events.index(("replace", str(tag / "lillm.json"))) > max(
        i for i, e in enumerate(events) if e == ("fsync", str(tag / "mp_rank_00_model_states.pt")))


def test_a_failed_fsync_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    Checkpoint(tmp_path, IDENTITY, "a: 1\n", keep=2, rank=0, world_size=1, engine=_Engine()).save(5)
    real_fsync = os.fsync

    def failing(fd):
        if "step_00000010/mp_rank_00" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(UserError, match=r"Input/output error.*step_00000005\) is intact"):
        Checkpoint(tmp_path, IDENTITY, "a: 1\n", keep=2, rank=0, world_size=1, engine=_Engine()).save(10)
    assert (tmp_path / "checkpoints/latest").read_text() == "step_00000005"
    assert not (tmp_path / "checkpoints/step_00000010").exists()


def test_keep_last_k_and_resolution(tmp_path):
    ck = Checkpoint(tmp_path, IDENTITY, "a: 1\n", keep=2, rank=0, world_size=1, engine=_Engine())
    for step in (1, 2, 3):
        ck.save(step)
    tags = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step_00000002", "step_00000003"]
    assert resolve_checkpoint("auto", tmp_path).name == "step_00000003"
    assert resolve_checkpoint("step_00000002", tmp_path).name == "step_00000002"
    assert resolve_checkpoint(str(tmp_path)).name == "step_00000003"
    assert resolve_checkpoint("none", tmp_path) is None
    assert resolve_checkpoint("auto", tmp_path / "empty") is None
    with pytest.raises(UserError, match="not found"):
        resolve_checkpoint("step_00000099", tmp_path)


@pytest.mark.parametrize("objective", ["pretrain", "sft", "dpo"])
def test_every_training_option_has_help_text(objective):
    from lillm.train import posttrain, pretrain

    parser = pretrain.build_parser() if objective == "pretrain" else posttrain.build_parser(objective)
    missing = [a.dest for a in parser._actions if a.option_strings and a.dest not in ("help", "print_config")
               and "." in a.dest and not (a.help or "").strip()]
    assert not missing, missing
    assert "Peak learning rate" in parser.format_help()


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("option", ["--train.lr", "--train.min_lr", "--train.grad_clip", "--train.weight_decay",
                                    "--train.eps", "--train.betas", "--model.norm_eps", "--model.init_std"])
def test_non_finite_training_options_are_refused(option, value):
    arg = f"[0.9, {value}]" if option == "--train.betas" else value
    with pytest.raises(UserError, match=f"{option.split('.')[-1]} must be a finite number"):
        parse_config(["--config", str(REPO / "launch/configs/debug.yaml"), f"{option}={arg}"])


def test_non_finite_sampling_lora_and_dpo_options_are_refused():
    from dataclasses import replace

    from lillm.generate import SamplingConfig
    from lillm.lora import LoRAConfig
    from lillm.train.posttrain import DPOConfig

    for bad in (float("nan"), float("inf")):
        with pytest.raises(UserError, match="temperature must be a finite number"):
            replace(SamplingConfig(), temperature=bad)
        with pytest.raises(UserError, match="top_p"):
            SamplingConfig(top_p=bad)
        with pytest.raises(ValueError, match="alpha must be a finite number"):
            LoRAConfig(alpha=bad)
        with pytest.raises(ValueError, match="beta must be a positive finite number"):
            DPOConfig(beta=bad)


def test_negative_loader_workers_are_refused():
    with pytest.raises(UserError, match="num_workers must be >= 0"):
        parse_config(["--config", str(REPO / "launch/configs/debug.yaml"), "--data.num_workers=-4"])


def test_2xa100_launcher_environment(tmp_path):
    """launch/pretrain_2xa100.sh with a stub `deepspeed` that reports what it was given."""
    import os
    import subprocess

    stub = tmp_path / "bin/deepspeed"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\necho "ARGS $*"; env | grep -E "^(TORCH_)?NCCL" | sort\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if "NCCL" not in k}
    env["PATH"] = f"{stub.parent}:{env['PATH']}"
    env["MASTER_PORT"] = "29777"  # unset: a free port is picked
    out = subprocess.run(["bash", "launch/pretrain_2xa100.sh", "--train.lr", "3e-4"], cwd=REPO, capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert ("ARGS --master_port 29777 --num_gpus 2 launch/pretrain.py --ds_config ds_configs/zero2.json --config "
            "launch/configs/lil-39m-2xa100.yaml --train.lr 3e-4") in lines
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in lines and not any(x.startswith("NCCL_P2P_LEVEL") for x in lines)


def test_muon_fills_the_ds_config_and_refuses_what_would_mislead():
    train = TrainConfig(micro_batch_size=4, max_steps=10, lr=6e-3, optimizer="muon", muon_lr=0.03, grad_clip=0.0)
    plan = plan_batches(train, 128, 2)
    cfg = fill_ds_config(load_ds_config(REPO / "ds_configs/zero2_cpu.json"), train, plan)
    assert cfg["optimizer"]["type"] == "Muon" and cfg["gradient_clipping"] == 0.0
    assert cfg["optimizer"]["params"] == {"lr": 6e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                          "muon_lr": 0.03, "momentum": 0.95, "torch_adam": True}
    offload = fill_ds_config(load_ds_config(REPO / "ds_configs/zero2_offload.json"), train, plan)
    assert "torch_adam" not in offload["optimizer"]["params"]  # ZeRO offload needs DeepSpeed's CPU Adam
    with pytest.raises(UserError, match="optimizer type 'AdamW' conflicts with train.optimizer=muon"):
        fill_ds_config({"optimizer": {"type": "AdamW"}}, train, plan)
    adamw = TrainConfig(micro_batch_size=4, max_steps=10)
    with pytest.raises(UserError, match="optimizer type 'Muon' conflicts with train.optimizer=adamw"):
        fill_ds_config({"optimizer": {"type": "Muon"}}, adamw, plan_batches(adamw, 128, 2))
    assert fill_ds_config({}, adamw, plan_batches(adamw, 128, 2))["optimizer"]["type"] == "AdamW"
    with pytest.raises(ValueError, match="grad_clip=1.0 with optimizer muon: set train.grad_clip 0"):
        TrainConfig(max_steps=1, optimizer="muon")
    with pytest.raises(ValueError, match="muon_momentum"):
        TrainConfig(max_steps=1, optimizer="muon", grad_clip=0.0, muon_momentum=1.0)


def test_muon_groups_and_their_learning_rate_follow_the_schedule():
    from lillm.train.engine import is_muon_matrix, param_groups
    from lillm.train.schedule import apply_lr, lr_at

    model = LilLM(ModelConfig.from_preset("debug", vocab_size=512))
    muon, decay, no_decay = param_groups(model, 0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 2)[-2] for p in muon["params"]} == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
    assert [names[id(p)] for p in decay["params"]] == ["tok_embeddings.weight"]  # tied: the output head too
    assert all(p.dim() == 1 for p in no_decay["params"]) and (muon["weight_decay"], decay["weight_decay"]) == (0.0, 0.1)
    assert len(param_groups(model, 0.1)) == 2  # adamw: no Muon group
    assert not is_muon_matrix("output.weight", model.output.weight)

    class Optimizer:
        param_groups = [{"use_muon": True, "lr": 0.0}, {"use_muon": False, "lr": 0.0}, {"lr": 0.0}]

    train = TrainConfig(max_steps=100, lr=6e-3, min_lr=6e-4, muon_lr=0.02, warmup_steps=10, optimizer="muon",
                        grad_clip=0.0)
    for step in (0, 5, 50, 99):
        lr = apply_lr(Optimizer, step, train, 100)
        assert lr == lr_at(step, lr=6e-3, min_lr=6e-4, warmup_steps=10, max_steps=100, schedule="cosine")
        assert Optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.02 / 6e-3, rel=1e-12)
        assert Optimizer.param_groups[1]["lr"] == Optimizer.param_groups[2]["lr"] == lr


def test_a_checkpoint_of_another_optimizer_is_refused():
    saved = {**IDENTITY.to_dict(), "train_config": {"optimizer": "adamw"}, "world_size": 1}
    muon = dataclasses.replace(IDENTITY, train_config={"optimizer": "muon"})
    assert "trained with optimizer adamw, this run uses muon" in muon.refusal(saved, 1)
    assert dataclasses.replace(IDENTITY, train_config={"optimizer": "adamw"}).refusal(saved, 1) is None


def test_the_model_takes_the_data_vocabulary_unless_set(pretrain_shards):
    """debug.yaml leaves model.vocab_size unset: the model gets the data's tokenizer vocabulary (so any
    tokenizer trains without a flag); a set value that cannot hold the tokenizer's ids is refused with the fix."""
    from lillm.errors import UserError
    from lillm.tokenizer import load_tokenizer
    from lillm.train import pretrain

    vocab = load_tokenizer(pretrain_shards / "tokenizer").vocab_size
    common = ["--config", "debug", "--data.dir", str(pretrain_shards)]
    cfg, yaml = parse_config(common)
    assert cfg.model.vocab_size is None and "vocab_size: null" in yaml
    assert pretrain.task(cfg).model.config.vocab_size == vocab
    cfg, _ = parse_config([*common, "--model.vocab_size", str(vocab + 64)])  # a padded table is the user's call
    assert pretrain.task(cfg).model.config.vocab_size == vocab + 64
    cfg, _ = parse_config([*common, "--model.vocab_size", str(vocab // 2)])
    with pytest.raises(UserError, match=f"drop --model.vocab_size .* or set it to {vocab}"):
        pretrain.task(cfg)


def test_the_eta_follows_the_recent_pace_not_the_warm_up():
    """A 100 s first interval (compile, first step) then 1 s per step: from the second log line on, the ETA is
    the recent pace times the steps left; the pace is the last few intervals', evaluations included."""
    from lillm.train.loop import Pace

    pace = Pace(0.0, 0)
    assert pace.eta(100.0 + 9, 10, 100) == pytest.approx(109 / 10 * 90)  # only the warm-up interval so far
    assert pace.eta(119.0, 20, 100) == pytest.approx(80.0)
    assert pace.eta(129.0, 30, 100) == pytest.approx(70.0)
    assert pace.eta(159.0, 40, 100) == pytest.approx((159 - 109) / 30 * 60)  # a slow interval (an eval) counts
    resumed = Pace(500.0, 1000)  # a resumed run's pace starts at its own first step
    assert resumed.eta(510.0, 1010, 2000) == pytest.approx(990.0)


def test_a_line_logged_under_the_progress_bar_starts_a_line_of_its_own():
    """What the trainer logs while its bar is drawn (an eval, a save) clears the bar first instead of being
    glued to its end (a terminal shows stdout and stderr on one screen: here both share one stream)."""
    import io
    import logging

    from tqdm import tqdm

    from lillm.train.metrics import BarAwareHandler

    screen = io.StringIO()
    log = logging.getLogger("lillm.test_bar")
    log.addHandler(BarAwareHandler(screen))
    log.propagate = False
    with tqdm(total=10, file=screen, mininterval=0, ascii=True) as bar:
        bar.update(3)
        log.warning("eval @ step 3: val/loss 1.0")
    before = screen.getvalue().split("eval @ step 3")[0]
    assert before.endswith("\r") and "3/10" in before, repr(before)


def test_a_staged_output_that_fails_leaves_nothing_and_names_the_output(tmp_path):
    from lillm.files import staged_dir

    (tmp_path / "kept").mkdir()
    (tmp_path / "kept/old.txt").write_text("old")
    for out in (tmp_path / "new", tmp_path / "kept"):
        with pytest.raises(UserError, match=rf"{out}: No space left on device \(nothing written\)"):
            with staged_dir(out) as d:
                (d / "old.txt").write_text("half")
                raise OSError(28, "No space left on device")  # what a full disk raises mid-write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert (tmp_path / "kept/old.txt").read_text() == "old"
    with staged_dir(tmp_path / "kept") as d:
        (d / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["new.txt", "old.txt"]


def test_metrics_jsonl_never_ends_in_a_cut_line(tmp_path, monkeypatch):
    import builtins

    import lillm.train.metrics as metrics_module
    from lillm.train.metrics import MetricsWriter

    jsonl = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(None, jsonl)
    writer.scalars({"train/loss": 1.5}, 1)

    class HalfWritten:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            self.fh.write(text[: len(text) // 2])
            self.fh.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics_module, "open", lambda *a, **k: HalfWritten(builtins.open(*a, **k)), raising=False)
    with pytest.raises(UserError, match=rf"{jsonl}: No space left on device"):
        writer.scalars({"train/loss": 1.25}, 2)
    assert jsonl.read_text() == json.dumps({"step": 1, "train/loss": 1.5}) + "\n"


def test_the_tensorboard_address_pins_the_first_cards():
    """TensorBoard lists groups alphabetically (perf/ first); the address lillm prints pins the cards a user
    looks at first, in the form TensorBoard's `pinnedCards` query parameter reads (a JSON list of
    {plugin, tag})."""
    from urllib.parse import parse_qs, urlsplit

    from lillm.runs import tensorboard_hint

    hint = tensorboard_hint("runs/x", ["train/loss", "val/loss", "val/pydoc/bpb"])
    assert hint.startswith("TensorBoard: tensorboard --logdir runs/x/tensorboard, then open http://localhost:6006/?")
    url = urlsplit(hint.split("then open ", 1)[1].split()[0])
    assert url.fragment == "timeseries"
    assert parse_qs(url.query)["smoothing"] == ["0"]
    cards = json.loads(parse_qs(url.query)["pinnedCards"][0])
    assert cards == [{"plugin": "scalars", "tag": t} for t in ("train/loss", "val/loss", "val/pydoc/bpb")]


def test_max_steps_alone_keeps_the_schedule_shape():
    """The shipped warmup is a fraction of max_steps: a run made shorter or longer warms up over the same share
    of it and decays to min_lr at its own last step. A step count, when given, wins (0: no warmup)."""
    from lillm.train.schedule import apply_lr

    class Opt:
        param_groups = [{"lr": 0.0}]

    def curve(*argv):
        train = parse_config(["--config", "debug", *argv])[0].train
        steps = train.max_steps
        return train, [apply_lr(Opt(), step, train, steps) for step in range(steps)]

    shipped, full = curve()
    short, part = curve("--train.max_steps", "84")
    assert shipped.warmup_steps is None and shipped.warmup_for(300) == 75 and short.warmup_for(84) == 21
    assert full.index(max(full)) == 74 and part.index(max(part)) == 20  # the peak at a quarter of each run
    assert full[-1] == pytest.approx(shipped.min_lr) and part[-1] == pytest.approx(shipped.min_lr)
    for frac in (0.1, 0.25, 0.5, 0.75):  # the same shape: lr at the same fraction of the run agrees
        assert part[round(frac * 84) - 1] == pytest.approx(full[round(frac * 300) - 1], rel=0.05)
    counted, _ = curve("--train.max_steps", "84", "--train.warmup_steps", "10")
    assert counted.warmup_for(84) == 10
    none, lrs = curve("--train.max_steps", "84", "--train.warmup_steps", "0")
    assert none.warmup_for(84) == 0 and lrs[0] == pytest.approx(none.lr)
    with pytest.raises(ValueError, match="warmup_fraction must be in"):
        TrainConfig(max_steps=10, warmup_fraction=1.0)


def test_a_muon_weight_decay_that_would_zero_the_weights_is_refused():
    """Muon's decoupled decay multiplies the matrices by 1 - muon_lr x decay each step: at 1 or more it zeroes or
    flips them, so the config refuses it naming both options; the start-up line shows a decay in use."""
    from lillm.train.engine import optimizer_summary

    base = dict(optimizer="muon", grad_clip=0.0, muon_lr=0.04, max_steps=10)
    assert TrainConfig(muon_weight_decay=24.0, **base).muon_weight_decay == 24.0
    with pytest.raises(ValueError, match=r"muon_weight_decay=25.0 with muon_lr=0.04 shrinks the Muon matrices by "
                                         r"1 of themselves per step"):
        TrainConfig(muon_weight_decay=25.0, **base)
    assert TrainConfig(muon_weight_decay=25.0, **{**base, "optimizer": "adamw", "grad_clip": 1.0})  # no Muon here
    model = LilLM(ModelConfig.from_preset("debug", vocab_size=512))
    model.layers[0].attention.wq.weight.use_muon = True  # as DeepSpeed tags the Muon matrices
    line = optimizer_summary(model, TrainConfig(muon_weight_decay=0.4, **base))
    assert line.startswith("Muon for 1 matrices") and "lr 0.04, decay 0.4) + AdamW" in line
    assert "decay" not in optimizer_summary(model, TrainConfig(**base))
