"""lillm as a user installs it: a built wheel (not the editable checkout), run from a directory that holds
no lillm files, through the real `deepspeed --module` launcher and the `lillm` command, with the shipped
configs by name."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from .conftest import REPO, metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The python of a fresh venv that sees lillm's wheel and, for the other packages, this venv's site."""
    root = tmp_path_factory.mktemp("install")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(root / "wheel")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((root / "wheel").glob("lillm-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    python = root / "venv/bin/python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # This venv's packages (torch, deepspeed ...) through a path entry: its .pth files, among them the
    # editable lillm's, are not processed, so `import lillm` can only find the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    where = subprocess.run([str(python), "-c", "import lillm; print(lillm.__file__)"], capture_output=True,
                           text=True, cwd=root).stdout.strip()
    assert where.startswith(str(site)), where
    return python


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_wheel_ships_the_configs_and_trains_through_deepspeed_module(installed, pretrain_shards, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    common = ["--config", "debug", "--ds_config", "zero2_cpu", "--data.dir", str(pretrain_shards),
              "--model.vocab_size", "1024", "--train.seq_len", "32", "--train.micro_batch_size", "2",
              "--train.max_steps", "3", "--train.log_interval", "1", "--train.eval_interval", "0",
              "--train.sample_tokens", "0", "--data.num_workers", "0"]
    cmd = [str(installed), "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(29400 + os.getpid() % 1000), "--module", "lillm.train.pretrain", *common, "--train.run_dir", "run"]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(metrics(cwd / "run")) == [1, 2, 3] and "2 rank(s) on cpu" in r.stdout
    # The `lillm` command runs the same script, in one process.
    r = subprocess.run([str(installed), "-m", "lillm.cli", "pretrain", *common, "--train.run_dir", "one",
                        "--train.max_steps", "1"], cwd=cwd, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 rank(s) on cpu" in r.stdout and (cwd / "one/checkpoints/latest").is_file()


def test_entry_points_answer_help_and_refuse_bad_paths_before_distributed_setup(installed, tmp_path):
    for module in (["lillm.train.pretrain"], ["lillm.train.posttrain", "sft"], ["lillm.cli", "dpo"]):
        r = subprocess.run([str(installed), "-m", *module, "--help"], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path, env=_env())
        assert r.returncode == 0 and "--train.max_bad_steps" in r.stdout and "--ds_config" in r.stdout, r.stderr
    r = subprocess.run([str(installed), "-m", "lillm.train.posttrain"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=_env())
    assert r.returncode == 2 and "{sft,dpo}" in r.stderr
    for args, message in (
        (["--config", "nope"], "not a config shipped with lillm (debug, dpo-debug"),
        (["--config", "debug", "--ds_config", "zero3"], "not a config shipped with lillm (zero2, zero2_cpu"),
        (["--config", "debug", "--data.dir", str(tmp_path / "missing")], "no manifest.json"),
    ):
        start = time.perf_counter()
        r = subprocess.run([str(installed), "-m", "lillm.cli", "pretrain", *args], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path, env=_env())
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert time.perf_counter() - start < 30  # no process group, no op compilation
