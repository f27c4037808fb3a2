"""The benchmark scripts run (on CPU, tiny shapes) and report both lillm and its peer: no figures are checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO


def test_gpu_check_smoke_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh --smoke: every step of the GPU validation (data, benchmarks/gpu.py with lillm and
    transformers, a real DeepSpeed run, its resume, packed attention) on CPU with tiny shapes, so the script a
    GPU session runs first cannot rot."""
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke", "--out", str(out), "--work", str(tmp_path / "w")],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["environment", "data", "kernels", "train", "resume", "post", "packed", "cuda"]
    assert all(s["ok"] for s in steps.values())
    assert {row["model"] for row in steps["kernels"]["rows"]} == {"lillm", "transformers"}
    assert steps["train"]["tokens_per_s"] > 0 and steps["train"]["val_loss"] < 6.93  # ln(1024) at the start
    assert steps["resume"]["bit_identical"] and steps["resume"]["steps_compared"] >= 3
    assert steps["post"]["sft"]["last_loss"] < steps["post"]["sft"]["first_loss"] and "dpo" in steps["post"]
    packed = steps["packed"]["results"]["rows"]  # dense and eager flex (compiled flex needs a minute on CPU)
    assert {(row["attention"], row["kind"]) for row in packed} == {
        (a, k) for a in ("dense", "flex-eager") for k in ("train", "forward")}
    assert all(row["ms"] > 0 for row in packed if row["attention"] == "dense" or row["kind"] == "forward")
    assert all("ms" in row or row["error"] for row in packed)  # a path torch cannot run here says why
    md = (out / "gpu_check.md").read_text()
    assert "| eager | 2 | lillm |" in md and "| 64 | dense | train |" in md


def test_learning_benchmark_smoke(tmp_path):
    """Both arms of benchmarks/learning.py train (2 steps) and are scored; it prepares its own corpus."""
    out = tmp_path / "learning.json"
    r = subprocess.run([sys.executable, "benchmarks/learning.py", "--shapes", "debug", "--seeds", "1", "--steps", "2",
                        "--data", str(tmp_path / "pydoc"), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {row["arm"] for row in result["results"]} == {"reference", "lillm"}
    assert all(8.0 < row["val_loss"] < 9.0 for row in result["results"])  # 2 steps from ln(4096) = 8.3
    assert "| debug | 1.3M | 0.02M |" in r.stdout
