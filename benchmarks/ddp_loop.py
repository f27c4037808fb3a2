"""The peer of `launch/pretrain.py` on several ranks: a plain PyTorch DistributedDataParallel loop.

    torchrun --nproc_per_node 2 benchmarks/ddp_loop.py --steps 80 --interval 20 --out ddp.json

Same model (debug preset, vocab 4096), micro batch 8 x 256 tokens per rank, torch AdamW (fused), gradient
clipping at 1.0, gloo on CPU / NCCL on GPU. Rank 0 writes global tokens/s per interval.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lillm import LilLM, ModelConfig  # noqa: E402
from lillm.train.engine import param_groups  # noqa: E402
from lillm.train.loss import token_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80, help="optimizer steps")
    ap.add_argument("--interval", type=int, default=20, help="steps per timed interval")
    ap.add_argument("--out", required=True, help="JSON file for the per-interval tokens/s (rank 0)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = LilLM(ModelConfig.from_preset("debug", vocab_size=4096))
    model.init_weights()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(rank)
    rates, t0 = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        x = torch.randint(0, 300, (8, 257), generator=gen)
        loss = token_loss(ddp(x[:, :-1]), x[:, 1:], x[:, 1:].numel())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.interval == 0:
            dist.barrier()
            rates.append(args.interval * 8 * 256 * world / (time.perf_counter() - t0))
            t0 = time.perf_counter()
    if rank == 0:
        Path(args.out).write_text(json.dumps({"tokens_per_s": rates}) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
