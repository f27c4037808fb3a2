"""The benchmark scripts run (on CPU, tiny shapes) and report both lillm and its peer: no figures are checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow  # subprocess runs of whole benchmarks: minutes


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
    assert list(steps) == ["environment", "data", "kernels", "train", "resume", "post", "packed", "cuda", "lr_rule"]
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
    rule = steps["lr_rule"]
    assert set(rule["val_loss"]) == {"0.5x", "1x", "2x"} and rule["best"] in rule["val_loss"]
    md = (out / "gpu_check.md").read_text()
    assert "| eager | 2 | lillm |" in md and "| 64 | dense | train |" in md


def test_learning_benchmark_smoke(tmp_path):
    """benchmarks/learning.py --quick: every arm's sweep (two points, 4 steps) trains and is scored in loss and bits
    per byte, the best of each arm runs again from the cache, and the tables print; it prepares its own corpus."""
    out = tmp_path / "learning.json"
    cmd = [sys.executable, "benchmarks/learning.py", "--quick", "--data", str(tmp_path / "stdlib"), "--cache",
           str(tmp_path / "cache"), "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads(out.read_text())["summary"]["d128"]
    assert set(summary["sweeps"]) == {"reference", "lillm-adamw", "lillm-muon"}
    for arm in summary["sweeps"]:
        assert len(summary["sweeps"][arm]) == 2 and 6.0 < summary[arm]["val_loss"]["mean"] < 8.4  # ln(4096) = 8.3
        assert 2.0 < summary[arm]["val_bpb"]["mean"] < 4.0
    assert len(list((tmp_path / "cache").glob("*.json"))) == 6  # the finals came from the sweep's cache
    assert "| d128 | 0.89M | 0.02M | lillm-muon |" in r.stdout and "tokens to reference's loss" in r.stdout


def test_checkpoint_save_benchmark_smoke(tmp_path):
    """benchmarks/checkpoint_save.py: both arms save a real ZeRO-2 engine and the JSON has both timings."""
    out = tmp_path / "save.json"
    r = subprocess.run([sys.executable, "benchmarks/checkpoint_save.py", "--preset", "debug", "--repeats", "1",
                        "--dir", str(tmp_path), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tag_bytes"] > 0 and result["durable"]["n"] == result["unsynced"]["n"] == 1


def test_data_scale_smoke(tmp_path):
    """benchmarks/data_scale.py --smoke: a synthetic directory written by lillm's writer, dropped from the page
    cache (checked with mincore), every measurement taken, and the directory deleted afterwards."""
    out, work = tmp_path / "scale.json", tmp_path / "work"
    work.mkdir()
    r = subprocess.run([sys.executable, "benchmarks/data_scale.py", "--smoke", "--work", str(work), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["resident_after_drop"] < 0.05  # the drop really empties the cache (tmpfs would not)
    assert len(result["mechanisms"]) == 4 and all(m["batches"] > 0 for m in result["mechanisms"].values())
    assert {(x["workers"], x["cached"]) for x in result["loader"]} == {(w, c) for w in (0, 1, 2) for c in (0, 1)}
    assert result["prepare"]["tokens"] > 0 and result["ceiling"][0]["iops"] > 0
    assert "| lillm loader |" in r.stdout
    assert list(work.iterdir()) == []  # nothing left behind


def test_learning_rows_are_cached_per_recipe(monkeypatch, tmp_path):
    """A lillm row's cache name carries a hash of the resolved recipe (debug.yaml over lillm's defaults): a changed
    shipped recipe (an lr, a decay) reruns the lillm arms instead of reusing rows it did not train, while options
    the benchmark sets itself leave the name alone. The reference arm's rows do not depend on it."""
    import argparse

    sys.path.insert(0, str(REPO / "benchmarks"))
    import learning

    args = argparse.Namespace(cache=str(tmp_path), steps=0, lillm_extra="")
    shipped = learning.debug_recipe()
    names = {}
    for label, recipe in (("shipped", shipped), ("run options", {**shipped, "max_steps": 7, "run_dir": "x"}),
                          ("decay", {**shipped, "muon_weight_decay": 0.4})):
        monkeypatch.setattr(learning, "debug_recipe", lambda recipe=recipe: recipe)
        runner = learning.Runner(args, 1)
        names[label] = [runner.path(("d128", arm, 1.0, 1)).name for arm in ("reference", "lillm-muon")]
    assert names["shipped"] == names["run options"] and names["shipped"][0] == names["decay"][0]
    assert names["shipped"][1] != names["decay"][1] and names["shipped"][1].startswith("d128-lillm-muon-r")
    args.lillm_extra = "--train.muon_weight_decay 0.4"
    assert runner.path(("d128", "lillm-muon", 1.0, 1)).name not in names["decay"][1:]  # a candidate: rows apart


def test_learning_ladder_points_name_their_shape():
    """A ladder point is a width at a depth and a batch, on the width's token budget; the width alone is the width
    ladder's shape, so its cached rows keep their names."""
    import argparse

    sys.path.insert(0, str(REPO / "benchmarks"))
    from learning import Point

    held_out = Point.parse("d128-L4-b8k")
    assert (held_out.depth, held_out.batch, held_out.accum, held_out.steps()) == (4, 8192, 4, 100)
    assert held_out.model()["n_layers"] == 4 and held_out.name == "d128-L4-b8k"
    assert Point.parse("d128") == Point("d128", 2, 4096) and Point.parse("d128").steps() == 200
    assert Point.parse("d256-L8-b16k").steps() == 30 and Point.parse("d128-L2-b4k").name == "d128"
    for bad in ("d100", "d128-L3-b8k", "d128-L4", "d128-L4-b5k"):
        with pytest.raises(argparse.ArgumentTypeError, match="a point is WIDTH"):
            Point.parse(bad)


def _summary(optima: dict[str, float], reference: dict[str, float] | None = None) -> dict:
    """A learning.py summary holding only what ladder_rule reads: each point's fitted optimum, bracketed."""
    out = {}
    for name, lr in optima.items():
        out[name] = {"lillm-muon": {"fitted_lr": lr, "bracketed": True}}
        if reference:
            out[name]["reference"] = {"fitted_lr": reference[name], "bracketed": True}
    return out


def test_ladder_rule_finds_the_axes_that_move_the_optimum():
    """ladder_rule recovers exponents planted in the optima, prefers the rule that predicts held-out points (not
    the one with most parameters), and leaves out an optimum that sat at the edge of its sweep."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from learning import Point, axes, ladder_rule

    names = ["d128", "d128-L4-b4k", "d128-L4-b8k", "d128-L4-b16k", "d128-L8-b8k", "d128-L2-b8k", "d256-L4-b8k",
             "d256-L4-b16k", "d256-L2-b8k"]
    planted = {"width": -0.2, "depth": -0.5, "batch": 0.5}
    lr = {n: 0.8 * 2 ** sum(e * a for e, a in zip(planted.values(), axes(Point.parse(n)))) for n in names}
    rule = ladder_rule(_summary(lr), shipped_width_exponent=-0.2)["lillm-muon"]
    fit = rule["candidates"]["fitted"]
    assert rule["best"] == "fitted" and fit["loo_rms"] < 1e-9
    assert fit["exponents"] == pytest.approx(planted) and fit["lr_at_base"] == pytest.approx(0.8)
    assert rule["candidates"]["sqrt(batch)"]["loo_rms"] > 0.3  # misses the depth term

    # Optima that only wobble (as a factor-2 sweep's fitted optimum does) around one value: no axis moves them,
    # and the constant rule predicts held-out points better than a fit with three exponents.
    wobble = [0.05, -0.04, 0.03, -0.06, 0.02, 0.04, -0.03, -0.01, 0.05]
    flat = {n: 0.9 * 2**w for n, w in zip(names, wobble)}
    rule = ladder_rule(_summary(flat), shipped_width_exponent=0.0)["lillm-muon"]
    assert rule["best"] in ("no move", "width") and rule["candidates"]["fitted"]["loo_rms"] > \
        rule["candidates"]["no move"]["loo_rms"]

    # Update-RMS matching: Muon's optimum follows the AdamW reference's at the same point, times sqrt(width).
    ref = {n: 0.008 * 2 ** (-1.3 * axes(Point.parse(n))[0] - 0.4 * axes(Point.parse(n))[1]) for n in names}
    follows = {n: 0.5 * ref[n] / 0.008 * 2 ** (0.5 * axes(Point.parse(n))[0]) for n in names}
    rule = ladder_rule(_summary(follows, ref), shipped_width_exponent=-0.2)["lillm-muon"]
    assert rule["candidates"]["update RMS"]["loo_rms"] < 1e-9

    edge = _summary(lr)
    edge["d128"]["lillm-muon"]["bracketed"] = False
    assert "d128" not in ladder_rule(edge)["lillm-muon"]["points"]
    depth_only = {n: lr[n] for n in ("d128-L2-b8k", "d128-L4-b8k", "d128-L8-b8k")}
    fit = ladder_rule(_summary(depth_only))["lillm-muon"]["candidates"]["fitted"]
    assert fit["exponents"] == pytest.approx({"depth": -0.5})  # no exponent for an axis the points do not vary
