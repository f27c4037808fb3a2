"""Robustness B: full disks, read-only places and interrupted start-ups through the real commands. Each answer
is one line naming the path, exit 2 (130 for an interrupt), no traceback from any rank or thread, and nothing
half-written left where the output should be. A full disk is a small tmpfs (mounting one needs root; where the
test cannot, it is skipped, and tests/test_train_units.py simulates ENOSPC in the same writers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .test_faults import run_cli, start, train_args

pytestmark = pytest.mark.slow
FILLER = "filler"


def _mount(path: Path, *options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", *options, str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount ({r.stderr.decode().strip()}): needs root")


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs holding the (empty) file `fill` writes into, unmounted afterwards. The file exists from the
    start so that filling never depends on the disk taking one more file."""
    mnt = tmp_path / "disk"
    _mount(mnt, "-t", "tmpfs", "-o", "size=40m", "tmpfs")
    (mnt / FILLER).touch()
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave_kb: int = 0) -> None:
    """Fill the disk, leaving about `leave_kb` free, by appending to its filler file."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize - leave_kb * 1024
    with open(disk / FILLER, "ab") as fh:
        while free > 0:
            n = min(free, 1 << 20)
            try:
                fh.write(b"\0" * n)
                fh.flush()
            except OSError:
                break
            free -= n


def test_a_disk_that_fills_during_training_is_one_line_and_the_other_rank_is_quiet(pretrain_shards, small_disk):
    run_dir = small_disk / "run"
    proc = start(train_args(pretrain_shards, run_dir, 2000))
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").is_file() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.3)
    fill(small_disk)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    both = out + err
    assert "Traceback" not in both and "Exception in thread" not in both and "frame #" not in both, both[-3000:]
    errors = [line for line in both.splitlines() if "error: " in line and "launch.py" not in line]
    assert len(errors) == 1 and str(run_dir) in errors[0] and "No space left on device" in errors[0], errors
    rows = (run_dir / "metrics.jsonl").read_text()
    assert rows.endswith("\n") and all(json.loads(line) for line in rows.splitlines())  # no cut line


def test_export_tokenizer_and_prepare_into_a_full_disk_name_the_path_and_leave_nothing(
        process_group, pretrain_shards, tokenizer_dir, small_disk, tmp_path):
    run = tmp_path / "run"
    code, _ = run_cli(["pretrain", *train_args(pretrain_shards, run, 1, "--train.ckpt_interval", "1",
                                               "--train.tensorboard", "false")[1:]])
    assert code == 0
    commands = ((["export", str(run), str(small_disk / "exp")], small_disk / "exp"),
                (["train-tokenizer", "pydoc", str(small_disk / "tok"), "--vocab_size", "300"], small_disk / "tok"),
                (["prepare", "pydoc", str(tokenizer_dir), str(small_disk / "prep")], small_disk / "prep"))
    for leave_kb, todo in ((2048, commands[:1]), (0, commands)):  # nearly full (the model does not fit), full
        fill(small_disk, leave_kb)
        before = sorted(p.name for p in small_disk.iterdir())
        for argv, out in todo:
            code, lines = run_cli(argv)
            errors = [line for line in lines if "error: " in line]
            assert code == 2 and len(errors) == 1 and str(out) in errors[0], (argv, lines)
            assert "No space left on device" in errors[0] and "Traceback" not in "\n".join(lines)
            assert sorted(p.name for p in small_disk.iterdir()) == before, argv  # nothing half-written left


def test_universal_conversion_of_a_read_only_run_is_one_line(process_group, pretrain_shards, tmp_path):
    run = tmp_path / "run"
    code, _ = run_cli(["pretrain", *train_args(pretrain_shards, run, 1, "--train.ckpt_interval", "1",
                                               "--train.optimizer", "adamw", "--train.tensorboard", "false")[1:]])
    assert code == 0
    ro = tmp_path / "ro"
    _mount(ro, "--bind", str(tmp_path))
    try:
        assert subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)]).returncode == 0
        code, lines = run_cli(["checkpoint", str(ro / "run"), "--convert_universal", "true"])
        assert code == 2 and len(lines) == 1, lines
        assert "cannot write the universal copy of step_00000001 (Read-only file system)" in lines[0], lines
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


@pytest.mark.parametrize("delay", [1.5, 4.0, 7.0])
def test_ctrl_c_during_start_up_is_one_line_and_leaves_no_rank_running(pretrain_shards, tmp_path, delay):
    """Ctrl-C (SIGINT to the whole foreground job) at moments of start-up: while Python imports torch, while the
    `deepspeed` command starts its launcher, while the ranks join. No traceback from lillm's processes (DeepSpeed's
    own `deepspeed` command and its per-node launcher print KeyboardInterrupt tracebacks: not ours to change),
    `interrupted` at most
    once, and no rank left training."""
    from .test_faults import ranks_of

    run_dir = tmp_path / "run"
    proc = start(train_args(pretrain_shards, run_dir, 400))
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    both = out + err
    blocks = both.split("Traceback (most recent call last):")[1:]
    ours = [b for b in blocks if "launch/pretrain.py" in b or "/lillm/" in b]  # a rank's, not DeepSpeed's runner
    assert not ours, ours[0][:3000]
    assert both.count("interrupted") <= 1, both[-3000:]
    deadline = time.time() + 60
    while ranks_of(run_dir) and time.time() < deadline:
        time.sleep(1)
    assert not ranks_of(run_dir), "a rank is still running"
