"""The GPU validation, in one run: everything lillm claims about GPUs, measured on the GPU at hand.

    bash benchmarks/gpu_check.sh              # on a GPU machine: under 10 minutes on one GPU
    bash benchmarks/gpu_check.sh --smoke      # CPU, tiny shapes: the same steps in about two minutes (tested)

Steps, each timed and recorded even when another fails:
  1. data     a tokenizer and shards from the built-in corpus (no network)
  2. kernels  benchmarks/gpu.py: lil-39m bf16, eager and compiled, lillm vs transformers' Llama, micro batch
              16/32/64: tokens/s, MFU, peak memory
  3. train    `deepspeed --num_gpus 1 launch/pretrain.py --ds_config ds_configs/zero2.json` with lil-39m for
              200 steps (compiled): MFU and tokens/s from the run's own log, the compile warm-up
  4. resume   the same run resumed from its step-100 checkpoint: its losses against the uninterrupted run's
  5. post     SFT (packed rows, flex attention, compiled, gradient gates on) from that run, then DPO with LoRA:
              the post-training hot path on the GPU, losses finite
  6. packed   benchmarks/packed_attention.py: packed SFT step time and memory, dense mask vs flex attention
  7. cuda     the test suite's CUDA-only tests (compiled flex attention against the dense mask)
  8. lr_rule  the learning-rate rule's prediction for lil-39m (lillm/train/recipe.py): short runs of the shipped
              lil-39m config at 0.5x, 1x and 2x its learning rates; the prediction holds when 1x ends lowest
Writes gpu_check.json and gpu_check.md to --out after every step, prints the table, and exits 1 when any
step failed or was skipped: a step that would start after --deadline_s is skipped, so the whole command
ends inside a 10-minute limit with its report written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def sh(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> None:
    """Run a command with its output in `log`; raise with the log's tail when it fails."""
    if timeout <= 0:
        raise RuntimeError("no time left before --deadline_s")
    with open(log, "w") as fh:
        r = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                           env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if r.returncode:
        tail = log.read_text()[-1500:]
        raise RuntimeError(f"`{' '.join(cmd[:6])} ...` exited {r.returncode}:\n{tail}")


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out, self.work = args, Path(args.out), Path(args.work)
        self.smoke = args.smoke
        self.report: dict[str, Any] = {"smoke": self.smoke, "steps": {}}
        self.failed = False
        self.t0 = time.perf_counter()

    def left(self, cap: float = 600) -> float:
        """Seconds a command of a step may take: its cap, or what is left before the deadline."""
        return min(cap, self.args.deadline_s - (time.perf_counter() - self.t0))

    def step(self, name: str, fn) -> None:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        if self.left() <= 0:
            self.report["steps"][name] = {"ok": False, "error": f"skipped: past --deadline_s {self.args.deadline_s}",
                                          "seconds": 0.0}
            self.failed = True
            self.write()
            return
        try:
            result = {"ok": True, **fn()}
        except Exception as e:  # noqa: BLE001 - every step is reported, whatever breaks
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            self.failed = True
            print(f"   FAILED: {result['error']}", flush=True)
        result["seconds"] = round(time.perf_counter() - t, 1)
        self.report["steps"][name] = result
        print(f"   {json.dumps(result)[:400]}", flush=True)
        self.write()

    def write(self) -> None:
        """The report so far: a command killed at its time limit still leaves every finished step's figures."""
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2) + "\n")
        (self.out / "gpu_check.md").write_text(self.markdown())

    # -- the steps ---------------------------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        import torch

        env = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
               "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
               else "cpu"}
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
        if not self.smoke and not torch.cuda.is_available():
            self.args.deadline_s = 0  # nothing else is worth running
            raise RuntimeError("no CUDA device (pass --smoke for the CPU path)")
        return env

    def data(self) -> dict[str, Any]:
        vocab = "1024" if self.smoke else "8192"
        tok, shards = self.work / "tok", self.work / "shards"
        limit = ["--max_documents", "300"] if self.smoke else []
        cli = [PY, "-m", "lillm.cli"]
        sh([*cli, "train-tokenizer", "pydoc", str(tok), "--vocab_size", vocab, *limit], self.out / "log_tokenizer.txt",
           self.left())
        sh([*cli, "prepare", "pydoc", str(tok), str(shards), "--val_fraction", "0.02", "--shard_tokens", "1048576"],
           self.out / "log_prepare.txt", self.left())
        manifest = json.loads((shards / "manifest.json").read_text())
        return {"train_tokens": manifest["splits"]["train"]["tokens"], "vocab": int(vocab)}

    def kernels(self) -> dict[str, Any]:
        args = (["--device", "cpu", "--preset", "debug", "--batches", "2", "--seq", "64", "--dtype", "float32",
                 "--steps", "2", "--modes", "eager"] if self.smoke else ["--budget_s", str(self.args.kernels_budget_s)])
        res = self.work / "kernels"
        sh([PY, "benchmarks/gpu.py", *args, "--out", str(res)], self.out / "log_kernels.txt", self.left(300))
        data = json.loads(next(res.glob("gpu-*.json")).read_text())
        return {"rows": data["rows"], "skipped": data["skipped"], "peak_tflops": data["peak_tflops"]}

    def train_args(self, run_dir: Path, max_steps: int) -> list[str]:
        if self.smoke:
            cfg = ["--config", "debug", "--ds_config", "zero2_cpu", "--model.vocab_size", "1024",
                   "--train.micro_batch_size", "4", "--train.seq_len", "64"]
        else:
            cfg = ["--config", "lil-39m-2xa100", "--ds_config", "zero2", "--train.micro_batch_size",
                   str(self.args.micro_batch), "--train.compile", "true", "--data.num_workers", "2"]
        return [*cfg, "--data.dir", str(self.work / "shards"), "--train.run_dir", str(run_dir),
                "--train.max_steps", str(max_steps), "--train.max_tokens", "0", "--train.global_batch_tokens", "0",
                "--train.grad_accum", "1", "--train.warmup_steps", str(max_steps // 10), "--train.log_interval",
                str(max(1, max_steps // 20)), "--train.eval_interval", str(max_steps // 2), "--train.eval_batches",
                "4", "--train.ckpt_interval", str(max_steps // 2), "--train.sample_tokens", "16"]

    def launch(self, run_dir: Path, max_steps: int, log: str) -> None:
        deepspeed = [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29511"]
        env = {"DS_ACCELERATOR": "cpu"} if self.smoke else {}
        sh([*deepspeed, "launch/pretrain.py", *self.train_args(run_dir, max_steps)], self.out / log, self.left(), env)

    def train(self) -> dict[str, Any]:
        steps = self.args.train_steps
        run = self.work / "run"
        shutil.rmtree(run, ignore_errors=True)
        t = time.perf_counter()
        self.launch(run, steps, "log_train.txt")
        wall = time.perf_counter() - t
        rows = [r for r in metrics(run) if "perf/tokens_per_s" in r]
        steady = rows[1:] or rows  # the first window holds the compile warm-up
        out = {"steps": steps, "wall_s": round(wall, 1),
               "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in steady),
               "step_time_s": statistics.median(r["perf/step_time_s"] for r in steady),
               "first_window_step_time_s": rows[0]["perf/step_time_s"],
               "final_train_loss": rows[-1]["train/loss"],
               "val_loss": [r["val/loss"] for r in metrics(run) if "val/loss" in r][-1]}
        if any("perf/mfu" in r for r in steady):
            out["mfu"] = statistics.median(r["perf/mfu"] for r in steady if "perf/mfu" in r)
        if any("perf/max_mem_allocated_gb" in r for r in rows):
            out["peak_mem_gb"] = max(r.get("perf/max_mem_allocated_gb", 0) for r in rows)
        log = (self.out / "log_train.txt").read_text()
        out["compile_notes"] = [line.strip()[:200] for line in log.splitlines() if "compil" in line.lower()][:5]
        return out

    def resume(self) -> dict[str, Any]:
        steps = self.args.train_steps
        run, resumed = self.work / "run", self.work / "resumed"
        half = f"step_{steps // 2:08d}"
        shutil.rmtree(resumed, ignore_errors=True)
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copytree(run / "checkpoints" / half, resumed / "checkpoints" / half)
        (resumed / "checkpoints" / "latest").write_text(half)
        self.launch(resumed, steps, "log_resume.txt")
        a = {r["step"]: r["train/loss"] for r in metrics(run) if "train/loss" in r and r["step"] > steps // 2}
        b = {r["step"]: r["train/loss"] for r in metrics(resumed) if "train/loss" in r}
        common = sorted(set(a) & set(b))
        if not common:
            raise RuntimeError("the resumed run logged no step the uninterrupted run logged")
        diffs = [abs(a[s] - b[s]) / abs(a[s]) for s in common]
        out = {"steps_compared": len(common), "bit_identical": all(d == 0 for d in diffs),
               "max_rel_diff": max(diffs), "first_window_rel_diff": diffs[0], "tolerance": self.args.resume_tolerance}
        if max(diffs) > self.args.resume_tolerance:
            raise RuntimeError(f"resumed losses differ by up to {max(diffs):.3g}: {out}")
        return out

    def post(self) -> dict[str, Any]:
        """SFT (packed rows; on CUDA: flex attention, compiled, with gradient gates) from the pretraining run,
        then DPO with LoRA from the SFT run, through the DeepSpeed launcher."""
        qa = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(12) for b in range(12)]
        sft_data, dpo_data = self.work / "sft.jsonl", self.work / "dpo.jsonl"
        sft_data.write_text("".join(json.dumps({"prompt": q, "response": r}) + "\n" for q, r in qa))
        dpo_data.write_text("".join(json.dumps({"prompt": q, "chosen": r, "rejected": "I do not know."}) + "\n"
                                    for q, r in qa))
        deepspeed = [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29512"]
        env = {"DS_ACCELERATOR": "cpu"} if self.smoke else {}
        ds = "zero2_cpu" if self.smoke else "zero2"
        steps = "4" if self.smoke else "40"
        common = ["--ds_config", ds, "--train.max_steps", steps, "--train.log_interval", "2" if self.smoke else "10",
                  "--train.eval_interval", steps, "--train.ckpt_interval", steps, "--train.sample_tokens", "8",
                  "--train.seq_len", "64" if self.smoke else "512"]
        out = {}
        for task, init, data, extra in (
                ("sft", self.work / "run", sft_data, ["--data.packing", "true", "--train.max_bad_steps", "2"]),
                ("dpo", self.work / "sft", dpo_data, ["--lora.rank", "8"])):
            run = self.work / task
            shutil.rmtree(run, ignore_errors=True)
            sh([*deepspeed, f"launch/{task}.py", "--config", f"{task}-debug", "--init_from", str(init),
                "--data.source", str(data), "--train.run_dir", str(run), *common, *extra],
               self.out / f"log_{task}.txt", self.left(), env)
            rows = metrics(run)
            losses = [r["train/loss"] for r in rows if "train/loss" in r]
            speed = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r]
            if not losses or not all(map(math.isfinite, losses)):
                raise RuntimeError(f"{task}: train losses {losses}")
            out[task] = {"first_loss": losses[0], "last_loss": losses[-1], "tokens_per_s": speed[-1],
                         "val_loss": [r["val/loss"] for r in rows if "val/loss" in r][-1]}
        log = (self.out / "log_sft.txt").read_text()
        out["sft"]["flex_fallback"] = "flex attention unavailable" in log
        return out

    def cuda_tests(self) -> dict[str, Any]:
        sh([PY, "-m", "pytest", "-q", "-x", "tests/test_model.py", "-k", "cuda", "-p", "no:cacheprovider"],
           self.out / "log_cuda_tests.txt", self.left(300))
        tail = (self.out / "log_cuda_tests.txt").read_text().strip().splitlines()[-1]
        if not self.smoke and "skipped" in tail and "passed" not in tail:
            raise RuntimeError(f"the CUDA tests were skipped on a CUDA machine: {tail}")
        return {"summary": tail}

    def packed(self) -> dict[str, Any]:
        res = self.work / "packed"
        args = (["--device", "cpu", "--seqs", "64", "--batch", "2", "--steps", "1", "--attention", "dense",
                 "flex-eager"] if self.smoke
                else ["--device", "cuda", "--preset", "lil-39m", "--dtype", "bfloat16", "--batch", "8"])
        sh([PY, "benchmarks/packed_attention.py", *args, "--out", str(res)], self.out / "log_packed.txt", self.left())
        return {"results": json.loads(next(res.glob("*.json")).read_text())}

    def lr_rule(self) -> dict[str, Any]:
        """Short lil-39m runs at 0.5x, 1x and 2x the shipped (rule-derived) learning rates: which ends lowest."""
        import yaml

        name = "debug" if self.smoke else "lil-39m-2xa100"
        train = yaml.safe_load((REPO / f"launch/configs/{name}.yaml").read_text())["train"]
        steps = 4 if self.smoke else self.args.rule_steps
        out: dict[str, Any] = {"config": name, "steps": steps, "val_loss": {}}
        for factor in (0.5, 1.0, 2.0):
            run = self.work / f"rule{factor:g}"
            shutil.rmtree(run, ignore_errors=True)
            lrs = [f"--train.{k}={train[k] * factor}" for k in ("lr", "min_lr", "muon_lr") if k in train]
            args = [*self.train_args(run, steps), *lrs, "--train.eval_interval", str(steps), "--train.ckpt_interval",
                    str(10 * steps), "--train.sample_tokens", "0"]
            deepspeed = [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29513"]
            sh([*deepspeed, "launch/pretrain.py", *args], self.out / f"log_rule{factor:g}.txt", self.left(),
               {"DS_ACCELERATOR": "cpu"} if self.smoke else {})
            out["val_loss"][f"{factor:g}x"] = [r["val/loss"] for r in metrics(run) if "val/loss" in r][-1]
        out["best"] = min(out["val_loss"], key=out["val_loss"].get)
        out["prediction_holds"] = out["best"] == "1x"
        return out

    # -- the report ----------------------------------------------------------------------------------
    def markdown(self) -> str:
        s = self.report["steps"]
        env = s.get("environment", {})
        lines = [f"# gpu_check{' (smoke, CPU)' if self.smoke else ''}: {env.get('device', '?')}, torch "
                 f"{env.get('torch', '?')}, DeepSpeed {env.get('deepspeed', '?')}", "",
                 "| step | ok | seconds | result |", "|---|---|---|---|"]
        for name, r in s.items():
            brief = {k: v for k, v in r.items() if k not in ("ok", "seconds", "rows", "results", "compile_notes")}
            lines.append(f"| {name} | {'yes' if r['ok'] else 'NO'} | {r['seconds']} | "
                         f"{json.dumps(brief)[:300].replace('|', '/')} |")
        rows = s.get("kernels", {}).get("rows", [])
        if rows:
            lines += ["", "| mode | micro batch | model | tokens/s | MFU | peak GB |", "|---|---|---|---|---|---|"]
            for r in rows:
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
                mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "-"
                tok = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else r.get("error", "-")
                lines.append(f"| {r['mode']} | {r['batch']} | {r['model']} | {tok} | {mfu} | {mem} |")
        packed = s.get("packed", {}).get("results", {}).get("rows", [])
        if packed:
            lines += ["", "| packed seq | attention | pass | ms | peak MB |", "|---|---|---|---|---|"]
            for r in packed:
                ms = f"{r['ms']:.1f}" if "ms" in r else r.get("error", "-")
                mb = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-"
                lines.append(f"| {r['seq']} | {r['attention']} | {r['kind']} | {ms} | {mb} |")
        return "\n".join(lines) + "\n"

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.step("environment", self.environment)
        self.step("data", self.data)
        if self.report["steps"]["data"]["ok"]:
            self.step("kernels", self.kernels)
            self.step("train", self.train)
            if self.report["steps"]["train"]["ok"]:
                self.step("resume", self.resume)
                self.step("post", self.post)
        self.step("packed", self.packed)
        self.step("cuda", self.cuda_tests)
        if self.report["steps"]["data"]["ok"]:
            self.step("lr_rule", self.lr_rule)
        self.write()
        print("\n" + self.markdown())
        print(f"gpu_check: {'FAILED' if self.failed else 'all steps passed'}; {self.out}/gpu_check.json")
        return 1 if self.failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: check the script itself")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks/results/gpu_check"),
                    help="directory for gpu_check.json, gpu_check.md and the logs (default: $OUT if set)")
    ap.add_argument("--work", default="/tmp/lillm_gpu_check", help="scratch directory: data and runs")
    ap.add_argument("--train_steps", type=int, default=200, help="steps of the DeepSpeed run (resumed at half)")
    ap.add_argument("--micro_batch", type=int, default=32, help="micro batch of the DeepSpeed run (seq 512)")
    ap.add_argument("--kernels_budget_s", type=float, default=150.0, help="time budget of benchmarks/gpu.py")
    ap.add_argument("--resume_tolerance", type=float, default=2e-2,
                    help="largest accepted relative train-loss difference after the resume (GPU kernels are not "
                         "all bit-deterministic; the JSON says whether it was bit-identical)")
    ap.add_argument("--rule_steps", type=int, default=150, help="steps of each lr_rule run (global batch: one micro "
                    "batch of seq 512)")
    ap.add_argument("--deadline_s", type=float, default=540.0,
                    help="start no step after this many seconds (each command is also cut at what is left)")
    args = ap.parse_args()
    if args.train_steps < 4:
        ap.error("--train_steps must be at least 4 (the resume starts at half)")
    if args.smoke:
        args.train_steps = min(args.train_steps, 8)
    sys.exit(Check(args).run())


if __name__ == "__main__":
    main()
