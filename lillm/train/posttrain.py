"""Post-training with a DeepSpeed engine: supervised fine-tuning and DPO, full or with LoRA.

    deepspeed launch/sft.py --ds_config ds_configs/zero2.json --config launch/configs/sft-lil-39m.yaml
    deepspeed launch/dpo.py --ds_config ds_configs/zero2.json --config launch/configs/dpo-lil-39m.yaml

The run starts from `init_from` (a pretraining or SFT run directory, a checkpoint, or an exported
directory) and uses its tokenizer, which must carry the chat tokens. Batches, schedule, checkpoints,
TensorBoard, SIGTERM saves and exact resume (also at another world size, for full fine-tuning) work as
in pretraining.

SFT's loss is the mean over every learned token of the global batch (assistant replies and their
end-of-turn tokens), exact under gradient accumulation and data parallelism. DPO's is the mean over the
pairs of the global batch; its reference model is the starting policy, frozen: a separate copy outside
the engine (no gradients, no optimizer state) or, with LoRA, the same model with its adapters switched off.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from lillm.data.chat import ChatDataConfig, ChatLoader, load_preferences, load_sft, validation_batches
from lillm.errors import UserError
from lillm.lora import LoRAConfig, adapters_disabled, apply_lora, base_fingerprint, lora_state_dict
from lillm.train.checkpoint import (
    ADAPTER,
    Checkpointer,
    load_engine_checkpoint,
    read_meta,
    resolve_checkpoint,
    tag_for_world_size,
    universal_info,
    write_run_files,
)
from lillm.train.config import TrainConfig, new_parser, parse, plan_batches
from lillm.train.ds_config import fill_ds_config, load_ds_config, precision
from lillm.train.engine import (
    StopFlag,
    all_reduce,
    check_resumable,
    init_distributed,
    initialize_engine,
    local_device,
    param_groups,
    run_script,
)
from lillm.train.loss import preference_loss, sequence_logps, token_loss
from lillm.train.metrics import MetricsWriter, format_duration, get_logger
from lillm.train.schedule import apply_lr

Objective = Literal["sft", "dpo"]
# What DPO metrics are summed from, per micro-batch: pair count, then per-pair sums (averaged over pairs).
DPO_SUMS = ("pairs", "loss", "accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
            "logps_rejected")


@dataclass
class DPOConfig:
    """Direct preference optimisation."""

    beta: float = 0.1
    """Strength of the pull towards the reference model (the KL penalty's inverse temperature)."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """'sigmoid': the DPO paper's loss; 'ipo': the squared loss of IPO (on per-token mean log-probabilities)."""

    def __post_init__(self) -> None:
        if not self.beta > 0 or not math.isfinite(self.beta):
            raise ValueError(f"invalid DPOConfig: beta must be a positive finite number, got {self.beta}")


@dataclass
class PostTrainConfig:
    """Everything a post-training run is made of."""

    init_from: str
    data: ChatDataConfig
    train: TrainConfig
    lora: LoRAConfig
    dpo: DPOConfig | None = None
    ds_config: str = "ds_configs/zero2.json"


def build_parser(objective: Objective):
    what = {"sft": "Supervised fine-tuning", "dpo": "Direct preference optimisation"}[objective]
    sections = "data/train/lora" + ("/dpo" if objective == "dpo" else "")
    parser = new_parser(f"{objective}.py", f"{what} of a lillm model with DeepSpeed (ZeRO-2).",
                        f"YAML file with init_from and {sections} sections.")
    parser.add_argument("--init_from", type=str, required=True,
                        help="Starting model: a run directory, a checkpoint, or an exported transformers directory.")
    parser.add_argument("--ds_config", type=str, default="ds_configs/zero2.json",
                        help="DeepSpeed JSON; batch, lr and clipping keys may be \"auto\" (filled from --train).")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher; not for users.")
    parser.add_class_arguments(ChatDataConfig, "data", help="Conversations (SFT) or preference pairs (DPO).")
    parser.add_class_arguments(TrainConfig, "train", help="Training.")
    parser.add_class_arguments(LoRAConfig, "lora", help="Low-rank adapters (rank 0: full fine-tuning).")
    if objective == "dpo":
        parser.add_class_arguments(DPOConfig, "dpo", help="Preference loss.")
    return parser


def parse_config(objective: Objective, argv: list[str] | None = None) -> tuple[PostTrainConfig, str]:
    ns, yaml, init = parse(build_parser(objective), argv)
    cfg = PostTrainConfig(init_from=ns.init_from, data=init.data, train=init.train, lora=init.lora,
                          dpo=init.dpo if objective == "dpo" else None, ds_config=ns.ds_config)
    return cfg, yaml


def run(cfg: PostTrainConfig, config_yaml: str, objective: Objective) -> int:
    """Train; returns the process exit code."""
    from lillm.loading import load_model

    train, lora = cfg.train, cfg.lora
    run_dir = Path(train.run_dir)

    # -- starting model, tokenizer, data --------------------------------------------------------------
    model, tokenizer = load_model(cfg.init_from)
    if tokenizer is None:
        raise UserError(f"{cfg.init_from}: no tokenizer stored with the model")
    if not tokenizer.has_chat_tokens:
        raise UserError(f"{cfg.init_from}: its tokenizer lacks the chat tokens (<|start_header_id|>, "
                        "<|end_header_id|>, <|eot_id|>); train one with `lillm train-tokenizer` and pretrain with it")
    model_cfg = model.config
    seq_len = train.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise UserError(f"train.seq_len={seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    pairs = objective == "dpo"
    data = (load_preferences if pairs else load_sft)(cfg.data, tokenizer, seq_len)
    # Model and data are checked before the process group exists: bad input fails fast, on every rank alike.
    rank, world, local_rank = init_distributed()
    log = get_logger(rank)
    device = local_device(local_rank)
    plan = plan_batches(train, seq_len, world)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    loader = ChatLoader(data.train, plan.micro_batch_size, rank, world, train.seed, seq_len + 1, pad_id,
                        shuffle=cfg.data.shuffle, packing=cfg.data.packing, pairs=pairs)

    base_fp = base_fingerprint(model) if lora.enabled else None
    torch.manual_seed(train.seed)  # the adapters' initialisation: identical on every rank
    trainable = apply_lora(model, lora) if lora.enabled else model.num_params()
    reference = None
    if pairs and not lora.enabled:
        reference = copy.deepcopy(model).eval().requires_grad_(False)

    # -- resume target ----------------------------------------------------------------------------------
    ds_cfg = fill_ds_config(load_ds_config(cfg.ds_config), train, plan, cfg.ds_config)
    tag_dir = resolve_checkpoint(train.resume, run_dir)
    meta_out = {"model_config": model_cfg.to_dict(), "tokenizer_fingerprint": tokenizer.fingerprint,
                "train_config": dataclasses.asdict(train), "objective": objective,
                "init_from": str(Path(cfg.init_from).resolve()),
                "lora": dataclasses.asdict(lora) if lora.enabled else None, "base_fingerprint": base_fp}
    meta: dict[str, Any] = {}
    if tag_dir is not None:
        meta = read_meta(tag_dir)
        check_resumable(meta, tag_dir, model_cfg, tokenizer)
        if meta.get("objective", "pretrain") != objective:
            raise UserError(f"cannot resume {tag_dir}: it is a {meta.get('objective', 'pretrain')} checkpoint, "
                            f"this is a {objective} run (start a new train.run_dir, with init_from={tag_dir})")
        if meta.get("lora") != meta_out["lora"]:
            raise UserError(f"cannot resume {tag_dir}: its LoRA settings {meta.get('lora')} differ from "
                            f"{meta_out['lora']}")
        if lora.enabled and meta.get("base_fingerprint") != base_fp:
            raise UserError(f"cannot resume {tag_dir}: its LoRA adapter was trained on another base model than "
                            f"{cfg.init_from}")
        if lora.enabled and meta["world_size"] != world:
            # DeepSpeed's universal conversion of a checkpoint without its frozen weights loads back wrong
            # adapter/optimizer states (measured: losses off by 0.25 after resume), so it is refused.
            raise UserError(f"cannot resume the LoRA checkpoint {tag_dir} on {world} rank(s): it was saved by "
                            f"{meta['world_size']}, and LoRA checkpoints resume only at their own world size. Resume "
                            f"with {meta['world_size']} rank(s), or start a new run with init_from={tag_dir}")
        tag_dir = tag_for_world_size(tag_dir, meta, world, rank, ds_cfg, log)

    # -- engine -------------------------------------------------------------------------------------------
    engine, optimizer = initialize_engine(model, ds_cfg, param_groups(model, train.weight_decay), device,
                                          cfg.ds_config)
    if train.compile:
        engine.compile()
    prec = precision(ds_cfg)
    compute_dtype = next(engine.module.parameters()).dtype
    if reference is not None:
        reference.to(device=device, dtype=compute_dtype)

    step = 0
    if tag_dir is not None:
        state = load_engine_checkpoint(engine, tag_dir, meta, world, rank, strict=not lora.enabled)
        step = state["step"]
        loader.load_state_dict(state["loader"])
        log.info(f"resumed from {tag_dir} at step {step}")

    if rank == 0:
        write_run_files(run_dir, config_yaml, ds_cfg, tokenizer)
    writer = MetricsWriter(str(run_dir / "tensorboard") if rank == 0 and train.tensorboard else None,
                           run_dir / "metrics.jsonl" if rank == 0 else None)
    ckpt = Checkpointer(run_dir, train.keep_checkpoints, rank, world)
    stats = data.stats
    log.info(
        f"lillm {objective}: {trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters"
        + (f" (LoRA rank {lora.rank} on {','.join(lora.targets)})" if lora.enabled else "")
        + f", {world} rank(s) on {device.type}, {prec}; {len(data.train):,} train / {len(data.val):,} val records "
        f"({stats['truncated']} truncated, {stats['dropped_overlong']} dropped as over-long); micro batch "
        f"{plan.micro_batch_size} x accum {plan.grad_accum} x {world} ranks; {plan.max_steps:,} steps = "
        f"{plan.max_steps * plan.grad_accum * world / max(1, loader.batches_per_epoch):.2f} epochs"
    )
    if rank == 0 and step == 0:
        writer.text("config", "```\n" + config_yaml + "\n```", 0)
        writer.scalars({f"data/{k}": v for k, v in stats.items()}, 0)

    def save(at_step: int) -> None:
        client_state = {"lillm": {"step": at_step, "loader": loader.state_dict(), **meta_out, "world_size": world},
                        "universal_checkpoint_info": universal_info()}

        def write_adapter(tag: Path) -> None:
            from safetensors.torch import save_file

            state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in
                     lora_state_dict(engine.module).items()}
            save_file(state, tag / ADAPTER, metadata={"format": "pt"})

        path = ckpt.save(engine, at_step, client_state, meta_out, exclude_frozen=lora.enabled,
                         on_saved=write_adapter if lora.enabled else None)
        if rank == 0:
            (path / "config.yaml").write_text(config_yaml)
        log.info(f"saved checkpoint {path}")

    def reference_logps(batch) -> torch.Tensor:
        with torch.no_grad():
            if reference is not None:
                logits = reference(batch.inputs)
            else:
                with adapters_disabled(engine.module):
                    logits = engine.module(batch.inputs)
            return sequence_logps(logits, batch.targets)[0]

    def dpo_terms(batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean preference loss of a micro-batch of pairs, and the sums the metrics are made of."""
        ref = reference_logps(batch)
        logps, counts = sequence_logps(engine(batch.inputs), batch.targets)
        if cfg.dpo.loss == "ipo":
            logps, ref = logps / counts, ref / counts
        n = logps.shape[0] // 2
        losses, r_c, r_r = preference_loss(logps[:n], logps[n:], ref[:n], ref[n:], cfg.dpo.beta, cfg.dpo.loss)
        sums = {"pairs": n, "loss": float(losses.detach().sum()), "accuracy": float((r_c > r_r).sum()),
                "reward_margin": float((r_c - r_r).sum()), "rewards_chosen": float(r_c.sum()),
                "rewards_rejected": float(r_r.sum()), "logps_chosen": float(logps[:n].detach().sum()),
                "logps_rejected": float(logps[n:].detach().sum())}
        return losses.mean(), sums

    def dpo_scalars(sums: dict[str, float], prefix: str) -> dict[str, float]:
        totals = all_reduce([sums[k] for k in DPO_SUMS], device)
        return {f"{prefix}/{k}": v / max(totals[0], 1) for k, v in zip(DPO_SUMS[1:], totals[1:])}

    def evaluate(at_step: int) -> dict[str, float]:
        engine.eval()
        out: dict[str, float] = {}
        with torch.no_grad():
            batches = validation_batches(data.val, plan.micro_batch_size, rank, world, pad_id, pairs)
            if pairs:
                sums = dict.fromkeys(DPO_SUMS, 0.0)  # all keys even on a rank without validation pairs
                for batch in batches:
                    _, s = dpo_terms(batch.to(device))
                    sums = {k: sums[k] + s[k] for k in DPO_SUMS}
                out = dpo_scalars(sums, "val")
            else:
                total, count = 0.0, 0
                for batch in batches:
                    batch = batch.to(device)
                    total += float(token_loss(engine(batch.inputs), batch.targets, 1.0))
                    count += batch.num_targets
                total, count = all_reduce([total, count], device)
                out = {"val/loss": total / max(count, 1), "val/perplexity": math.exp(min(total / max(count, 1), 50))}
        engine.train()
        if rank == 0 and train.sample_tokens:
            from lillm.generate import SamplingConfig, generate

            prompt = tokenizer.encode_chat([{"role": "user", "content": train.sample_prompt}],
                                           add_generation_prompt=True)
            ids = generate(engine.module, [prompt], SamplingConfig(max_new_tokens=train.sample_tokens,
                                                                   temperature=0, seed=train.seed),
                           stop_ids=[tokenizer.eot_id, tokenizer.eos_id])[0]
            sample = f"user: {train.sample_prompt}\nassistant: {tokenizer.decode(ids)}"
            writer.text("samples", sample, at_step)
            log.info(f"sample @ step {at_step}: {sample!r}")
        return out

    stop = StopFlag()
    engine.train()
    batches = iter(loader)
    bar = tqdm(total=plan.max_steps, initial=step, desc=objective, unit="step", disable=rank != 0,
               dynamic_ncols=True, mininterval=2.0, file=sys.stderr)
    do_eval = train.eval_interval > 0 and len(data.val) > 0
    exit_code, last_val = 0, float("nan")
    window: dict[str, float] = {"t0": time.perf_counter(), "steps": 0, "tokens": 0, "loss": 0.0}
    dpo_sums = dict.fromkeys(DPO_SUMS, 0.0)
    start_step, run_start = step, time.perf_counter()
    try:
        while step < plan.max_steps:
            lr = apply_lr(optimizer, step, train, plan.max_steps)
            micro = [next(batches) for _ in range(plan.grad_accum)]
            if not pairs:
                # The global count of learned tokens in this step: each micro-batch's loss is a share of it.
                learned = all_reduce([sum(b.num_targets for b in micro)], device)[0]
                normalizer = learned / (plan.grad_accum * world)
            step_loss = 0.0
            for batch in micro:
                window["tokens"] += batch.num_tokens
                batch = batch.to(device)
                if pairs:
                    loss, sums = dpo_terms(batch)
                    dpo_sums = {k: dpo_sums[k] + sums[k] for k in DPO_SUMS}
                else:
                    loss = token_loss(engine(batch.inputs, positions=batch.positions, mask=batch.mask),
                                      batch.targets, normalizer)
                if not torch.isfinite(loss.detach()):
                    raise UserError(f"non-finite loss at step {step} (lr {lr:.3g}); the last checkpoint is "
                                    "untouched. Lower train.lr")
                engine.backward(loss)
                engine.step()
                step_loss += float(loss.detach())
            step += 1
            window["steps"] += 1
            window["loss"] += step_loss / plan.grad_accum
            bar.update(1)

            stop_now = all_reduce([float(stop.signum)], device, dist.ReduceOp.MAX)[0] > 0
            if step % train.log_interval == 0 or step == plan.max_steps:
                elapsed = time.perf_counter() - window["t0"]
                # SFT: each micro-batch loss is its share of the global token mean times accum x world, so the
                # average over micro-batches and ranks is that mean; DPO: the mean of the pair means.
                loss_avg, tokens = all_reduce([window["loss"] / window["steps"], window["tokens"]], device)
                loss_avg /= world
                grad_norm = engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                scalars = {"train/loss": loss_avg, "train/lr": lr, "train/grad_norm": grad_norm,
                           "perf/tokens_per_s": tokens / elapsed, "perf/step_time_s": elapsed / window["steps"]}
                if pairs:
                    scalars.update(dpo_scalars(dpo_sums, "dpo"))
                    dpo_sums = dict.fromkeys(DPO_SUMS, 0.0)
                writer.scalars(scalars, step)
                done = step - start_step
                eta = (time.perf_counter() - run_start) / done * (plan.max_steps - step) if done else 0
                if rank == 0:
                    extra = (f" | acc {scalars['dpo/accuracy']:.2f} | margin {scalars['dpo/reward_margin']:.3f}"
                             if pairs else "")
                    bar.write(f"step {step}/{plan.max_steps} | loss {loss_avg:.4f}{extra} | lr {lr:.2e} | "
                              f"gnorm {grad_norm:.2f} | {tokens / elapsed:,.0f} tok/s | eta {format_duration(eta)}",
                              file=sys.stdout)
                window = {"t0": time.perf_counter(), "steps": 0, "tokens": 0, "loss": 0.0}
            if do_eval and (step % train.eval_interval == 0 or step == plan.max_steps):
                vals = evaluate(step)
                last_val = vals["val/loss"]
                writer.scalars(vals, step)
                log.info(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in vals.items()))
            if stop_now:
                log.info(f"received signal {stop.signum}: saving at step {step} and exiting")
                save(step)
                break
            if step % train.ckpt_interval == 0 or step == plan.max_steps:
                save(step)
    except UserError as e:
        log.error(f"error: {e}")
        exit_code = 2
    finally:
        bar.close()
        hp = {**dataclasses.asdict(train), **{f"lora.{k}": v for k, v in dataclasses.asdict(lora).items()},
              "objective": objective, "world_size": world, "precision": prec}
        writer.hparams(hp, {"hparam/val_loss": last_val})
        writer.close()
    if exit_code == 0:
        log.info(f"done at step {step}; export with: lillm export {run_dir} OUT; chat with: lillm chat {run_dir}")
    return exit_code


def main(objective: Objective, argv: list[str] | None = None) -> None:
    """Entry point of launch/sft.py and launch/dpo.py."""
    run_script(objective, lambda: run(*parse_config(objective, argv), objective))
