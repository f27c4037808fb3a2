"""ZeRO-2 memory per rank, measured: optimizer state and gradient bytes held by each rank after a real step.

    deepspeed --num_gpus N benchmarks/zero_memory.py --preset lil-39m --out result.json

Builds the model, registers it with DeepSpeed (ZeRO-2, fp32: ds_configs/zero2_cpu.json, or --ds_config),
runs one forward/backward/step, and counts the bytes of the tensors each rank actually holds:
  - optimizer state: every tensor in the wrapped optimizer's state (Adam's exp_avg and exp_avg_sq) plus the
    fp32 master partition ZeRO keeps for it;
  - gradients: the reduced gradient partition this rank owns (read between backward and step).
The replicated (DDP) equivalent is measured the same way on one process: torch AdamW over the whole model
after one step, and every parameter's .grad. `benchmarks/run.py --only memory` launches this at 1 and 2 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lillm import LilLM, ModelConfig  # noqa: E402


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(nbytes(s.values()) for s in optimizer.state.values())


def replicated(preset: str) -> dict:
    """What every DDP rank holds: the full AdamW state and the full gradient."""
    torch.manual_seed(0)
    model = LilLM(ModelConfig.from_preset(preset))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (1, 33))
    model(x[:, :-1]).float().logsumexp(-1).mean().backward()
    grads = nbytes(p.grad for p in model.parameters())
    opt.step()
    return {"params": model.num_params(), "optimizer_state_bytes": state_bytes(opt), "gradient_bytes": grads}


def zero(preset: str, ds_config: str) -> dict:
    import deepspeed

    from lillm.train.config import TrainConfig, plan_batches
    from lillm.train.dist import init_distributed
    from lillm.train.ds_config import fill_ds_config, load_ds_config
    from lillm.train.engine import initialize_engine, param_groups

    rank, world, _ = init_distributed()
    train = TrainConfig(micro_batch_size=1, max_steps=1, warmup_steps=0)
    plan = plan_batches(train, 32, world)
    cfg = fill_ds_config(load_ds_config(ds_config), train, plan, ds_config)
    torch.manual_seed(0)
    model = LilLM(ModelConfig.from_preset(preset))
    model.init_weights()
    engine, optimizer = initialize_engine(model, cfg, param_groups(model, 0.1), torch.device("cpu"), ds_config)
    zopt = engine.optimizer
    x = torch.randint(0, model.config.vocab_size, (1, 33))
    engine.backward(engine(x[:, :-1]).float().logsumexp(-1).mean())
    grads = sum(nbytes(g) for g in zopt.averaged_gradients.values() if g is not None) if isinstance(
        zopt.averaged_gradients, dict) else sum(nbytes(g or []) for g in zopt.averaged_gradients)
    engine.step()
    master = nbytes(zopt.single_partition_of_fp32_groups)
    out = {"world_size": world, "rank": rank, "optimizer_state_bytes": state_bytes(optimizer) + master,
           "adam_state_bytes": state_bytes(optimizer), "fp32_master_bytes": master, "gradient_bytes": grads,
           "reduce_bucket_bytes": int(cfg.get("zero_optimization", {}).get("reduce_bucket_size", 0)) * 4}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, out)
    deepspeed.comm.destroy_process_group() if hasattr(deepspeed.comm, "destroy_process_group") else None
    return {"per_rank": gathered}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lil-39m", help="model preset")
    ap.add_argument("--ds_config", default=str(REPO / "ds_configs/zero2_cpu.json"), help="DeepSpeed JSON")
    ap.add_argument("--replicated", action="store_true", help="measure the replicated (DDP) equivalent instead")
    ap.add_argument("--out", required=True, help="JSON file to write (rank 0)")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = ap.parse_args()
    result = replicated(args.preset) if args.replicated else zero(args.preset, args.ds_config)
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
