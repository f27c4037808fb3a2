"""Side-by-side benchmarks: lillm against its peer, same machine, same shapes, same weights, one run.

    .venv/bin/python benchmarks/run.py                 # everything (about 10 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/run.py --only train decode

Prints a markdown table and writes benchmarks/results/<host>.json. Each figure is the median of several
repeats, with the spread (min-max) beside it: these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lillm import LilLM, ModelConfig  # noqa: E402
from lillm.generate import SamplingConfig, generate  # noqa: E402
from lillm.hf import export_hf  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from gpu import train_step  # noqa: E402  (the same step on CPU and GPU)


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def summary(per_unit: float, times: list[float]) -> dict:
    """Throughput (units/s) as median and spread over repeats."""
    rates = sorted(per_unit / t for t in times)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "n": len(rates)}


def models(preset: str, dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    ours = LilLM(ModelConfig.from_preset(preset))
    ours.init_weights()
    d = tempfile.mkdtemp()
    export_hf(ours, d)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    return ours.to(dtype), theirs.to(dtype)


def bench_train(preset: str, dtype: torch.dtype, compile_: bool, batch: int, seq: int, repeats: int) -> dict:
    """Forward + backward + AdamW step, tokens/s."""
    ours, theirs = models(preset, dtype)
    x = torch.randint(0, ours.config.vocab_size, (batch, seq + 1))
    results = {}
    for name, model in (("lillm", ours), ("transformers", theirs)):
        step = train_step(model, x, compile_)
        results[name] = summary(batch * seq, timed(step, repeats, warmup=2 if compile_ else 1))
    return results


def bench_decode(preset: str, batch: int, prompt: int, new: int, repeats: int) -> dict:
    """Greedy cached decoding, new tokens/s (prefill included)."""
    ours, theirs = models(preset, torch.float32)
    ours.eval()
    theirs.eval()
    ids = torch.randint(10, ours.config.vocab_size, (batch, prompt))
    cfg = SamplingConfig(max_new_tokens=new, temperature=0)
    mask = torch.ones_like(ids)

    def run_ours():
        out = generate(ours, ids.tolist(), cfg)
        assert all(len(o) == new for o in out)

    def run_theirs():
        with torch.inference_mode():
            out = theirs.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  pad_token_id=0)
        assert out.shape[1] == prompt + new

    return {"lillm": summary(batch * new, timed(run_ours, repeats)),
            "transformers": summary(batch * new, timed(run_theirs, repeats))}


def bench_prepare(repeats: int) -> dict:
    """lillm prepare (batched, worker processes) against per-document datasets.map, same corpus, MB/s."""
    import datasets

    from lillm.data.prepare import prepare
    from lillm.data.sources import _builtin_corpus, open_source
    from lillm.tokenizer import load_tokenizer, train_tokenizer

    work = Path(tempfile.mkdtemp())
    docs = list(_builtin_corpus())
    corpus = work / "corpus.jsonl"
    with open(corpus, "w") as fh:
        for _ in range(8):  # ~16 MB: enough that process start-up does not dominate either side
            for d in docs:
                fh.write(json.dumps({"text": d}) + "\n")
    size = sum(len(d.encode()) for d in docs) * 8
    train_tokenizer(docs, vocab_size=8192, progress=False).save(work / "tok")
    tok = load_tokenizer(work / "tok")
    workers = os.cpu_count() or 1

    def ours():
        prepare(open_source(str(corpus)), work / "tok", work / f"out{time.time_ns()}", progress=False)

    def reference(num_proc):
        # The reference's approach: a datasets.map that calls encode once per document.
        ds = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(work / "cache"))
        ds.map(lambda ex: {"ids": tok.tok.encode(ex["text"]).ids + [tok.eos_id]}, remove_columns=["text"],
               num_proc=num_proc, load_from_cache_file=False, desc=None)

    datasets.disable_progress_bars()
    return {"lillm": summary(size / 1e6, timed(ours, repeats, warmup=0)),
            "datasets.map per document": summary(size / 1e6, timed(lambda: reference(None), repeats, warmup=0)),
            f"datasets.map per document, num_proc={workers}": summary(
                size / 1e6, timed(lambda: reference(workers), repeats, warmup=0)),
            "corpus_mb": size / 1e6}


def bench_loader(batch: int, seq: int, batches: int, repeats: int) -> dict:
    """Tokens/s the pretraining loader serves on one rank (shuffled windows, one worker)."""
    import numpy as np

    from lillm.data.loader import PretrainLoader, ShardSet
    from lillm.data.prepare import ShardWriter
    from lillm.files import write_json_atomic

    work = Path(tempfile.mkdtemp())
    w = ShardWriter(work, "train", "0000beef", 1 << 24, np.dtype(np.uint16), eos_id=0)
    w.add(np.random.default_rng(0).integers(0, 8192, 40_000_000, dtype=np.uint16))
    w.flush()
    manifest = {"format_version": 1, "dtype": "uint16", "splits": {"train": w.summary()},
                "tokenizer": {"fingerprint": "bench", "vocab_size": 8192}}
    write_json_atomic(work / "manifest.json", manifest)
    loader = PretrainLoader(ShardSet(work), seq, batch, rank=0, world_size=2, num_workers=1)

    def run():
        for i, _ in enumerate(loader):
            if i + 1 == batches:
                break

    return {"lillm": summary(batch * seq * batches, timed(run, repeats))}


def _tiny_shards(work: Path) -> Path:
    """Random-token shards (4M tokens) with a manifest, enough for timing a training loop."""
    import numpy as np

    from lillm.data.prepare import ShardWriter
    from lillm.files import write_json_atomic
    from lillm.tokenizer import train_tokenizer

    data = work / "data"
    data.mkdir()
    tok = train_tokenizer(["a b c d e f g"] * 10, vocab_size=300, progress=False)
    tok.save(data / "tokenizer")
    w = ShardWriter(data, "train", "0000cafe", 1 << 22, np.dtype(np.uint16), eos_id=tok.eos_id)
    w.add(np.random.default_rng(0).integers(0, 300, 4_000_000, dtype=np.uint16))
    w.flush()
    manifest = {"format_version": 1, "dtype": "uint16", "splits": {"train": w.summary(), "val": w.summary()},
                "tokenizer": {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size}}
    write_json_atomic(data / "manifest.json", manifest)
    return data


def _pretrain_rates(data: Path, run_dir: Path, steps: int, interval: int, ranks: int, env: dict) -> list[float]:
    """tokens/s per logging interval of a real `launch/pretrain.py` run (the first interval warms up)."""
    args = ["launch/pretrain.py", "--config", "launch/configs/debug.yaml", "--ds_config", "ds_configs/zero2_cpu.json",
            "--data.dir", str(data), "--train.run_dir", str(run_dir), "--train.max_steps", str(steps),
            "--train.grad_accum", "1", "--train.log_interval", str(interval), "--train.eval_interval", "0",
            "--train.ckpt_interval", str(10 * steps), "--train.tensorboard", "false"]
    launcher = [sys.executable] if ranks == 1 else [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus",
                                                    str(ranks), "--master_port", "29911"]
    subprocess.run([*launcher, *args], cwd=REPO, check=True, capture_output=True, env=env)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r][1:]


def _spread(rates: list[float]) -> dict:
    rates = sorted(rates)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "n": len(rates)}


def bench_deepspeed_overhead(steps: int) -> dict:
    """launch/pretrain.py on 1 rank (ZeRO-2, fp32) against the same training step in a plain loop."""
    from lillm.train.engine import param_groups
    from lillm.train.loss import token_loss

    work = Path(tempfile.mkdtemp())
    interval = max(1, steps // 4)
    ds_rates = _pretrain_rates(_tiny_shards(work), work / "run", steps, interval, 1,
                               {**os.environ, "DS_ACCELERATOR": "cpu"})
    torch.manual_seed(0)
    model = LilLM(ModelConfig.from_preset("debug", vocab_size=4096))
    model.init_weights()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, fused=True)
    x = torch.randint(0, 300, (8, 257))

    def plain_step():
        loss = token_loss(model(x[:, :-1]), x[:, 1:], x[:, 1:].numel())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    plain = timed(lambda: [plain_step() for _ in range(interval)], max(1, len(ds_rates)))
    return {"lillm": _spread(ds_rates), "plain PyTorch loop": summary(8 * 256 * interval, plain)}


def bench_deepspeed_two_ranks(steps: int) -> dict:
    """launch/pretrain.py through `deepspeed --num_gpus 2` against a torch DDP loop under torchrun, 2 CPU ranks
    with one thread each, the same per-rank micro batch."""
    work = Path(tempfile.mkdtemp())
    interval = max(1, steps // 5)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    ds_rates = _pretrain_rates(_tiny_shards(work), work / "run", steps, interval, 2, env)
    out = work / "ddp.json"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29912", "benchmarks/ddp_loop.py", "--steps",
                    str(steps), "--interval", str(interval), "--out", str(out)], cwd=REPO, check=True,
                   capture_output=True, env=env)
    ddp_rates = json.loads(out.read_text())["tokens_per_s"][1:]
    return {"lillm": _spread(ds_rates), "torch DDP loop (torchrun, gloo)": _spread(ddp_rates)}


def bench_memory(preset: str) -> dict:
    """ZeRO-2 optimizer-state and gradient bytes per rank at world sizes 1 and 2, and the replicated figures."""
    work = Path(tempfile.mkdtemp())
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    script = ["benchmarks/zero_memory.py", "--preset", preset]
    subprocess.run([sys.executable, *script, "--replicated", "--out", str(work / "ddp.json")], cwd=REPO, check=True,
                   capture_output=True, env=env)
    out = {"replicated (DDP)": json.loads((work / "ddp.json").read_text())}
    ds = str(Path(sys.executable).parent / "deepspeed")
    for world in (1, 2):
        f = work / f"zero{world}.json"
        subprocess.run([ds, "--num_gpus", str(world), "--master_port", "29913", *script, "--out", str(f)], cwd=REPO,
                       check=True, capture_output=True, env=env)
        out[f"ZeRO-2 world {world}"] = json.loads(f.read_text())["per_rank"][0]
    return out


def table(results: dict) -> str:
    lines = ["| benchmark | lillm | peer | peer name | lillm / peer |", "|---|---|---|---|---|"]
    for name, r in results.items():
        if not isinstance(r, dict) or "lillm" not in r:
            continue
        ours = r["lillm"]
        peers = [(k, v) for k, v in r.items() if k != "lillm" and isinstance(v, dict)]
        fmt = lambda s: f"{s['median']:,.1f} ({s['min']:,.1f}-{s['max']:,.1f})"
        if peers:
            pname, peer = peers[0]
            lines.append(f"| {name} | {fmt(ours)} | {fmt(peer)} | {pname} | {ours['median'] / peer['median']:.2f}x |")
        else:
            lines.append(f"| {name} | {fmt(ours)} | | | |")
    return "\n".join(lines)


def memory_table(mem: dict) -> str:
    mb = lambda b: f"{b / 1e6:,.1f}"  # noqa: E731
    lines = ["| lil-39m, fp32, per rank | optimizer state MB | gradients MB |", "|---|---|---|"]
    for name, r in mem.items():
        extra = f" (Adam {mb(r['adam_state_bytes'])} + fp32 master {mb(r['fp32_master_bytes'])})" if (
            "adam_state_bytes" in r) else ""
        lines.append(f"| {name} | {mb(r['optimizer_state_bytes'])}{extra} | {mb(r['gradient_bytes'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["train", "decode", "prepare", "loader", "deepspeed", "memory"],
                    help="which benchmarks to run: train decode prepare loader deepspeed memory")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    ap.add_argument("--bf16", action="store_true", help="also time bf16 training (very slow on CPUs without AMX)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd training steps")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results"), help="directory for the JSON results")
    args = ap.parse_args()
    torch.manual_seed(0)
    results: dict = {"machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                                 "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    if "train" in args.only:
        for preset, batch, seq in (("debug", 8, 256), ("lil-39m", 4, 512)):
            variants = [(torch.float32, False)] + ([(torch.bfloat16, False)] if args.bf16 else [])
            variants += [(torch.float32, True)] if args.compile else []
            for dtype, comp in variants:
                name = f"train step {preset} B{batch}xT{seq} {str(dtype)[6:]}{' compile' if comp else ''} (tok/s)"
                results[name] = bench_train(preset, dtype, comp, batch, seq, args.repeats)
                print(name, json.dumps(results[name]), flush=True)
    if "decode" in args.only:
        for batch in (1, 8):
            name = f"cached greedy decode lil-39m batch {batch}, 64 new tokens (tok/s)"
            results[name] = bench_decode("lil-39m", batch, 32, 64, args.repeats)
            print(name, json.dumps(results[name]), flush=True)
    if "prepare" in args.only:
        name = "prepare built-in corpus x8 (MB/s)"
        results[name] = bench_prepare(max(2, args.repeats // 2))
        print(name, json.dumps(results[name]), flush=True)
    if "loader" in args.only:
        name = "loader B32xT512 shuffled (tok/s)"
        results[name] = bench_loader(32, 512, 50, args.repeats)
        print(name, json.dumps(results[name]), flush=True)
    if "deepspeed" in args.only:
        name = "pretrain.py (DeepSpeed ZeRO-2, 1 rank, fp32) debug B8xT256 (tok/s)"
        results[name] = bench_deepspeed_overhead(80)
        print(name, json.dumps(results[name]), flush=True)
        name = "pretrain.py (DeepSpeed ZeRO-2, 2 CPU ranks x 1 thread, fp32) debug B8xT256 per rank (tok/s)"
        results[name] = bench_deepspeed_two_ranks(100)
        print(name, json.dumps(results[name]), flush=True)
    if "memory" in args.only:
        mem = bench_memory("lil-39m")
        results["memory lil-39m fp32 (bytes per rank)"] = mem
        print("memory", json.dumps(mem), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{platform.node()}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**previous, **results}, indent=2) + "\n")  # --only updates its rows
    print()
    print(table(results))
    if "memory lil-39m fp32 (bytes per rank)" in results:
        print()
        print(memory_table(results["memory lil-39m fp32 (bytes per rank)"]))


if __name__ == "__main__":
    main()
