"""The fault table: what a flaky cluster or a careless second user does to a run, each fault made on purpose
and answered cleanly: one line and exit 2, a save and exit 0, or a refusal, never a hang, a silent wrong
result or lost work. Faults that cannot be made directly are simulated (a lock file left by a dead process, a
stopped rank, a port taken by another listener). Launches through the real `deepspeed` launcher are few and
shared; the rest run in-process. Issue "Robustness A" numbers the faults; FAULTS maps each to its tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lillm import cli

from .conftest import DEEPSPEED, ENV, REPO

pytestmark = pytest.mark.slow

FAULTS = {
    1: "a stale DeepSpeed op-build lock",
    2: "shards changed under a resume",
    3: "two runs in one run directory",
    4: "a fresh run over another run's files",
    5: "a YAML key written twice",
    6: "same-size damage to a large checkpoint file",
    7: "SIGTERM during a long evaluation",
    8: "SIGHUP (the terminal closing)",
    9: "a stopped rank",
    10: "the rendezvous port taken",
}


def train_args(data: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """A small, quick pretraining run of the debug recipe on the test shards."""
    return ["launch/pretrain.py", "--config", "debug", "--ds_config", "zero2_cpu", "--data.dir", str(data),
            "--train.run_dir", str(run_dir), "--model.vocab_size", "1024", "--train.max_steps", str(steps),
            "--train.warmup_steps", "2", "--train.micro_batch_size", "4", "--train.seq_len", "64",
            "--train.grad_accum", "1", "--train.log_interval", "1", "--train.eval_interval", "0",
            "--train.eval_batches", "2", "--train.sample_tokens", "0", "--train.ckpt_interval", "1000",
            "--data.num_workers", "0", *extra]


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], ranks: int = 2, env: dict | None = None, master_port: int | None = None) -> subprocess.Popen:
    """A training script through the real `deepspeed` launcher, in a process group of its own."""
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(master_port or port()), *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, **(env or {})}, start_new_session=True)


def steps_logged(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []
    return [r["step"] for r in rows if "train/loss" in r]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while max(steps_logged(run_dir), default=0) < step:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        if time.time() > deadline:
            raise AssertionError("timed out waiting for training")
        time.sleep(0.3)


def latest(run_dir: Path) -> int:
    return int((run_dir / "checkpoints/latest").read_text().removeprefix("step_"))


def ranks_of(run_dir: Path) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if "--local_rank=" in " ".join(p.info["cmdline"] or []) and str(run_dir) in (p.info["cmdline"] or [])]


def run_cli(argv: list[str]) -> tuple[int, list[str]]:
    """`lillm ARGV` in-process: (exit code, non-empty stderr lines). A training command's exit tears down the
    process group, which in-process tests of the session share: kept here."""
    import torch.distributed as dist

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(dist, "destroy_process_group", lambda: None)
        try:
            cli.main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, [line for line in err.getvalue().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def extensions(tmp_path_factory) -> Path:
    """A copy of the venv's built DeepSpeed ops, to damage."""
    import shutil

    from lillm.train.ops import CPU_OP, build_ops

    built = Path(sys.prefix) / "torch_extensions"
    if not (built / CPU_OP / f"{CPU_OP}.so").is_file():
        build_ops()  # launch/setup_env.sh does this once per venv
    ext = tmp_path_factory.mktemp("ops") / "ext"
    shutil.copytree(built, ext)
    return ext


def test_fault_01_a_dead_builders_op_lock_never_blocks_and_a_live_ones_wait_is_bounded(pretrain_shards, tmp_path,
                                                                                      extensions):
    """A build killed mid-way leaves torch's lock file, fresh: the next 2-rank launch removes it (lillm's own
    lock, an OS lock that died with the killed builder, is free) and trains. A live holder of lillm's lock is
    waited for, with its pid and host on a progress line, for a bounded time, then one line and exit 2."""
    import fcntl

    from lillm.train.ops import BUILD_LOCK, CPU_OP

    lock = extensions / CPU_OP / "lock"
    lock.write_text("")
    proc = start(train_args(pretrain_shards, tmp_path / "run", 1), env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "removed a DeepSpeed build lock that no process holds" in err and not lock.exists(), err[-3000:]

    with open(extensions / BUILD_LOCK, "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.truncate()
        held.write("pid 4242 on buildhost since 12:00:00")
        held.flush()
        env = {**ENV, "TORCH_EXTENSIONS_DIR": str(extensions), "LILLM_OP_BUILD_WAIT_S": "14"}
        started = time.time()
        r = subprocess.run([sys.executable, *train_args(pretrain_shards, tmp_path / "run2", 1)], cwd=REPO,
                           capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and time.time() - started < 60, r.stderr[-3000:]
    assert lines[-1].startswith("pretrain: error: waited") and "held by pid 4242 on buildhost" in lines[-1], lines
    assert lines[0].startswith("lillm: waiting 10 s so far for a DeepSpeed op build by pid 4242"), lines
    assert "Traceback" not in r.stderr and not (tmp_path / "run2").exists()


def test_fault_02_shards_changed_under_a_resume_are_refused_unless_allowed(process_group, pretrain_shards, tmp_path):
    """A shard's tokens shuffled in place (same size, the manifest untouched) after a save: the resume is refused
    in one line naming the shard, and goes on with --data.allow_changed true. Random bytes of the same size
    (ids outside the vocabulary) name the shard and the offset of the first bad id, from a DataLoader worker."""
    import shutil

    import numpy as np

    from lillm.data.loader import PretrainLoader, ShardSet
    from lillm.errors import UserError
    from lillm.train import pretrain

    data = tmp_path / "data"
    shutil.copytree(pretrain_shards, data)

    def build(steps: int, *extra: str):
        cfg, yaml = pretrain.parse_config([*train_args(data, tmp_path / "run", steps)[1:], "--train.tensorboard",
                                           "false", "--data.num_workers", "1", *extra])
        return pretrain.build(cfg, yaml)

    assert build(2).fit() == 0
    shard = sorted(data.glob("train-*.bin"))[1]
    tokens = np.fromfile(shard, dtype=np.uint16)
    np.random.default_rng(0).shuffle(tokens)
    tokens.tofile(shard)
    with pytest.raises(UserError, match=f"{shard}: its bytes differ from when the checkpoint was saved .* set "
                                        "--data.allow_changed true"):
        build(4)
    assert build(4, "--data.allow_changed", "true").fit() == 0

    for f in data.glob("train-*.bin"):
        f.write_bytes(np.random.default_rng(1).integers(0, 2**16, f.stat().st_size // 2, dtype=np.uint16).tobytes())
    assert build(6, "--data.allow_changed", "true").fit() == 2  # the refusal, logged, ends the run with exit 2
    loader = PretrainLoader(ShardSet(data, "train"), 64, 4, num_workers=1)  # what the run's DataLoader worker read
    with pytest.raises(UserError, match=r"^\S+/train-\S+\.bin: token \d+ at offset [\d,]+ is outside the vocabulary "
                                        r"of 1024: the shard is damaged"):
        next(iter(loader))


def test_fault_03_a_second_run_into_a_busy_run_directory_is_refused_naming_the_owner(pretrain_shards, tmp_path):
    """Two 2-rank launches into one run directory: the second is refused in one line naming the first (its pid
    and host) and writes nothing; the first trains on, saves on SIGTERM and leaves no lock behind."""
    run_dir = tmp_path / "run"
    first = start(train_args(pretrain_shards, run_dir, 400))
    wait_for_step(run_dir, 2, first)
    before = sorted(p.name for p in run_dir.rglob("*"))
    second = start(train_args(pretrain_shards, run_dir, 400))
    _, err = second.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1, err[-3000:]
    owner = json.loads((run_dir / "lillm.lock").read_text())
    assert f"is in use by the run of pid {owner['pid']} on {owner['host']}" in lines[0], lines
    os.killpg(first.pid, signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert "saving at step" in out and "Traceback" not in err, err[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, len(steps) + 1)), steps  # one row per step: only the first run wrote
    assert set(before) - {"lillm.lock"} <= {p.name for p in run_dir.rglob("*")}
    assert not (run_dir / "lillm.lock").exists()


def test_fault_03_stale_locks_are_taken_over_and_live_ones_refused(tmp_path, monkeypatch):
    """The lock's staleness rules without a second host: a dead pid on this host, a pid reused by another
    process, and a heartbeat stopped on another host are taken over; a live owner anywhere is refused."""
    import socket as sock

    import psutil

    from lillm.errors import UserError
    from lillm.train import rundir
    from lillm.train.rundir import RunLock

    def lock_with(owner: dict, age: float = 0.0) -> Path:
        d = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "lillm.lock").write_text(json.dumps(owner))
        os.utime(d / "lillm.lock", (time.time() - age, time.time() - age))
        return d

    host = sock.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = psutil.Process().parent()
    live = {"host": host, "pid": parent.pid, "pid_started": parent.create_time(), "started": "then"}
    for owner, age in (({**live, "pid": dead.pid}, 0), ({**live, "pid_started": 1.0}, 0),
                       ({**live, "host": "elsewhere"}, rundir.STALE_S + 5)):
        lock = RunLock(lock_with(owner, age))
        lock.acquire()
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        lock.release()
        assert not lock.path.exists()
    for owner, age in ((live, 0), ({**live, "host": "elsewhere"}, 10)):
        d = lock_with(owner, age)
        with pytest.raises(UserError, match=f"in use by the run of pid {parent.pid} on {owner['host']}"):
            RunLock(d).acquire()
        assert json.loads((d / "lillm.lock").read_text()) == owner  # left as it was
    # The heartbeat keeps a long run's lock fresh for other hosts.
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path / "beating")
    lock.acquire()
    os.utime(lock.path, (time.time() - 1000, time.time() - 1000))
    time.sleep(0.3)
    assert time.time() - lock.path.stat().st_mtime < 5
    lock.release()
    assert not (tmp_path / "beating").exists()  # made by acquire, empty: removed


def test_fault_04_a_fresh_run_over_another_runs_checkpoints_is_refused(process_group, pretrain_shards, tmp_path):
    """train.resume none into a directory with checkpoints: refused before anything is written (its tokenizer,
    config and latest stay the other run's); a resume that is refused for another tokenizer writes nothing."""
    from lillm.errors import UserError
    from lillm.train import pretrain

    def build(run_dir: Path, *extra: str):
        cfg, yaml = pretrain.parse_config([*train_args(pretrain_shards, run_dir, 2)[1:], "--train.tensorboard",
                                           "false", *extra])
        return pretrain.build(cfg, yaml)

    run_dir = tmp_path / "run"
    assert build(run_dir).fit() == 0
    files = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    with pytest.raises(UserError, match=r"train.resume none, but .* holds another run's checkpoints \(step_00000002\)"):
        build(run_dir, "--train.resume", "none")
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == files


def test_fault_05_a_yaml_key_written_twice_is_refused_naming_the_file_key_and_lines(tmp_path):
    cfg = tmp_path / "twice.yaml"
    cfg.write_text("train:\n  lr: 0.001\n  max_steps: 5\n  lr: 0.99\n")
    for argv in (["pretrain", "--config", str(cfg)], ["sft", f"--config={cfg}"],
                 ["train-tokenizer", "--config", str(cfg)]):
        code, lines = run_cli(argv)
        assert code == 2 and len(lines) == 1, lines
        assert f"{cfg}: duplicate key 'lr' at line 4 (first at line 2)" in lines[0], lines
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  eval_tasks: [a]\nmodel: {n_layers: 2, n_layers: 3}\n")
    code, lines = run_cli(["pretrain", "--config", str(nested)])
    assert code == 2 and "duplicate key 'n_layers' at line 3" in lines[0], lines
    # A value on the command line is read by the same loader.
    code, lines = run_cli(["pretrain", "--config", "debug", "--model", "{n_layers: 2, n_layers: 3}"])
    assert code == 2 and "duplicate key 'n_layers'" in lines[0], lines


def test_fault_06_same_size_damage_to_a_large_checkpoint_file_is_found_and_passed_over(process_group, pretrain_shards,
                                                                                       tmp_path, monkeypatch):
    """Large files (here: anything over 1 KiB) are recorded with a sampled sha256. Random bytes of the same size
    in the latest tag's optimizer shard: `lillm checkpoint` and `generate` name the file (and the intact tag to
    use) in one line, exit 2; an auto resume passes over it to the previous tag."""
    from lillm import runs
    from lillm.train import pretrain

    monkeypatch.setattr(runs, "SMALL_FILE", 1024)
    run_dir = tmp_path / "run"
    cfg, yaml = pretrain.parse_config([*train_args(pretrain_shards, run_dir, 2)[1:], "--train.tensorboard", "false",
                                       "--train.ckpt_interval", "1"])
    assert pretrain.build(cfg, yaml).fit() == 0
    meta = json.loads((run_dir / "checkpoints/step_00000002/lillm.json").read_text())
    shard = next((run_dir / "checkpoints/step_00000002").glob("*optim_states.pt"))
    assert "sampled_sha256" in meta["files"][shard.name]
    shard.write_bytes(os.urandom(shard.stat().st_size))
    for argv in (["checkpoint", str(run_dir)], ["generate", str(run_dir), "x", "--max_new_tokens", "2"],
                 ["export", str(run_dir), str(tmp_path / "export")]):
        code, lines = run_cli(argv)
        assert code == 2 and len(lines) == 1, lines
        assert f"{shard}: contents changed since it was saved (same size, sampled sha256 mismatch); the newest " \
               f"intact checkpoint of this run is {run_dir / 'checkpoints/step_00000001'}" in lines[0], lines
    assert not (tmp_path / "export").exists()
    cfg, yaml = pretrain.parse_config([*train_args(pretrain_shards, run_dir, 3)[1:], "--train.tensorboard", "false"])
    trainer = pretrain.build(cfg, yaml)
    assert trainer.progress.step == 1  # resumed from step_00000001, the newest intact tag, with a warning
    assert trainer.fit() == 0


def test_fault_07_08_sigterm_mid_evaluation_and_sighup_save_then_exit(pretrain_shards, tmp_path):
    """7: a SIGTERM to every process of the job while a long evaluation runs (100,000 validation batches: minutes)
    cuts the evaluation short and saves the step within seconds, well inside the 30 s DeepSpeed's launcher
    allows. 8: SIGHUP, what every process of a job gets when its terminal closes, saves and exits too."""
    run_dir = tmp_path / "run"
    proc = start(train_args(pretrain_shards, run_dir, 400, "--train.eval_interval", "3", "--train.eval_batches",
                            "100000"))
    wait_for_step(run_dir, 3, proc)
    time.sleep(2)  # inside the evaluation of step 3
    sent = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert time.time() - sent < 15, out[-2000:]
    assert "eval @ step 3: cut short by a stop request" in out and "saving at step 3" in out, out[-3000:]
    assert latest(run_dir) == 3 and "Traceback" not in err, err[-3000:]
    assert not ranks_of(run_dir)

    proc = start(train_args(pretrain_shards, run_dir, 400))
    wait_for_step(run_dir, 6, proc)
    os.killpg(proc.pid, signal.SIGHUP)
    out, err = proc.communicate(timeout=120)
    assert "received signal SIGHUP: saving at step" in out and "resumed from" in out, out[-3000:]
    assert latest(run_dir) >= 6 and max(steps_logged(run_dir)) == latest(run_dir), out[-2000:]
    assert "Traceback" not in err and not ranks_of(run_dir), err[-3000:]


def test_fault_09_a_stopped_rank_ends_the_job_naming_it(pretrain_shards, tmp_path):
    """SIGSTOP one rank: the other waits in a collective, and its watchdog ends the job once no progress was made
    for the bound (train.watchdog_s 15 here, or 20x the slowest step), naming the stopped rank and its step."""
    import psutil

    run_dir = tmp_path / "run"
    proc = start(train_args(pretrain_shards, run_dir, 400, "--train.watchdog_s", "15"))  # > a slow first step
    wait_for_step(run_dir, 4, proc)
    victim = next(psutil.Process(pid) for pid in ranks_of(run_dir)
                  if "--local_rank=1" in psutil.Process(pid).cmdline())
    victim.suspend()
    stopped = time.time()
    try:
        _, err = proc.communicate(timeout=150)
    finally:
        with contextlib.suppress(psutil.Error):
            victim.kill()
    lines = [line for line in err.splitlines() if line.startswith("lillm: watchdog")]
    assert proc.returncode != 0 and len(lines) == 1, err[-3000:]
    assert re.search(r"no progress for \d+ s \(bound \d+ s: .*\); rank 1 stopped answering \d+ s ago, at step \d+ "
                     r"\(training\); ending the job", lines[0]), lines
    assert time.time() - stopped < 120 and "Traceback" not in err, err[-3000:]


def test_the_watchdog_bound_follows_the_slowest_phase_after_the_warm_up():
    from lillm.train.watchdog import FACTOR, Watchdog

    now = [0.0]
    dog = Watchdog(0, 1, 60.0, clock=lambda: now[0])
    for step, gap in ((0, 0.0), (0, 500.0), (1, 300.0), (2, 1.0), (3, 2.0), (3, 1.5)):
        now[0] += gap
        dog.beat(step, "training")
    assert dog.longest == 2.0 and dog.bound == 60.0  # the warm-up steps 0 and 1 are left out
    now[0] += 10.0
    dog.beat(4, "saving")
    assert dog.bound == FACTOR * 10.0


def test_fault_10_a_taken_rendezvous_port_is_one_line_with_the_fix(pretrain_shards, tmp_path):
    with socket.socket() as other_job:
        other_job.bind(("127.0.0.1", 0))
        other_job.listen()
        taken = other_job.getsockname()[1]
        proc = start(train_args(pretrain_shards, tmp_path / "run", 2), master_port=taken)
        _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, err[-3000:]
    assert f"the rendezvous port {taken} on 127.0.0.1 is in use" in lines[0] and "--master_port" in lines[0]
    assert not (tmp_path / "run").exists()


def test_the_launch_scripts_pick_a_free_port_unless_master_port_is_set(tmp_path):
    for script in ("launch/quickstart.sh", "launch/pretrain_2xa100.sh"):
        text = (REPO / script).read_text()
        assert 'PORT=${MASTER_PORT:-$(python3 -c' in text and '--master_port "$PORT"' in text, script
    script = f"grep -m1 '^PORT=' launch/quickstart.sh > {tmp_path}/p.sh; . {tmp_path}/p.sh; echo $PORT"
    r = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "MASTER_PORT"})
    assert r.stdout.strip().isdigit() and int(r.stdout) > 1024, r.stderr


def test_every_fault_has_a_test():
    names = [n for n in dir(sys.modules[__name__]) if n.startswith("test_fault_")]
    assert {int(n.split("_")[2]) for n in names} | {8} == set(FAULTS), names  # 8 shares a test with 7
