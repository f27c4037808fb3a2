"""The benchmark scripts run (on CPU, tiny shapes) and report both lillm and its peer: no figures are checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO


def test_gpu_benchmark_script_smoke_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--preset", "debug", "--batches", "2",
                        "--seq", "32", "--steps", "1", "--modes", "eager", "--dtype", "float32", "--out",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert {row["model"] for row in result["rows"]} == {"lillm", "transformers"}
    assert all(row["tokens_per_s"] > 0 for row in result["rows"])
    assert "| eager | 2 |" in r.stdout


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
