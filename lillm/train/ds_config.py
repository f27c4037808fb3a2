"""Filling and checking the DeepSpeed JSON: every number has one source, the training config.

Batch sizes, accumulation, clipping and optimizer hyperparameters may be "auto" (or absent) in the JSON
and are filled from the training config; a literal value that disagrees is an error, as is a key
DeepSpeed does not know or an LR scheduler (lillm owns the schedule).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from lillm.errors import UserError
from lillm.files import read_json
from lillm.train.config import BatchPlan, TrainConfig, shipped_file

KNOWN_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "flops_profiler",
    "activation_checkpointing", "aio", "tensorboard", "wandb", "csv_monitor", "comet", "communication_data_type",
    "seq_parallel_communication_data_type", "data_types", "compile", "checkpoint", "elasticity", "autotuning",
    "data_efficiency", "curriculum_learning", "pipeline", "comms_logger", "timers", "disable_allgather",
    "graph_harvesting", "use_data_before_expert_parallelism", "nebula", "compression_training",
}
ZERO_KEYS = {
    "stage", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "allgather_partitions",
    "allgather_bucket_size", "overlap_comm", "load_from_fp32_weights", "elastic_checkpoint", "offload_param",
    "offload_optimizer", "sub_group_size", "cpu_offload", "cpu_offload_params", "cpu_offload_use_pin_memory",
    "prefetch_bucket_size", "stage3_prefetch_bucket_size", "param_persistence_threshold",
    "stage3_param_persistence_threshold", "model_persistence_threshold", "max_live_parameters",
    "stage3_max_live_parameters", "max_reuse_distance", "stage3_max_reuse_distance",
    "gather_16bit_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save", "round_robin_gradients",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients", "mics_shard_size", "mics_hierarchical_params_gather", "memory_efficient_linear",
    "pipeline_loading_checkpoint", "override_module_apply", "ignore_unused_parameters", "legacy_stage1",
    "log_trace_cache_warnings", "use_multi_rank_bucket_allreduce",
}


OPTIMIZER_TYPES = {"adamw": "AdamW", "muon": "Muon"}
"""DeepSpeed's optimizer type for each train.optimizer."""


def resolve_ds_config(value: str) -> str:
    """The ds_config file to use: a path, the name of a shipped one (`zero2`), or 'auto': the file of
    `accelerate launch`'s DeepSpeed plugin (its deepspeed_config_file) when launched by it, else zero2 (bf16)
    with CUDA and zero2_cpu (fp32: bf16 matmuls are slow on most CPUs) without."""
    if value == "auto":
        import torch

        value = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or (
            "zero2" if torch.cuda.is_available() else "zero2_cpu")
    return shipped_file(value, "ds_config")


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON by path, or by the name of one shipped with lillm (`zero2`)."""
    p = Path(shipped_file(str(path), "ds_config"))
    cfg = read_json(p, f"ds_config {p}: no such file")
    if not isinstance(cfg, dict):
        raise UserError(f"ds_config {p}: expected a JSON object")
    return cfg


def _fill(cfg: dict, key: str, value: Any, where: str) -> None:
    current = cfg.get(key, "auto")
    if current == "auto":
        cfg[key] = value
    elif (list(current) if isinstance(current, (list, tuple)) else current) != (
        list(value) if isinstance(value, (list, tuple)) else value
    ):
        raise UserError(f"ds_config {where}{key}={current!r} conflicts with the training config ({value!r}); "
                        f'set it to "auto" and configure it in the training config')


def fill_ds_config(raw: dict[str, Any], train: TrainConfig, plan: BatchPlan, source: str = "") -> dict[str, Any]:
    """A copy of `raw` with every "auto" filled from `train`/`plan`, after checking it."""
    cfg = copy.deepcopy(raw)
    unknown = sorted(set(cfg) - KNOWN_KEYS)
    if unknown:
        raise UserError(f"ds_config {source}: unknown keys {unknown}")
    zero = cfg.get("zero_optimization", {})
    unknown = sorted(set(zero) - ZERO_KEYS)
    if unknown:
        raise UserError(f"ds_config {source}: unknown zero_optimization keys {unknown}")
    if "scheduler" in cfg:
        raise UserError(f"ds_config {source}: remove 'scheduler'; lillm sets the learning rate (train.schedule)")
    if cfg.get("bf16", {}).get("enabled") and cfg.get("fp16", {}).get("enabled"):
        raise UserError(f"ds_config {source}: bf16 and fp16 are both enabled")
    _fill(cfg, "train_micro_batch_size_per_gpu", plan.micro_batch_size, "")
    _fill(cfg, "gradient_accumulation_steps", plan.grad_accum, "")
    _fill(cfg, "train_batch_size", plan.micro_batch_size * plan.grad_accum * plan.world_size, "")
    _fill(cfg, "gradient_clipping", train.grad_clip, "")
    opt = cfg.setdefault("optimizer", {"type": "auto"})
    kind = str(opt.get("type", "auto")).lower()
    if kind == "auto":
        opt["type"], kind = OPTIMIZER_TYPES[train.optimizer], train.optimizer
    if kind not in ("adamw", "adam", "muon"):
        raise UserError(f"ds_config {source}: optimizer type {opt.get('type')!r}; lillm trains with AdamW or Muon")
    if (kind == "muon") != (train.optimizer == "muon"):
        raise UserError(f"ds_config {source}: optimizer type {opt['type']!r} conflicts with train.optimizer="
                        f"{train.optimizer}; set it to \"auto\"")
    params = opt.setdefault("params", {})
    for key, value in (("lr", train.lr), ("betas", list(train.betas)), ("eps", train.eps),
                       ("weight_decay", train.weight_decay)):
        _fill(params, key, value, "optimizer.params.")
    if kind == "adam":
        params.setdefault("adam_w_mode", True)
    if kind == "muon":
        # The Muon half reads muon_lr and momentum; the auxiliary AdamW half lr, betas, eps, weight_decay, and
        # is torch's AdamW (exact resume, see lillm.train.engine.lillm_builds_optimizer) unless ZeRO offloads it, which
        # needs DeepSpeed's CPU Adam.
        for key, value in (("muon_lr", train.muon_lr), ("momentum", train.muon_momentum)):
            _fill(params, key, value, "optimizer.params.")
        if not offloads_optimizer(cfg):
            params.setdefault("torch_adam", True)
    cfg.setdefault("steps_per_print", 10**9)  # lillm logs; keep DeepSpeed's own step lines out of the console
    return cfg


def offloads_optimizer(cfg: dict[str, Any]) -> bool:
    """Whether ZeRO keeps the optimizer on the CPU (zero_optimization.offload_optimizer.device is set)."""
    return cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in (None, "none")


def precision(cfg: dict[str, Any]) -> str:
    """'bf16', 'fp16' or 'fp32', as the DeepSpeed config says."""
    if cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"
