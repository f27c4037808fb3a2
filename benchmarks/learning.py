"""Learning benchmark: does lillm's training path learn as well as the reference recipe, at equal tokens?

    .venv/bin/python benchmarks/learning.py                          # debug + wide, seeds 1 2
    .venv/bin/python benchmarks/learning.py --shapes debug --seeds 1  # one pair

On 2 cores the full run took 70 minutes (other work sharing the cores); one debug pair 13-16 minutes.

Two arms per (shape, seed), the same corpus and token budget:
- lillm: `python launch/pretrain.py` (one rank: the DeepSpeed ZeRO-2 engine, fp32, and lillm's streaming
  loader), with the training section of the shipped `launch/configs/debug.yaml` (lr, warmup, schedule,
  betas, weight decay) and lillm's own initialisation; only the shape and the budget are set here.
- reference: the recipe of the "little language model" project (a nanoGPT-derived loop), written out below
  in plain PyTorch: random-offset windows from the concatenated train tokens, fan-in-scaled init with small
  residual projections, torch AdamW defaults (betas 0.9/0.999, weight decay 0.01 on every parameter),
  clipping 1.0, lr 2e-3 with 30 warmup steps and cosine to 2e-4 at the last step. It trains the same
  `LilLM` module (same architecture, so only the recipe differs; with equal initial weights the project's
  own model and lillm's learn alike: 5.17 vs 5.18 train loss after 80 steps, measured when this was filed).

Both final models are scored by one function: mean cross-entropy over the whole val split (consecutive
windows) and over 64 fixed train windows. Prints a markdown table (mean and spread over seeds) and writes
benchmarks/results/learning-<host>.json. The corpus is the built-in one, prepared as the quickstart does
(data/pydoc, tokenizer vocab 4096); it is made here when missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lillm import LilLM, ModelConfig  # noqa: E402
from lillm.data.loader import ShardSet  # noqa: E402
from lillm.train.schedule import lr_at  # noqa: E402

MICRO_BATCH, GRAD_ACCUM, SEQ_LEN = 8, 4, 256  # 8,192 tokens per optimizer step, one rank
COMMON = dict(vocab_size=4096, max_seq_len=SEQ_LEN, max_batch_size=MICRO_BATCH)
SHAPES = {
    # The quickstart's model (1.3M parameters with vocab 4096).
    "debug": dict(model=dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32), steps=240),
    # 1.5x as wide and as deep (3.2M parameters); half the steps, to fit the CPU budget.
    "wide": dict(model=dict(d_model=192, n_layers=6, n_heads=6, n_kv_heads=3, multiple_of=64), steps=120),
}
REFERENCE = dict(lr=2e-3, min_lr=2e-4, warmup_steps=30, weight_decay=0.01, grad_clip=1.0)


def ensure_data(data_dir: Path) -> None:
    """The quickstart's data: a 4096-token BPE on the built-in corpus, 2% held out by content hash."""
    if (data_dir / "manifest.json").is_file():
        return
    tok_dir = data_dir.with_name(data_dir.name + ".tokenizer")
    cli = [sys.executable, "-m", "lillm.cli"]
    if not (tok_dir / "tokenizer.json").is_file():
        subprocess.run([*cli, "train-tokenizer", "pydoc", str(tok_dir), "--vocab_size", "4096"], check=True, cwd=REPO)
    subprocess.run([*cli, "prepare", "pydoc", str(tok_dir), str(data_dir), "--shard_tokens", "262144",
                    "--val_fraction", "0.02"], check=True, cwd=REPO)


def split_tokens(data_dir: Path, split: str) -> np.ndarray:
    """Every token of a split, shards concatenated in order (documents are already separated by EOS)."""
    shards = ShardSet(data_dir, split)
    return np.concatenate([np.asarray(m, dtype=np.int64) for m in shards.maps()])


@torch.no_grad()
def score(model: nn.Module, tokens: np.ndarray, seq_len: int, max_windows: int | None = None,
          batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over windows of seq_len + 1 tokens at stride seq_len: all of them, or
    `max_windows` spread evenly over the array. The one scoring function of both arms."""
    n = (len(tokens) - 1) // seq_len
    starts = np.arange(n) * seq_len
    if max_windows is not None and max_windows < n:
        starts = starts[np.linspace(0, n - 1, max_windows).astype(np.int64)]
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts[i : i + batch_size]]))
        logits = model(x[:, :-1])
        total += float(F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        count += x[:, 1:].numel()
    return total / count


def reference_init(model: LilLM) -> None:
    """The reference project's init: every Linear and the (tied) embedding ~ N(0, fan_in^-0.5), then the
    two projections that write the residual stream re-drawn at N(0, 0.02 / sqrt(2 * n_layers))."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=module.weight.shape[1] ** -0.5)
        for name, p in model.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * model.config.n_layers))


def reference_run(model_cfg: ModelConfig, train_tokens: np.ndarray, steps: int, seed: int,
                  log_every: int = 40) -> LilLM:
    """The reference training loop (nanoGPT-style), fp32."""
    torch.manual_seed(seed)
    model = LilLM(model_cfg)
    reference_init(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=REFERENCE["lr"], weight_decay=REFERENCE["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(train_tokens)
    t0 = time.perf_counter()
    for step in range(steps):
        lr = lr_at(step, lr=REFERENCE["lr"], min_lr=REFERENCE["min_lr"], warmup_steps=REFERENCE["warmup_steps"],
                   max_steps=steps, schedule="cosine")
        for group in opt.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for _ in range(GRAD_ACCUM):
            ix = torch.randint(len(data) - SEQ_LEN - 1, (MICRO_BATCH,), generator=gen)
            x = torch.stack([data[i : i + SEQ_LEN + 1] for i in ix.tolist()])
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) / GRAD_ACCUM
            loss.backward()
            step_loss += float(loss.detach())
        nn.utils.clip_grad_norm_(model.parameters(), REFERENCE["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0:
            print(f"  reference step {step + 1}/{steps} loss {step_loss:.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return model


def lillm_run(shape: dict, data_dir: Path, steps: int, seed: int, run_dir: Path, threads: int) -> LilLM:
    """lillm's real path: `python launch/pretrain.py` on one rank (DeepSpeed engine + lillm loader), then the
    final checkpoint loaded as any lillm command loads it."""
    from lillm.loading import load_model

    cmd = [sys.executable, "launch/pretrain.py", "--config", "launch/configs/debug.yaml",
           "--ds_config", "ds_configs/zero2_cpu.json", "--data.dir", str(data_dir), "--train.run_dir", str(run_dir),
           "--train.micro_batch_size", str(MICRO_BATCH), "--train.grad_accum", str(GRAD_ACCUM),
           "--train.seq_len", str(SEQ_LEN), "--train.max_steps", str(steps), "--train.seed", str(seed),
           "--train.eval_interval", "0", "--train.sample_tokens", "0", "--train.ckpt_interval", str(steps),
           "--train.log_interval", "40", "--train.tensorboard", "false", "--data.num_workers", "0"]
    for k, v in {**COMMON, **shape["model"]}.items():
        cmd += [f"--model.{k}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("step "):
            print("  lillm " + line, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"lillm run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    model, _ = load_model(run_dir)
    return model


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}


def run_one(shape_name: str, seed: int, arm: str, steps: int, data_dir: Path, threads: int) -> dict:
    """Train one arm and score it."""
    shape = SHAPES[shape_name]
    steps = steps or shape["steps"]
    cfg = ModelConfig(**COMMON, **shape["model"])
    tokens = steps * MICRO_BATCH * GRAD_ACCUM * SEQ_LEN
    print(f"== {shape_name} ({cfg.num_params():,} params), {arm}, seed {seed}, {steps} steps, {tokens:,} tokens",
          flush=True)
    torch.set_num_threads(threads)
    train_tokens, val_tokens = split_tokens(data_dir, "train"), split_tokens(data_dir, "val")
    t0 = time.perf_counter()
    if arm == "reference":
        model = reference_run(cfg, train_tokens, steps, seed)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = lillm_run(shape, data_dir, steps, seed, Path(tmp) / "run", threads)
    row = {"shape": shape_name, "params": cfg.num_params(), "arm": arm, "seed": seed, "steps": steps,
           "tokens": tokens, "val_loss": score(model, val_tokens, SEQ_LEN),
           "train_loss": score(model, train_tokens, SEQ_LEN, max_windows=64), "seconds": time.perf_counter() - t0}
    print(f"   {shape_name} {arm} seed {seed}: val {row['val_loss']:.4f}  train {row['train_loss']:.4f}  "
          f"({row['seconds']:.0f} s)", flush=True)
    return row


def run_parallel(tasks: list[tuple[str, int, str]], args: argparse.Namespace, threads: int) -> list[dict]:
    """Each task in a child process of this script, `args.jobs` at a time."""
    results, running, todo = [], [], list(tasks)
    with tempfile.TemporaryDirectory() as tmp:
        while todo or running:
            while todo and len(running) < args.jobs:
                shape_name, seed, arm = todo.pop(0)
                out = Path(tmp) / f"{shape_name}-{seed}-{arm}.json"
                cmd = [sys.executable, __file__, "--one", f"{shape_name}:{seed}:{arm}", "--row_out", str(out),
                       "--steps", str(args.steps), "--data", args.data, "--threads", str(threads)]
                running.append((subprocess.Popen(cmd), out))
            time.sleep(1)
            for proc, out in list(running):
                if proc.poll() is not None:
                    running.remove((proc, out))
                    if proc.returncode != 0:
                        raise SystemExit(f"a benchmark run failed: {out.stem}")
                    results.append(json.loads(out.read_text()))
    return results


def summarize(results: list[dict], shapes: list[str]) -> tuple[dict, str]:
    """Per shape and arm: val and train loss over seeds; and the markdown table."""
    summary, lines = {}, [
        "| shape | params | tokens | reference val loss | lillm val loss | lillm - ref | train loss ref / lillm |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape_name in shapes:
        rows = [r for r in results if r["shape"] == shape_name]
        s = {arm: {key: spread([r[f"{key}_loss"] for r in rows if r["arm"] == arm]) for key in ("val", "train")}
             for arm in ("reference", "lillm") if any(r["arm"] == arm for r in rows)}
        summary[shape_name] = s
        val = {arm: f"{v['val']['mean']:.3f} ({v['val']['min']:.3f}-{v['val']['max']:.3f})" for arm, v in s.items()}
        train = {arm: f"{v['train']['mean']:.3f}" for arm, v in s.items()}
        delta = f"{s['lillm']['val']['mean'] - s['reference']['val']['mean']:+.3f}" if len(s) == 2 else "-"
        lines.append(f"| {shape_name} | {rows[0]['params'] / 1e6:.1f}M | {rows[0]['tokens'] / 1e6:.2f}M | "
                     f"{val.get('reference', '-')} | {val.get('lillm', '-')} | {delta} | "
                     f"{train.get('reference', '-')} / {train.get('lillm', '-')} |")
    return summary, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="Model shapes to train.")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="Seeds (init and data order) per shape.")
    ap.add_argument("--arms", nargs="+", default=["reference", "lillm"], choices=["reference", "lillm"],
                    help="Which side(s) to run.")
    ap.add_argument("--steps", type=int, default=0, help="Override every shape's optimizer steps (0: its own).")
    ap.add_argument("--data", default=str(REPO / "data/pydoc"), help="Prepared shards (made here when missing).")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="Runs at a time, each in its own process; the cores are shared out among them.")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: cores // jobs).")
    ap.add_argument("--out", default=str(REPO / f"benchmarks/results/learning-{platform.node()}.json"),
                    help="JSON written here.")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "shape:seed:arm", run by --jobs children
    ap.add_argument("--row_out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    data_dir = Path(args.data)
    if args.one:
        shape_name, seed, arm = args.one.split(":")
        row = run_one(shape_name, int(seed), arm, args.steps, data_dir, threads)
        Path(args.row_out).write_text(json.dumps(row))
        return
    ensure_data(data_dir)
    n_train, n_val = (len(split_tokens(data_dir, split)) for split in ("train", "val"))
    print(f"corpus: {n_train:,} train tokens, {n_val:,} val tokens ({(n_val - 1) // SEQ_LEN} val windows); "
          f"{args.jobs} job(s) x {threads} thread(s)", flush=True)
    tasks = [(shape, seed, arm) for shape in args.shapes for seed in args.seeds for arm in args.arms]
    if args.jobs > 1:
        results = run_parallel(tasks, args, threads)
    else:
        results = [run_one(shape, seed, arm, args.steps, data_dir, threads) for shape, seed, arm in tasks]

    summary, table = summarize(results, args.shapes)
    print(f"\nval loss: mean over seeds {args.seeds} (min-max)\n\n{table}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "processor": platform.processor(), "threads": threads,
                               "jobs": args.jobs, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                               "budget": {"micro_batch": MICRO_BATCH, "grad_accum": GRAD_ACCUM, "seq_len": SEQ_LEN},
                               "reference": REFERENCE, "results": results, "summary": summary, "table": table},
                              indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
