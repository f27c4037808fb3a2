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
