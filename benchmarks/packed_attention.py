"""Packed-row attention: the dense (B, 1, T, T) mask through SDPA against flex attention's block mask, side by
side, in one run.

    .venv/bin/python benchmarks/packed_attention.py   # CPU: debug shape, batch 4, seq 512 and 2048 (2.5 min)
    python benchmarks/packed_attention.py --device cuda --preset lil-39m --dtype bfloat16 --batch 8

Each row of the batch is packed with documents of random lengths (16 to seq / 4 tokens) and the last row is
three quarters full, then padding: what `lillm.data.examples.collate` makes of packed SFT rows. For each
sequence length and attention path (`LilLM.packed_attention` 'dense'; 'flex' compiled; 'flex' with
torch.compile switched off, which materialises the scores) the script times a training step (forward,
token cross-entropy, backward) and a forward pass without gradients: the median of --steps timed steps after
2 warm-up steps (which compile). Peak memory is what one step adds above what is held before it (weights,
batch): torch.cuda.max_memory_allocated on CUDA; on Linux CPUs the growth of the resident set's high-water
mark (freed heap handed back to the system and the mark reset first), None elsewhere. A path that cannot
run here (torch has no flex attention backward on CPU) is listed with torch's reason.

Prints a markdown table and writes benchmarks/results/packed-attention-<host>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lillm import LilLM, ModelConfig  # noqa: E402
from lillm.data.examples import Batch, Example, collate, make_row  # noqa: E402
from lillm.model import flex_unavailable  # noqa: E402
from lillm.train.loss import token_loss  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
ATTENTION = {"dense": "dense", "flex-compiled": "flex", "flex-eager": "flex"}  # name -> LilLM.packed_attention


def packed_batch(batch: int, seq: int, vocab_size: int, rng: np.random.Generator) -> Batch:
    """`batch` rows of seq + 1 tokens packed with documents of 16 to seq / 4 tokens; the last row 3/4 full."""
    rows = []
    for b in range(batch):
        fill = seq + 1 if b < batch - 1 else 3 * seq // 4
        lengths = []
        while sum(lengths) < fill:
            lengths.append(int(rng.integers(16, seq // 4 + 1)))
        lengths[-1] -= sum(lengths) - fill  # the last document is cut to end the row
        rows.append(make_row([Example(rng.integers(0, vocab_size, n), np.ones(n, dtype=bool)) for n in lengths]))
    return collate(rows, pad_id=0, packed=True)


def status_kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def peak_mb(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory, MB, that one call of `step` adds above what is held before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system: the resident set is what is held
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux 4.0+)
    except OSError:
        return None
    before = status_kb("VmRSS")
    step()
    return (status_kb("VmHWM") - before) / 1024


def measure(model: LilLM, batch: Batch, train: bool, steps: int, device: torch.device) -> dict:
    def step() -> None:
        if train:
            logits = model(batch.inputs, positions=batch.positions, documents=batch.documents)
            token_loss(logits, batch.targets, batch.num_targets).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(batch.inputs, positions=batch.positions, documents=batch.documents)
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    for _ in range(2):  # warm-up (and compilation)
        step()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    ms = sorted(1000 * t for t in times)
    return {"ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "warmup_s": warmup_s,
            "peak_mb": peak_mb(step, device)}


def run_row(model: LilLM, batch: Batch, attention: str, train: bool, steps: int, device: torch.device,
            dtype: torch.dtype) -> dict:
    model.packed_attention = ATTENTION[attention]
    stance = "force_eager" if attention == "flex-eager" else "default"
    if attention != "dense":
        c = model.config
        with torch.compiler.set_stance(stance), torch.set_grad_enabled(train):
            reason = flex_unavailable(device.type, dtype, c.n_heads, c.n_kv_heads, c.head_dim, train)
        if reason:
            return {"error": reason}
    try:
        with torch.compiler.set_stance(stance):
            return measure(model, batch, train, steps, device)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda or cuda:N (default: cuda when present)")
    ap.add_argument("--preset", default="debug", help="model preset (its max_seq_len is raised to the longest --seqs)")
    ap.add_argument("--batch", type=int, default=4, help="packed rows per batch")
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 2048], help="sequence lengths (tokens per row)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter and compute dtype")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after 2 warm-up steps)")
    ap.add_argument("--attention", nargs="+", default=list(ATTENTION), choices=list(ATTENTION),
                    help="attention paths to compare")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results"), help="directory for the JSON results")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    model = LilLM(ModelConfig.from_preset(args.preset, max_seq_len=max(args.seqs)))
    model.init_weights()
    model.to(device, dtype).train()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    results = {"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__, "preset": args.preset,
               "batch": args.batch, "dtype": args.dtype, "rows": []}
    batches = {seq: packed_batch(args.batch, seq, model.config.vocab_size, np.random.default_rng(seq)).to(device)
               for seq in args.seqs}
    # Every forward pass first: once dynamo has traced torch's refusal of a flex attention backward on CPU
    # (which the training rows' probe provokes there), it runs flex_attention eagerly for good.
    for kind in ("forward", "train"):
        for seq in args.seqs:
            for attention in args.attention:
                row = {"seq": seq, "attention": attention, "kind": kind,
                       **run_row(model, batches[seq], attention, kind == "train", args.steps, device, dtype)}
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"packed-attention-{platform.node()}.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{name} ({results['threads']} threads), {args.preset}, {args.dtype}, batch {args.batch}, "
          f"torch {torch.__version__}\n")
    print("| seq | attention | train step ms (min-max) | train peak MB | forward ms (min-max) | forward peak MB |")
    print("|---|---|---|---|---|---|")
    rows = {(r["seq"], r["attention"], r["kind"]): r for r in results["rows"]}
    for seq in args.seqs:
        for attention in args.attention:
            cells = []
            for kind in ("train", "forward"):
                r = rows[seq, attention, kind]
                if "error" in r:
                    cells += ["unsupported", "-"]
                else:
                    peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:,.0f}"
                    cells += [f"{r['ms']:,.1f} ({r['min_ms']:,.1f}-{r['max_ms']:,.1f})", peak]
            print(f"| {seq} | {attention} | " + " | ".join(cells) + " |")
    errors = sorted({f"{r['attention']} {r['kind']}: {r['error']}" for r in results["rows"] if "error" in r})
    if errors:
        print("\nunsupported here:\n" + "\n".join(f"- {e}" for e in errors))


if __name__ == "__main__":
    main()
