"""The training loop in-process on one rank (a real DeepSpeed engine, no launcher): accumulation, the stop
flag, NaN skipping, evaluation and checkpoint cadence, resume, and every train.* option of every entry point.
End-to-end proof through the `deepspeed` launcher lives in test_pretrain.py and test_posttrain.py."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys

import pytest
import torch

from lillm.train import posttrain, pretrain
from lillm.train.config import TrainConfig
from lillm.train.loop import Trainer

from .conftest import QA, REPO, metrics, run_from_checkpoint

ADAMW = ["--train.optimizer", "adamw", "--train.lr", "3e-3", "--train.min_lr", "3e-4", "--train.weight_decay", "0.1",
         "--train.grad_clip", "1.0"]
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
BASE = ["--ds_config", str(REPO / "ds_configs/zero2_cpu.json"), "--train.warmup_steps", "2",
        "--train.log_interval", "1", "--train.eval_interval", "0", "--train.sample_tokens", "0",
        "--train.ckpt_interval", "1000", "--train.tensorboard", "false"]
PRETRAIN = ["--config", str(REPO / "launch/configs/debug.yaml"), "--model.vocab_size", "1024", "--train.seq_len", "32",
            "--train.micro_batch_size", "2", "--train.grad_accum", "1", "--data.num_workers", "0", *BASE]


def pretrainer(data, run_dir, *extra: str, record: bool = False) -> Trainer:
    cfg, yaml = pretrain.parse_config([*PRETRAIN, "--data.dir", str(data), "--train.run_dir", str(run_dir), *extra])
    if record:
        cfg.train = recording(cfg.train)
    return pretrain.build(cfg, yaml)


def posttrainer(task, base, data, run_dir, *extra: str, record: bool = False) -> Trainer:
    args = ["--config", str(REPO / f"launch/configs/{task}-debug.yaml"), "--init_from", str(base), "--data.source",
            str(data), "--data.val_fraction", "0.2", "--train.run_dir", str(run_dir), "--train.seq_len", "64",
            "--train.micro_batch_size", "2", "--train.grad_accum", "1", "--lora.rank", "4" if task == "dpo" else "0",
            *BASE, *extra]
    cfg, yaml = posttrain.parse_config(task, args)
    if record:
        cfg.train = recording(cfg.train)
    return posttrain.build(cfg, yaml, task)


def poison(trainer: Trainer, steps: set[int]) -> None:
    """Make the loss non-finite during the given (0-based) optimizer steps."""
    loss = trainer.objective.loss

    def poisoned(engine, batch):
        out = loss(engine, batch)
        return out * float("nan") if trainer.progress.step in steps else out

    trainer.objective.loss = poisoned


class RecordingTrainConfig(TrainConfig):
    """A TrainConfig that remembers which fields the run reads (dataclasses.asdict, which copies them all
    into hparams and checkpoint metadata, does not count)."""

    def __getattribute__(self, name):
        if name in FIELDS and sys._getframe(1).f_code.co_filename != dataclasses.__file__:
            self.__dict__.setdefault("_read", set()).add(name)
        return object.__getattribute__(self, name)


def recording(train: TrainConfig) -> RecordingTrainConfig:
    rec = RecordingTrainConfig(**dataclasses.asdict(train))
    rec.__dict__["_read"] = set()  # forget the reads of its own validation
    return rec


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat")
    sft, dpo = out / "sft.jsonl", out / "dpo.jsonl"
    sft.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in QA * 2))
    dpo.write_text("".join(json.dumps({"prompt": q, "chosen": a, "rejected": f"No. {k}"}) + "\n"
                           for k, (q, a) in enumerate(QA * 2)))
    return {"sft": sft, "dpo": dpo}


def test_accumulation_equals_a_bigger_micro_batch(process_group, pretrain_shards, tmp_path):
    """In fp32 with AdamW: Muon orthogonalises its update in bf16, where a 1e-7 difference in summation order
    can round the other way and grow (seen on CPUs with AMX), which is Muon's behaviour, not accumulation's."""
    big = pretrainer(pretrain_shards, tmp_path / "big", "--train.micro_batch_size", "4", "--train.max_steps", "4",
                     *ADAMW)
    assert big.fit() == 0
    accum = pretrainer(pretrain_shards, tmp_path / "accum", "--train.grad_accum", "2", "--train.max_steps", "4",
                       *ADAMW)
    assert accum.fit() == 0
    a, b = metrics(tmp_path / "big"), metrics(tmp_path / "accum")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(b[s] == pytest.approx(a[s], abs=1e-5) for s in a), (a, b)
    assert accum.progress.tokens_seen == big.progress.tokens_seen == 4 * 4 * 32


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_run_records_the_shipped_ds_config_filled_in(process_group, pretrain_shards, tmp_path, optimizer):
    """ds_config.json in the run directory is the shipped JSON with every "auto" filled from the training
    config, the optimizer section included (lillm builds AdamW from it; DeepSpeed builds Muon from it)."""
    from lillm.train.config import plan_batches
    from lillm.train.ds_config import fill_ds_config, load_ds_config

    extra = ["--train.optimizer", optimizer, "--train.max_steps", "1"] + (["--train.grad_clip", "0"]
                                                                        if optimizer == "muon" else [])
    trainer = pretrainer(pretrain_shards, tmp_path / optimizer, *extra)
    assert trainer.fit() == 0
    shipped = load_ds_config(REPO / "ds_configs/zero2_cpu.json")
    assert shipped["optimizer"]["type"] == "auto"
    expected = fill_ds_config(shipped, trainer.train, plan_batches(trainer.train, 32, 1))
    recorded = json.loads((tmp_path / optimizer / "ds_config.json").read_text())
    assert recorded == expected
    assert recorded["optimizer"]["type"] == {"adamw": "AdamW", "muon": "Muon"}[optimizer]
    assert recorded["optimizer"]["params"]["lr"] == trainer.train.lr


def test_eval_log_and_checkpoint_cadence_and_in_process_resume(process_group, pretrain_shards, tmp_path):
    cadence = ["--train.max_steps", "7", "--train.log_interval", "3", "--train.eval_interval", "2",
               "--train.eval_batches", "2", "--train.ckpt_interval", "3", "--train.keep_checkpoints", "2"]
    first = pretrainer(pretrain_shards, tmp_path / "a", *cadence)
    assert first.fit() == 0
    assert sorted(metrics(tmp_path / "a")) == [3, 6, 7]  # every log_interval, and the last step
    assert sorted(metrics(tmp_path / "a", "val/loss")) == [2, 4, 6, 7]
    tags = sorted(p.name for p in (tmp_path / "a/checkpoints").iterdir() if p.is_dir())
    assert tags == ["step_00000006", "step_00000007"]  # 3 was pruned (keep 2)

    # Resume at step 6 in a fresh Trainer: the checkpoint restores the step, tokens, data position and RNG.
    resumed = pretrainer(pretrain_shards, run_from_checkpoint(tmp_path / "a", tmp_path / "b", "step_00000006"),
                         *cadence)
    assert resumed.progress.step == 6 and resumed.progress.tokens_seen == 6 * 2 * 32
    assert resumed.objective.loader.global_position == 6 * 2
    assert resumed.fit() == 0
    assert metrics(tmp_path / "b") == {7: metrics(tmp_path / "a")[7]}  # bit-identical
    assert metrics(tmp_path / "b", "val/loss") == {7: metrics(tmp_path / "a", "val/loss")[7]}


def test_stop_flag_saves_at_the_end_of_the_step_and_returns_0(process_group, pretrain_shards, tmp_path):
    trainer = pretrainer(pretrain_shards, tmp_path / "stop", "--train.max_steps", "50")
    loss = trainer.objective.loss

    def interrupted(engine, batch):
        if trainer.progress.step == 2:
            signal.raise_signal(signal.SIGTERM)  # a scheduler's preemption, mid-step
        return loss(engine, batch)

    trainer.objective.loss = interrupted
    assert trainer.fit() == 0
    assert (tmp_path / "stop/checkpoints/latest").read_text() == "step_00000003"
    assert max(metrics(tmp_path / "stop")) == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is gone


def test_nonfinite_losses_are_skipped_up_to_max_bad_steps(process_group, pretrain_shards, tmp_path):
    skip = pretrainer(pretrain_shards, tmp_path / "skip", "--train.max_steps", "4", "--train.max_bad_steps", "1")
    poison(skip, {1})
    before = [p.detach().clone() for p in skip.engine.module.parameters()]
    assert skip.fit() == 0
    losses = metrics(tmp_path / "skip")
    assert sorted(losses) == [1, 2, 3, 4] and losses[2] == 0.0  # the skipped step logs its zero loss
    assert all(torch.isfinite(p).all() for p in skip.engine.module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, skip.engine.module.parameters()))

    stop = pretrainer(pretrain_shards, tmp_path / "stop", "--train.max_steps", "4", "--train.max_bad_steps", "1")
    poison(stop, {1, 2})
    assert stop.fit() == 2
    assert list((tmp_path / "stop").glob("nonfinite_step2_rank0.pt"))
    assert not (tmp_path / "stop/checkpoints/latest").exists()


def test_a_diverging_run_stops_with_exit_2_and_a_diagnosis(process_group, pretrain_shards, tmp_path):
    run_dir = tmp_path / "diverge"
    # AdamW: an lr of 1e38 makes its step non-finite (torch's unfused Adam under Muon refuses such a scalar).
    trainer = pretrainer(pretrain_shards, run_dir, "--train.max_steps", "6", "--train.lr", "1e38",
                         "--train.min_lr", "0", "--train.warmup_steps", "0", "--train.grad_clip", "0",
                         "--train.optimizer", "adamw")
    assert trainer.fit() == 2
    diag = next(run_dir.glob("nonfinite_step*_rank0.pt"))
    saved = torch.load(diag, weights_only=False)
    assert saved["batch"].shape == (2, 33) and saved["lr"] > 1e37 and saved["step"] == 1
    assert not (run_dir / "checkpoints/latest").exists()


@pytest.mark.parametrize("task", ["pretrain", "sft", "dpo"])
def test_every_train_option_of_every_entry_point_is_used(process_group, task, pretrain_shards, chat_base, chat_data,
                                                         tmp_path):
    """Each entry point offers the whole train section, and a run reads every field of it: an option that is
    offered but ignored (as post-training once ignored max_bad_steps and eval_batches) fails here."""
    parser = pretrain.build_parser() if task == "pretrain" else posttrain.build_parser(task)
    offered = set(parser.get_defaults().as_dict()["train"])
    assert offered == FIELDS
    # max_tokens instead of max_steps, global_batch_tokens instead of grad_accum, a NaN step to skip (two
    # micro-batches), and
    # evaluation, sampling and checkpoints within the run: every branch that reads an option is taken.
    seq = 32 if task == "pretrain" else 64
    extra = ["--train.max_steps", "0", "--train.max_tokens", str(3 * 2 * 2 * seq), "--train.grad_accum", "0",
             "--train.global_batch_tokens", str(2 * 2 * seq), "--train.max_bad_steps", "2",
             "--train.eval_interval", "2", "--train.sample_tokens", "2", "--train.ckpt_interval", "2",
             "--train.activation_checkpointing", "true", "--train.tensorboard", "true",
             "--train.optimizer", "muon", "--train.grad_clip", "0",  # muon reads the AdamW options too
             "--train.warmup_steps", "null", "--train.warmup_fraction", "0.3"]  # the warmup from the fraction
    if task == "pretrain":
        trainer = pretrainer(pretrain_shards, tmp_path / task, *extra, record=True)
    else:
        trainer = posttrainer(task, chat_base, chat_data[task], tmp_path / task, *extra, record=True)
    poison(trainer, {0})
    assert trainer.fit() == 0
    assert trainer.plan.grad_accum == 2 and trainer.progress.step == 3
    assert metrics(tmp_path / task, "val/loss")  # it evaluated
    assert FIELDS - trainer.train._read == set()


def test_posttraining_resume_refuses_another_row_length(process_group, chat_base, chat_data, tmp_path):
    from lillm.errors import UserError

    first = posttrainer("sft", chat_base, chat_data["sft"], tmp_path / "sft", "--train.max_steps", "2")
    assert first.fit() == 0
    with pytest.raises(UserError, match="seq_len was 64 when saved, now 48"):
        posttrainer("sft", chat_base, chat_data["sft"], tmp_path / "sft", "--train.max_steps", "4",
                    "--train.seq_len", "48")


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(process_group, pretrain_shards, tmp_path):
    from lillm.errors import UserError
    from lillm.runs import checkpoint_problem

    from .conftest import run_cli

    run = tmp_path / "run"
    args = ("--train.max_steps", "4", "--train.ckpt_interval", "2")
    assert pretrainer(pretrain_shards, run, *args).fit() == 0
    meta = json.loads((run / "checkpoints/step_00000004/lillm.json").read_text())
    assert any(name.endswith("optim_states.pt") for name in meta["files"])  # the integrity record
    shard = next((run / "checkpoints/step_00000004").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, as by a full disk or a copy cut short

    resumed = pretrainer(pretrain_shards, run, *args)  # resume auto: the newest intact tag, with a warning
    assert resumed.progress.step == 2
    assert resumed.fit() == 0  # step 4 is saved again, from scratch: intact, no stale file in it
    assert checkpoint_problem(run / "checkpoints/step_00000004") is None
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"damaged .*optim_states.pt: \d+ bytes, \d+ when saved"):
        pretrainer(pretrain_shards, run, *args, "--train.resume", str(run / "checkpoints/step_00000004"))
    r = run_cli("checkpoint", str(run))  # readers cannot fall back: one line, exit 2
    assert r.returncode == 2 and "is damaged" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (run / "checkpoints/step_00000002/lillm.json").write_text("{not json")
    with pytest.raises(UserError, match="no older one is intact"):
        pretrainer(pretrain_shards, run, *args)


SYNCS = ("aten::_local_scalar_dense", "aten::item")
COLLECTIVE_WORDS = ("allreduce", "all_reduce", "reduce_scatter", "allgather", "all_gather", "broadcast", "barrier")


def counts_of(prof) -> tuple[int, int]:
    """(host reads of device scalars, collectives) among a torch.profiler run's CPU events."""
    names = [e.name for e in prof.events()]
    syncs = sum(n in SYNCS for n in names)
    # A collective shows up as a few nested events (the op, the backend's record): count the dispatcher op.
    collectives = sum(n.startswith("c10d::") and any(w in n for w in COLLECTIVE_WORDS) for n in names)
    return syncs, collectives


@pytest.mark.parametrize("task,max_bad_steps", [("pretrain", "0"), ("sft", "2"), ("dpo", "0")])
def test_steps_between_agreements_wait_for_nothing_deepspeed_does_not(process_group, pretrain_shards, chat_base,
                                                                       chat_data, tmp_path, task,
                                                                       max_bad_steps):
    """A whole loop iteration outside log, eval, checkpoint and agreement steps adds no host read of a device
    value (`.item()`, `float(t)`, `bool(t)`) and no collective to what DeepSpeed's own forward/backward/step
    does, measured by a bare loop over the same engine and objective. This is what lets a GPU run ahead of
    the host. (max_bad_steps > 0 adds the gradient gates: they must not wait either.)"""
    from torch.profiler import ProfilerActivity, profile

    from lillm.train import loop

    extra = ["--train.max_steps", "5", "--train.grad_accum", "2", "--train.log_interval", "1000",
             "--train.max_bad_steps", max_bad_steps]
    if task == "pretrain":
        trainer = pretrainer(pretrain_shards, tmp_path / task, *extra)
    else:
        trainer = posttrainer(task, chat_base, chat_data[task], tmp_path / task, *extra)
    iterations, current = [], []

    class Profiled(loop.Hooks):
        def before_step(self, trainer):  # one profile per iteration
            if current:
                current[0].stop()
                iterations.append(counts_of(current.pop()))
            current.append(profile(activities=[ProfilerActivity.CPU]))
            current[0].start()

    trainer.hooks = Profiled()
    trainer.cadence.agree_seconds = 1e9  # agree every agree_every steps however slow this machine is
    assert trainer.fit() == 0
    current[0].stop()
    assert len(iterations) == 4  # steps 1-4 (step 1 agrees, to measure the step time); step 5, the last, saves
    engine, objective = trainer.engine, trainer.objective
    batches = iter(objective.loader)

    def measure(fn, out: list):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = fn()
        out.append(counts_of(prof)[0])
        return result

    def bare_step(objective_reads: list[int] | None = None):  # any DeepSpeed loop's optimizer step
        micro = [next(batches) for _ in range(trainer.plan.grad_accum)]
        # With objective_reads, the task's own calls are profiled alone (profilers do not nest).
        call = (lambda fn: measure(fn, objective_reads)) if objective_reads is not None else (lambda fn: fn())
        call(lambda: objective.begin_step(micro))
        for batch in micro:
            engine.backward(call(lambda b=batch: objective.loss(engine, b.to(trainer.device))))
            engine.step()

    bare = []
    for _ in range(3):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            bare_step()
        bare.append(counts_of(prof))
    objective_reads = []
    bare_step(objective_reads)
    print(f"{task}: per iteration (host reads, collectives) loop {iterations}, bare DeepSpeed {bare}")
    assert objective_reads and set(objective_reads) == {0}  # the task's loss and step set-up never wait either
    assert len(set(bare[1:])) == 1, bare  # the first step after a pause may differ
    assert set(iterations[1:]) == set(bare[1:]), (iterations, bare)


def test_agreements_follow_the_step_time(process_group, pretrain_shards, tmp_path):
    """Between log, eval and checkpoint steps the ranks agree after the first step, then every AGREE_EVERY
    steps, or every step when a step takes longer than AGREE_SECONDS (so a signal is answered in time)."""
    from lillm.train import loop

    seen = {}

    class Counted(loop.Hooks):
        def __init__(self, steps):
            self.steps = steps

        def after_agreement(self, trainer):
            self.steps.append(trainer.progress.step)

    for seconds in (1e9, 0.0):
        trainer = pretrainer(pretrain_shards, tmp_path / str(seconds), "--train.max_steps", "12",
                             "--train.log_interval", "1000", "--train.ckpt_interval", "1000")
        trainer.cadence.agree_seconds = seconds
        trainer.hooks = Counted(seen.setdefault(seconds, []))
        assert trainer.fit() == 0
    assert seen[1e9] == [1, 1 + loop.AGREE_EVERY, 12]
    assert seen[0.0] == list(range(1, 13))


def test_evaluation_tasks_leave_training_bit_identical_and_score_as_lillm_eval(process_group, pretrain_shards,
                                                                               tmp_path):
    """train.eval_tasks on: the same training and validation losses at every step, and at the last step the
    scores `lillm eval` gives the saved checkpoint."""
    from lillm import cli

    hs = {"activity_label": "Python", "ctx_a": "The function returns", "ctx_b": "a list of",
          "endings": ["names in the module.", "banana bread.", "the loop", "seven dogs"], "label": "0"}
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps({**hs, "label": str(i % 4)}) + "\n" for i in range(5)))
    tasks = ["pydoc-continuation", "bpb:pydoc", f"hellaswag:{tmp_path / 'hs.jsonl'}"]
    common = ("--train.max_steps", "4", "--train.eval_interval", "2", "--train.eval_batches", "1")
    assert pretrainer(pretrain_shards, tmp_path / "plain", *common).fit() == 0
    assert pretrainer(pretrain_shards, tmp_path / "tasks", *common, "--train.eval_tasks", json.dumps(tasks),
                      "--train.eval_task_limit", "6").fit() == 0
    for key in ("train/loss", "val/loss"):
        assert metrics(tmp_path / "plain", key) == metrics(tmp_path / "tasks", key)
    acc = metrics(tmp_path / "tasks", "eval/pydoc-continuation/acc")
    assert sorted(acc) == [2, 4]
    with pytest.raises(SystemExit):
        cli.main(["eval", str(tmp_path / "tasks"), "--tasks", ",".join(tasks), "--limit", "6", "--out",
                  str(tmp_path / "eval.json")])
    after = json.loads((tmp_path / "eval.json").read_text())["results"]
    for spec, name in zip(tasks, ["pydoc-continuation", "bpb:pydoc", "hellaswag:hs"]):
        for metric, value in after[spec].items():
            if metric in ("bpb", "acc", "acc_norm"):
                assert metrics(tmp_path / "tasks", f"eval/{name}/{metric}")[4] == pytest.approx(value, abs=1e-6)
