"""GPU training-step benchmark: lillm against transformers' LlamaForCausalLM, side by side, in one run.

    python benchmarks/gpu.py                       # lil-39m, bf16, micro batches 16/32/64, eager and compiled
    python benchmarks/gpu.py --device cpu --preset debug --batches 2 --seq 64 --dtype float32 --steps 2  # smoke

For each model, micro batch and mode (eager, torch.compile): forward + backward + fused AdamW step on
sequences of --seq tokens, the same weights in both models (lillm's export), SDPA attention in both.
Both run with parameters in the compute dtype (pure bf16, like a DeepSpeed bf16 engine's module; the
optimizer here is torch's fused AdamW on those parameters). Reported: tokens/s (median of --steps timed
steps after warm-up), MFU and peak memory.

MFU = tokens/s x FLOPs per token / peak FLOP/s. FLOPs per token = 6 x (matmul parameters, the output
projection included, embedding lookups and norm weights excluded) + 12 x layers x d_model x seq
(attention scores and values, forward and backward; causal masking ignored). `ModelConfig.flops_per_token`.
Peak: dense bf16 of the detected GPU (A100 312, H100/H200 989 TFLOP/s) or --peak_tflops.

The whole run stays under --budget_s (default 280 s): configurations that would start after it are
listed as skipped, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lillm import LilLM, ModelConfig  # noqa: E402
from lillm.hf import export_hf  # noqa: E402
from lillm.train.metrics import detect_peak_tflops  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def build(preset: str, dtype: torch.dtype, device: torch.device, which: str) -> torch.nn.Module:
    torch.manual_seed(0)
    ours = LilLM(ModelConfig.from_preset(preset))
    ours.init_weights()
    if which == "lillm":
        return ours.to(device, dtype)
    import transformers

    with tempfile.TemporaryDirectory() as d:
        export_hf(ours, d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa")
    return theirs.to(device)


def train_step(model: torch.nn.Module, x: torch.Tensor, compiled: bool) -> Callable[[], None]:
    """One forward + backward + fused AdamW step of `model` (lillm or transformers) on tokens x (B, T+1)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.device.type in ("cuda", "cpu"))
    fwd = torch.compile(model) if compiled else model

    def step() -> None:
        out = fwd(x[:, :-1])
        logits = out if torch.is_tensor(out) else out.logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(which: str, preset: str, batch: int, seq: int, compiled: bool, dtype: torch.dtype,
            device: torch.device, steps: int, peak_tflops: float) -> dict:
    model = build(preset, dtype, device, which)
    x = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=device)
    step = train_step(model, x, compiled)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    sync(device)
    warmup_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    rates = sorted(batch * seq / s for s in times)
    tok_s = statistics.median(rates)
    flops = ModelConfig.from_preset(preset).flops_per_token(seq)
    out = {"tokens_per_s": tok_s, "min": rates[0], "max": rates[-1], "warmup_s": warmup_s,
           "mfu": tok_s * flops / (peak_tflops * 1e12) if peak_tflops else None,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lil-39m", help="model preset")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64], help="micro batch sizes")
    ap.add_argument("--seq", type=int, default=512, help="sequence length")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="parameter and compute dtype")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration (after 3 warm-up steps)")
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"],
                    help="eager and/or torch.compile")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: a smoke test of this script)")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="peak TFLOP/s for MFU; 0 detects the GPU")
    ap.add_argument("--budget_s", type=float, default=280.0, help="start no configuration after this many seconds")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results"), help="directory for the JSON results")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu.py: error: no CUDA device (use --device cpu for a smoke test)")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = detect_peak_tflops(args.peak_tflops) if device.type == "cuda" else args.peak_tflops
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    results = {"device": name, "torch": torch.__version__, "preset": args.preset, "seq": args.seq,
               "dtype": args.dtype, "peak_tflops": peak, "rows": [], "skipped": []}
    start = time.perf_counter()
    for mode in args.modes:
        for batch in args.batches:
            for which in ("lillm", "transformers"):
                cfg = {"model": which, "batch": batch, "mode": mode}
                if time.perf_counter() - start > args.budget_s:
                    results["skipped"].append(cfg)
                    continue
                try:
                    r = measure(which, args.preset, batch, args.seq, mode == "compile", dtype, device, args.steps,
                                peak)
                except torch.OutOfMemoryError:
                    r = {"error": "out of memory"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the finished configuration's model and optimizer are gone
                results["rows"].append({**cfg, **r})
                print(json.dumps(results["rows"][-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-{platform.node()}.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{name}, {args.preset}, {args.dtype}, seq {args.seq}, torch {torch.__version__}\n")
    print("| mode | micro batch | lillm tok/s | lillm MFU | lillm peak GB | transformers tok/s | transformers MFU "
          "| transformers peak GB | lillm / transformers |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = {(r["mode"], r["batch"], r["model"]): r for r in results["rows"]}
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for mode in args.modes:
        for batch in args.batches:
            a, b = rows.get((mode, batch, "lillm"), {}), rows.get((mode, batch, "transformers"), {})
            ratio = (a["tokens_per_s"] / b["tokens_per_s"]) if "tokens_per_s" in a and "tokens_per_s" in b else None
            cells = [fmt(a.get("tokens_per_s"), ",.0f"), fmt(a.get("mfu"), ".1%"), fmt(a.get("peak_mem_gb"), ".1f"),
                     fmt(b.get("tokens_per_s"), ",.0f"), fmt(b.get("mfu"), ".1%"), fmt(b.get("peak_mem_gb"), ".1f")]
            print(f"| {mode} | {batch} | " + " | ".join(cells) + f" | {fmt(ratio, '.2f')}x |")
    if results["skipped"]:
        print(f"\nskipped (over the {args.budget_s:.0f} s budget): {results['skipped']}")


if __name__ == "__main__":
    main()
