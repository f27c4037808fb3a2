"""What durable checkpoints cost: lillm's `Checkpoint.save` of a real ZeRO-2 engine, with and without fsync.

    .venv/bin/python benchmarks/checkpoint_save.py                      # lil-39m, 3 saves per arm
    .venv/bin/python benchmarks/checkpoint_save.py --preset debug --repeats 2

One process, DeepSpeed's engine over the preset's model with AdamW (fp32, ds_configs/zero2_cpu.json), one
step so the optimizer holds its state, then saves into a temporary run directory, alternating the two arms:
  - durable: lillm as shipped (every file of the tag, its directory and `latest` fsynced, in order);
  - unsynced: the same save with `os.fsync` made a no-op, i.e. the data left in the page cache.
Each save goes to a new tag (`keep_checkpoints` 1 prunes the previous), so both arms write the same bytes.
Prints a markdown table and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lillm import LilLM, ModelConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lil-39m", help="model preset")
    ap.add_argument("--repeats", type=int, default=3, help="saves per arm")
    ap.add_argument("--dir", default=None, help="where the run directory goes (default: the system's temp)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()

    from lillm.train.checkpoint import Checkpoint, RunIdentity
    from lillm.train.config import TrainConfig, plan_batches
    from lillm.train.dist import init_distributed
    from lillm.train.ds_config import fill_ds_config, load_ds_config
    from lillm.train.engine import initialize_engine, param_groups

    init_distributed()
    ds_path = str(REPO / "ds_configs/zero2_cpu.json")
    train = TrainConfig(micro_batch_size=1, max_steps=1, warmup_steps=0, optimizer="adamw")
    cfg = fill_ds_config(load_ds_config(ds_path), train, plan_batches(train, 32, 1), ds_path)
    torch.manual_seed(0)
    model = LilLM(ModelConfig.from_preset(args.preset))
    model.init_weights()
    engine, _ = initialize_engine(model, cfg, param_groups(model, 0.1), torch.device("cpu"), ds_path)
    x = torch.randint(0, model.config.vocab_size, (1, 33))
    engine.backward(engine(x[:, :-1]).float().logsumexp(-1).mean())
    engine.step()

    real_fsync = os.fsync
    times: dict[str, list[float]] = {"durable": [], "unsynced": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as run_dir:
        ck = Checkpoint(run_dir, RunIdentity("pretrain", model.config.to_dict(), "x", {}), "a: 1\n", keep=1,
                        rank=0, world_size=1, engine=engine)
        step, size = 0, 0
        for _ in range(args.repeats):
            for arm in ("unsynced", "durable"):
                step += 1
                os.sync()  # start each save with nothing of the last one waiting to be written
                with mock.patch.object(os, "fsync", real_fsync if arm == "durable" else (lambda fd: None)):
                    t = time.perf_counter()
                    tag = ck.save(step)
                    times[arm].append(time.perf_counter() - t)
                size = sum(f.stat().st_size for f in tag.iterdir())
    result = {"preset": args.preset, "params": model.num_params(), "tag_bytes": size, "dir": args.dir or
              tempfile.gettempdir(), "load": os.getloadavg()[0],
              **{arm: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "n": len(t)}
                 for arm, t in times.items()}}
    print(f"| {args.preset}: {size / 2**20:,.0f} MiB per tag | median s | min-max s |\n|---|---|---|")
    for arm in ("unsynced", "durable"):
        r = result[arm]
        print(f"| {arm} | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} |")
    print(f"(load {result['load']:.1f}; {result['dir']})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
