"""End to end through the real `deepspeed` launcher on 2 CPU ranks. Launches are shared between assertions."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lillm.runs import tensorboard_dir

from .conftest import DEEPSPEED, ENV, LAUNCH_PORT, REPO, SHM, metrics, run_cli, run_from_checkpoint
from .conftest import launch as launch_script

pytestmark = pytest.mark.slow


EVAL_TASKS = ["pydoc-continuation", "bpb:pydoc"]


def _args(data: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["launch/pretrain.py", "--config", "launch/configs/debug.yaml", "--ds_config", "ds_configs/zero2_cpu.json",
            "--data.dir", str(data), "--train.run_dir", str(run_dir), "--model.vocab_size", "1024",
            "--train.max_steps", str(steps), "--train.log_interval", "1", "--train.eval_interval", "6",
            "--train.eval_batches", "2", "--train.sample_tokens", "8", "--train.ckpt_interval", "6",
            "--train.warmup_steps", "4", "--train.micro_batch_size", "4", "--train.seq_len", "64",
            # AdamW here (DeepSpeed's universal format on a world-size change); Muon: tests/test_muon.py
            "--train.optimizer", "adamw", "--train.grad_clip", "1.0", "--train.lr", "3e-3", "--train.min_lr", "3e-4",
            "--train.eval_tasks", json.dumps(EVAL_TASKS), "--train.eval_task_limit", "6", *extra]


def launch(data, run_dir, steps, *extra, ranks=2, timeout=600) -> subprocess.CompletedProcess:
    script, *args = _args(data, run_dir, steps, *extra)
    return launch_script(script, args, ranks, timeout)


def losses(run_dir: Path) -> dict[int, float]:
    return metrics(run_dir)


@pytest.fixture(scope="module")
def data(pretrain_shards):
    return pretrain_shards


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """12 steps on 2 ranks, checkpoints at 6 and 12, the shards' sha256 checked first (shared by the ranks).
    Stale shared-memory buffers of the launch's port, as an earlier killed job leaves them, are planted first:
    garbage collective flags the ranks must not map."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    stale = stale_shm_buffers(LAUNCH_PORT, 2)
    r = launch(data, run_dir, 12, "--data.verify", "true")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir, r, stale


def stale_shm_buffers(port: int, ranks: int) -> list[Path]:
    """DeepSpeed's CPU all-reduce buffer names of 127.0.0.1:`port`, written full of 0xff."""
    if not SHM.is_dir():
        return []
    paths = [SHM / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}" for rank in range(ranks)]
    for path in paths:
        path.write_bytes(b"\xff" * 4096)
    return paths


def test_end_to_end_run(full_run):
    run_dir, r, stale = full_run
    # The ranks removed the stale buffers before joining, and their own once both had mapped them: none is left
    # in memory after the job.
    assert not [p for p in stale if p.exists()]
    assert sorted(losses(run_dir)) == list(range(1, 13))
    ls = losses(run_dir)
    assert ls[12] < ls[1]  # it learns
    assert (run_dir / "checkpoints/latest").read_text() == "step_00000012"
    tag = run_dir / "checkpoints/step_00000012"
    assert {"rng_rank0.pt", "rng_rank1.pt", "lillm.json", "config.yaml"} <= {p.name for p in tag.iterdir()}
    assert len(list(tag.glob("*optim_states.pt"))) == 2  # ZeRO-2: one optimizer shard per rank
    assert "2 rank(s) on cpu, fp32, ZeRO stage 2" in r.stdout
    assert r.stdout.count("data verified: sha256 of") == 1 and "split over 2 rank(s)" in r.stdout
    assert json.loads((run_dir / "data-verified.json").read_text())["ranks"] == 2
    assert "step 12/12 | loss" in r.stdout and "tok/s" in r.stdout and "eta" in r.stdout
    # Output to files: every step and eval line on a line of its own, no progress bar redraws between them.
    assert re.search(r"^step 12/12 \| loss", r.stdout, re.M) and re.search(r"^\S+ eval @ step 12", r.stdout, re.M)
    assert "step/s]" not in r.stdout + r.stderr and "\r" not in r.stdout + r.stderr
    assert (run_dir / "config.yaml").read_text().count("micro_batch_size: 4") == 1
    # Quiet ranks: no DeepSpeed accelerator detection warning, op-load line or torch deprecation warning from them,
    # and a summary to end on.
    # The launcher's own processes print their accelerator warning before spawning the ranks; what follows the last
    # "spawned with command" line is the ranks' output.
    lines = r.stdout.splitlines()
    spawned = max(i for i, line in enumerate(lines) if "spawned with command" in line)
    ranks_said = [line for line in lines[spawned + 1:] if "launch.py" not in line and "runner.py" not in line]
    chatter = [line for line in ranks_said if "Setting accelerator" in line or "built successfully" in line]
    assert not chatter, chatter
    assert "FutureWarning" not in r.stderr, r.stderr[-2000:]
    summary = next(line for line in reversed(lines) if "done at step" in line)  # the launcher has the last word
    tokens = 12 * metrics(run_dir, "train/tokens_seen")[1]
    assert re.search(rf"done at step 12/12: 12 steps, {tokens:,} tokens in \S+ \([\d,]+ tok/s\); best val/loss "
                     rf"[\d.]+ \(bpb [\d.]+\) at step (6|12); checkpoint {run_dir}/checkpoints/step_00000012; "
                     "TensorBoard: tensorboard --logdir ", summary), summary


def test_evaluation_tasks_on_two_ranks_score_as_lillm_eval_on_one(full_run, tmp_path):
    """Items split over 2 ranks during training, the saved step-12 model scored by one `lillm eval` process:
    the same figures."""
    run_dir, *_ = full_run
    out = tmp_path / "eval.json"
    r = run_cli("eval", str(run_dir), "--tasks", ",".join(EVAL_TASKS), "--limit", "6", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert metrics(run_dir, "eval/bpb:pydoc/bpb")[12] == pytest.approx(results["bpb:pydoc"]["bpb"], abs=1e-6)
    for metric in ("acc", "acc_norm"):
        during = metrics(run_dir, f"eval/pydoc-continuation/{metric}")
        assert sorted(during) == [6, 12] and during[12] == results["pydoc-continuation"][metric]


def test_tensorboard_scalars_read_back(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, *_ = full_run
    # The events are in a folder named as the run (TensorBoard shows a run by its folder, "." without one).
    assert [p.name for p in (run_dir / "tensorboard").iterdir()] == [run_dir.name]
    acc = EventAccumulator(str(tensorboard_dir(run_dir)), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert not any(t.startswith("hparam") for t in tags), tags  # the hparams table reads val/loss itself
    assert set(acc.PluginTagToContent("hparams")) == {"_hparams_/experiment", "_hparams_/session_start_info",
                                                      "_hparams_/session_end_info"}
    assert b"val/loss" in acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s",
                "perf/data_wait_frac", "val/loss", "val/perplexity", "val/bpb"):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    assert [e.step for e in acc.Scalars("val/loss")] == [6, 12]
    text_tags = set(acc.Tags()["tensors"])
    assert any("samples" in t for t in text_tags) and any("config" in t for t in text_tags)
    sample = acc.Tensors(next(t for t in text_tags if "samples" in t))[0].tensor_proto.string_val[0].decode()
    assert sample.startswith("```\nThe") and sample.endswith("\n```")  # shown as written, not as Markdown
    loss12 = acc.Scalars("train/loss")[-1].value
    assert loss12 == pytest.approx(losses(run_dir)[12], rel=1e-6)


def _run_from_checkpoint(src_run: Path, dst_run: Path, tag: str = "step_00000006") -> Path:
    return run_from_checkpoint(src_run, dst_run, tag)


def test_exact_resume_is_bit_identical(full_run, data, tmp_path):
    run_dir, *_ = full_run
    resumed = _run_from_checkpoint(run_dir, tmp_path / "resumed")
    r = launch(data, resumed, 12)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 6" in r.stdout
    ref, got = losses(run_dir), losses(resumed)
    assert sorted(got) == list(range(7, 13))
    assert all(got[s] == ref[s] for s in got), (got, ref)  # bit-identical


def test_resume_on_one_rank_from_two_rank_checkpoint(full_run, data, tmp_path):
    run_dir, *_ = full_run
    one = _run_from_checkpoint(run_dir, tmp_path / "one")
    # Same global batch on one rank: twice the accumulation.
    r = launch(data, one, 12, "--train.grad_accum", "4", ranks=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "universal format" in r.stdout
    ref, got = losses(run_dir), losses(one)
    assert sorted(got) == list(range(7, 13))
    for s in got:
        assert got[s] == pytest.approx(ref[s], abs=1e-5)
    # Validation is the same windows at any world size: bits per byte agree on 1 and 2 ranks.
    assert metrics(one, "val/bpb")[12] == pytest.approx(metrics(run_dir, "val/bpb")[12], abs=1e-5)
    r = run_cli("checkpoint", str(one))
    assert r.returncode == 0 and "saved by 1 rank(s)" in r.stdout


def test_export_loads_in_transformers_with_equal_logits(full_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lillm.hf import import_hf
    from lillm.loading import load_model_from_checkpoint

    run_dir, *_ = full_run
    r = run_cli("export", str(run_dir), str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    ours, tok = load_model_from_checkpoint(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    x = torch.tensor([tok.prompt_ids("The module provides")])
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() < 1e-4
    assert import_hf(tmp_path / "hf").config == ours.config
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode("The module provides") == tok.prompt_ids("The module provides")  # one prompt convention
    assert hf_tok.encode("The module provides", add_special_tokens=False) == tok.encode("The module provides")
    r = run_cli("generate", str(run_dir), "The", "--max_new_tokens", "5", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("The"), r.stderr


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.returncode}")
        time.sleep(0.5)
    raise AssertionError("timed out waiting for training")


def _wait_for(condition, timeout: float) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.5)


def _rank_pids(run_dir: Path, with_workers: bool = False) -> list[int]:
    """The training ranks of a run (children of the launcher), optionally with their DataLoader workers."""
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "--local_rank=" in cmd and f"--train.run_dir {run_dir} " in cmd:
            parent = " ".join(p.parent().cmdline()) if p.parent() else ""
            if with_workers or "--local_rank=" not in parent:
                pids.append(p.pid)
    return pids


def test_sigterm_and_ctrl_c_through_a_pipe_save_then_kill9_and_resume(data, tmp_path):
    run_dir = tmp_path / "preempt"
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(29600 + os.getpid() % 1000),
           *_args(data, run_dir, 400, "--train.ckpt_interval", "1000")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)
    _wait_for_step(run_dir, 3, proc)
    # SIGTERM to the command the user typed, only: DeepSpeed's runner dies without passing it on, and the
    # ranks notice their launcher is gone. (A scheduler signalling every process is the SLURM test's case.)
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)  # the ranks share its stdout: this returns when they have exited
    assert time.time() - start < 60 and not _rank_pids(run_dir, with_workers=True), out[-3000:]
    assert "the deepspeed command that started this run has exited: saving at step" in out, out[-3000:]
    saved = int((run_dir / "checkpoints/latest").read_text().removeprefix("step_"))
    assert saved >= 3 and max(losses(run_dir)) == saved

    # Ctrl-C with the output going through `| tee`: the terminal's SIGINT reaches every process of the
    # foreground job, tee included, so the ranks go on writing into a closed pipe while they save.
    log = tmp_path / "tee.log"
    piped = subprocess.Popen(["bash", "-c", f"{shlex.join(cmd)} 2>&1 | tee {log} >/dev/null"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    _wait_for_step(run_dir, saved + 3, piped)
    os.killpg(piped.pid, signal.SIGINT)
    piped.wait(timeout=120)
    _wait_for(lambda: not _rank_pids(run_dir, with_workers=True), 120)
    interrupted = int((run_dir / "checkpoints/latest").read_text().removeprefix("step_"))
    assert interrupted >= saved + 3 and max(losses(run_dir)) == interrupted, log.read_text()[-3000:]
    saved = interrupted

    # kill -9 while training (no chance to save), then resume from the Ctrl-C checkpoint.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)
    _wait_for_step(run_dir, saved + 3, proc)
    victims = _rank_pids(run_dir, with_workers=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert (run_dir / "checkpoints/latest").read_text() == f"step_{saved:08d}"
    r = launch(data, run_dir, saved + 4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {saved}" in r.stdout
    assert (run_dir / "checkpoints/latest").read_text() == f"step_{saved + 4:08d}"
    # The steps that ran after the checkpoint and were replayed show once, in metrics.jsonl and TensorBoard.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train/loss" in row] == list(range(1, saved + 5))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir(run_dir)), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, saved + 5))


def test_slurm_job_on_two_fake_nodes_saves_at_the_time_limit_requeues_and_resumes(full_run, data, tmp_path):
    """launch/slurm_pretrain.sbatch in a fake SLURM allocation (stub scontrol and srun on PATH, SLURM_* set):
    two "nodes" (localhost and 127.0.0.1) x 1 CPU rank through DeepSpeed's --no_ssh path. The time-limit
    warning (USR1 to the batch shell) makes every rank save and stop and the job requeue itself; the second
    start resumes and ends with the same losses as the uninterrupted 1 node x 2 ranks run."""
    ref_dir, *_ = full_run
    run_dir = tmp_path / "slurm"
    env = {**ENV, "PATH": f"{REPO / 'tests/fake_slurm'}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "fake[0-1]", "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": str(REPO),
           "FAKE_SLURM_HOSTS": "localhost 127.0.0.1", "FAKE_SLURM_LOG": str(tmp_path / "slurm.log"),
           "LILLM_GPUS_PER_NODE": "1", "LILLM_CONFIG": "debug", "LILLM_DS_CONFIG": "zero2_cpu",
           "MASTER_PORT": str(29300 + os.getpid() % 1000)}
    cmd = ["bash", "launch/slurm_pretrain.sbatch", *_args(data, run_dir, 12)[1:]]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                           start_new_session=True)
    _wait_for_step(run_dir, 3, job)
    job.send_signal(signal.SIGUSR1)  # what #SBATCH --signal=B:USR1@120 sends before the time limit
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-3000:]
    assert "on 2 node(s) x 1" in out and "2 rank(s) on cpu" in out and "saving at step" in out, out[-3000:]
    assert (tmp_path / "slurm.log").read_text() == "requeue 4242\n"
    saved = int((run_dir / "checkpoints/latest").read_text().removeprefix("step_"))
    assert 3 <= saved < 12 and max(losses(run_dir)) == saved
    assert not _rank_pids(run_dir, with_workers=True)  # nothing left running

    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)  # the requeued start
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"at step {saved}" in r.stdout and (tmp_path / "slurm.log").read_text() == "requeue 4242\n"
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(1, 13)) and all(got[s] == ref[s] for s in got), (got, ref)  # bit-identical


def test_accelerate_launch_with_the_deepspeed_plugin_config(data, tmp_path):
    """`accelerate launch --config_file launch/accelerate_deepspeed.yaml launch/pretrain.py`, made CPU-sized:
    accelerate starts 2 processes and the run takes its DeepSpeed JSON from the plugin config."""
    import yaml

    cfg = yaml.safe_load((REPO / "launch/accelerate_deepspeed.yaml").read_text())
    cfg["use_cpu"] = True
    cfg["deepspeed_config"]["deepspeed_config_file"] = "ds_configs/zero2_cpu.json"
    (tmp_path / "acc.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "acc"
    args = [a for a in _args(data, run_dir, 2)[1:]]
    i = args.index("--ds_config")
    del args[i : i + 2]  # 'auto': the plugin's file
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(tmp_path / "acc.yaml"),
           "--main_process_port", str(29200 + os.getpid() % 1000), "launch/pretrain.py", *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 rank(s) on cpu, fp32, ZeRO stage 2" in r.stdout and sorted(losses(run_dir)) == [1, 2]
    filled = json.loads((run_dir / "ds_config.json").read_text())
    assert "bf16" not in filled and filled["zero_optimization"]["reduce_bucket_size"] == 5_000_000  # zero2_cpu


def test_a_refusal_through_the_launcher_is_one_line_on_stderr(data, tmp_path):
    """Both ranks refuse the same bad value; the user reads it once (the later rank holds its line back and the
    launcher stops it), with exit status 2."""
    r = launch(data, tmp_path / "refused", 4, "--train.micro_batch_size", "0", timeout=120)
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    refusal = "pretrain: error: invalid TrainConfig: micro_batch_size must be positive, got 0"
    assert r.stderr.splitlines() == [refusal], r.stderr
    assert not (tmp_path / "refused").exists()


def test_a_rank_that_crashes_mid_training_ends_the_job_within_seconds(data, tmp_path):
    """A refusal in one rank (out-of-vocabulary ids in a forged shard, named by the DataLoader worker that read
    them), with DataLoader workers running: every process ends and the launcher returns non-zero, instead of
    waiting forever for workers that leave stop signals to their rank."""
    import numpy as np

    forged = tmp_path / "forged"
    shutil.copytree(data, forged)
    shard = sorted(forged.glob("train-*.bin"))[3]
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[len(tokens) // 2 : len(tokens) // 2 + len(tokens) // 8] = 65535  # same size: only a checksum sees it
    tokens.tofile(shard)
    run_dir = tmp_path / "crash"
    start = time.time()
    r = launch(forged, run_dir, 400, "--data.num_workers", "2", "--train.ckpt_interval", "1000", timeout=300)
    elapsed = time.time() - start
    assert r.returncode != 0 and f"{shard}: token 65535 at offset" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    assert elapsed < 150 and not _rank_pids(run_dir, with_workers=True), elapsed
    assert max(losses(run_dir), default=0) < 400  # it did stop early


def test_the_cpu_op_is_not_rebuilt_when_path_changes(tmp_path):
    """torch builds DeepSpeed's CPU op with `ninja` from PATH, and two ninja versions rebuild each other's
    work from scratch: setup (plain PATH, the system's ninja) and a launch with the venv activated used to
    take turns rebuilding it for two minutes. lillm builds with the venv's ninja whatever PATH says."""
    from lillm.train.ops import CPU_OP, build_ops

    built = Path(sys.prefix) / "torch_extensions"
    if not (built / CPU_OP / f"{CPU_OP}.so").is_file():
        build_ops()
    ext = tmp_path / "ext"
    shutil.copytree(built, ext)
    so = ext / CPU_OP / f"{CPU_OP}.so"
    system = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != Path(sys.executable).parent)
    venv_first = str(Path(sys.executable).parent) + os.pathsep + system
    stamps = []
    for path in (system, venv_first, system):
        r = subprocess.run([sys.executable, "-m", "lillm.train.ops", "--build-ops"], cwd=REPO, capture_output=True,
                           text=True, timeout=400, env={**ENV, "TORCH_EXTENSIONS_DIR": str(ext), "PATH": path})
        assert r.returncode == 0, r.stderr[-2000:]
        stamps.append((so.stat().st_mtime_ns, (ext / CPU_OP / ".ninja_log").read_text()))
    assert stamps[0] == stamps[1] == stamps[2], "the op was rebuilt when PATH changed"
