"""Resuming a Muon run's ZeRO-2 checkpoint on another number of ranks.

DeepSpeed's universal format (`ds_to_universal`) knows AdamW's moments only: it stops at Muon's momentum
(`KeyError: 'exp_avg'`), and its loader would not place it. lillm therefore re-partitions a Muon checkpoint
itself, in two steps:

1. `full_states(tag_dir)` reads every rank's shard and puts each parameter back together: its fp32 master
   weights, and AdamW's moments and step (the embedding, norms) or Muon's momentum (the blocks' matrices).
   ZeRO-2 cuts each parameter group's flat fp32 copy into one contiguous partition per rank
   (`param_slice_mappings` says where each parameter's piece sits), so a parameter is its pieces in rank
   order. Muon's momentum is kept differently: each rank holds the whole momentum of every matrix its
   partition touches (Newton-Schulz needs whole matrices), concatenated in the partition's order.
2. `load_full_states(optimizer, module, states)` writes them into a freshly built engine at the new world
   size, through the same fragment addresses DeepSpeed's own universal loader uses (`_hp_mapping`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lillm.errors import UserError

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def shard_files(tag_dir: Path) -> list[Path]:
    """Every rank's optimizer shard of a tag, in rank order."""
    found = {int(m.group(1)): f for f in tag_dir.iterdir() if (m := OPTIM_RE.search(f.name))}
    if not found or sorted(found) != list(range(len(found))):
        raise UserError(f"{tag_dir}: the ZeRO shards of ranks {sorted(found)} do not make a whole checkpoint")
    return [found[r] for r in range(len(found))]


def full_states(tag_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{parameter name: {"fp32", and "exp_avg", "exp_avg_sq", "step" or "momentum"}}, whole tensors shaped like
    the parameter, from the ZeRO-2 shards of `tag_dir`."""
    shapes = torch.load(tag_dir / MODEL_STATES, map_location="cpu", weights_only=False)["param_shapes"]
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for file in shard_files(tag_dir):
        osd = torch.load(file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        if not isinstance(osd.get("base_optimizer_state"), dict):
            raise UserError(f"{file}: an elastic ZeRO checkpoint; lillm re-partitions the rigid layout only "
                            "(zero_optimization.elastic_checkpoint false)")
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            flat = osd["single_partition_of_fp32_groups"][g]
            state = osd["base_optimizer_state"]["state"].get(g, {})
            moments = [k for k in ("exp_avg", "exp_avg_sq") if k in state]
            for name, fragment in mapping.items():
                parts = pieces.setdefault(name, {})
                for key, source in (("fp32", flat), *((k, state[k]) for k in moments)):
                    parts.setdefault(key, []).append(source.narrow(0, fragment.start, fragment.numel))
                if "step" in state:
                    states.setdefault(name, {})["step"] = state["step"]
            if "momentum_buffer" in state:
                buffer, offset = state["momentum_buffer"], 0
                for name in sorted(mapping, key=lambda n: mapping[n].start):  # the partition's order
                    n = shapes[g][name].numel()
                    states.setdefault(name, {})["momentum"] = buffer.narrow(0, offset, n).view(shapes[g][name])
                    offset += n
                if offset != buffer.numel():
                    raise UserError(f"{file}: Muon momentum of {buffer.numel()} values for matrices of {offset}")
    for group in shapes:
        for name, shape in group.items():
            for key, parts in pieces[name].items():
                states.setdefault(name, {})[key] = torch.cat(parts).view(shape)
    return states


@torch.no_grad()
def load_full_states(optimizer: Any, module: torch.nn.Module, states: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write whole per-parameter states into a ZeRO-2 optimizer (and the module's weights) at this world size:
    each rank takes the fragments its partitions own, and the whole momentum of the matrices they touch."""
    names = {id(p): n for n, p in module.named_parameters()}
    inner = optimizer.optimizer
    for g, params in enumerate(optimizer.bit16_groups):
        flat = optimizer.single_partition_of_fp32_groups[g]
        muon = bool(inner.param_groups[g].get("use_muon"))
        moments = {} if muon else {k: torch.zeros_like(flat) for k in ("exp_avg", "exp_avg_sq")}
        step = None
        for p in params:
            saved = states[names[id(p)]]
            p.data.copy_(saved["fp32"].to(p.dtype))
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:  # no piece of this parameter in this rank's partition
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            for key, dest in (("fp32", flat), *moments.items()):
                dest.narrow(0, hp.start, hp.numel).copy_(saved[key].flatten().narrow(0, lp.start, lp.numel))
            step = saved.get("step", step)
        if muon:
            momentum = [states[names[id(p)]]["momentum"].flatten() for p in optimizer.params_in_partition[g]]
            inner.state[flat] = {"momentum_buffer": torch.cat(momentum).to(flat)} if momentum else {}
        elif step is not None:
            inner.state[flat] = {"step": step.clone() if torch.is_tensor(step) else step, **moments}


def load_scaler_state(optimizer: Any, tag_dir: Path, rank: int) -> None:
    """The loss scaler (fp16) and clipping state of the saved shard this rank's partition continues, which a
    module-only load leaves at their initial values."""
    files = shard_files(tag_dir)
    osd = torch.load(files[min(rank, len(files) - 1)], map_location="cpu", weights_only=False)
    optimizer._load_global_state(osd["optimizer_state_dict"])
