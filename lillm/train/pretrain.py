"""Pretraining with a DeepSpeed engine: `deepspeed launch/pretrain.py --ds_config ... --config ...`.

One process per device (or CPU rank). Each rank builds the same model from the same seed, registers it
with `deepspeed.initialize` (ZeRO-2 partitions optimizer state and gradients), reads its share of the
global data stream, and steps in lockstep. Rank 0 logs, writes TensorBoard events and moves `latest`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from lillm.config import ModelConfig
from lillm.data.loader import PretrainLoader, ShardSet, validation_batches
from lillm.errors import UserError
from lillm.model import LilLM
from lillm.tokenizer import load_tokenizer
from lillm.train.checkpoint import (
    Checkpointer,
    load_engine_checkpoint,
    read_meta,
    resolve_checkpoint,
    tag_for_world_size,
    universal_info,
    write_run_files,
)
from lillm.train.config import DataConfig, TrainConfig, new_parser, parse, plan_batches
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
from lillm.train.loss import token_loss
from lillm.train.metrics import MetricsWriter, detect_peak_tflops, format_duration, get_logger
from lillm.train.schedule import apply_lr


@dataclasses.dataclass
class RunConfig:
    """Everything a pretraining run is made of."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    ds_config: str = "ds_configs/zero2.json"


def build_parser():
    parser = new_parser("pretrain.py", "Pretrain a lillm model with DeepSpeed (ZeRO-2).",
                        "YAML file with model/data/train sections.")
    parser.add_argument("--ds_config", type=str, default="ds_configs/zero2.json",
                        help="DeepSpeed JSON; batch, lr and clipping keys may be \"auto\" (filled from --train).")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher; not for users.")
    parser.add_class_arguments(ModelConfig, "model", help="Model shape (defaults: the lil-39m reference model).")
    parser.add_class_arguments(DataConfig, "data", help="Token shards.")
    parser.add_class_arguments(TrainConfig, "train", help="Training.")
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[RunConfig, str]:
    """Parse command line and YAML into a RunConfig; returns it with its YAML rendering."""
    ns, yaml, init = parse(build_parser(), argv)
    return RunConfig(model=init.model, data=init.data, train=init.train, ds_config=ns.ds_config), yaml


def run(cfg: RunConfig, config_yaml: str) -> int:
    """Train; returns the process exit code."""
    train, model_cfg = cfg.train, cfg.model
    rank, world, local_rank = init_distributed()
    log = get_logger(rank)
    device = local_device(local_rank)
    run_dir = Path(train.run_dir)

    # -- data and tokenizer ----------------------------------------------------------------------
    tok_dir = Path(cfg.data.dir) / "tokenizer"
    tokenizer = load_tokenizer(tok_dir)
    shards = ShardSet(cfg.data.dir, "train", check_checksums=cfg.data.verify, tokenizer=tokenizer)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                        f"{model_cfg.vocab_size}")
    seq_len = train.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise UserError(f"train.seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    plan = plan_batches(train, seq_len, world)
    loader = PretrainLoader(shards, seq_len, plan.micro_batch_size, rank, world, seed=train.seed,
                            shuffle=cfg.data.shuffle, num_workers=cfg.data.num_workers,
                            pin_memory=device.type == "cuda")
    val_shards = ShardSet(cfg.data.dir, "val")
    do_eval = train.eval_interval > 0 and int(val_shards.tokens.sum()) > seq_len

    # -- resume target (decided before the engine: a new world size needs the universal format) -----
    raw_ds = load_ds_config(cfg.ds_config)
    ds_cfg = fill_ds_config(raw_ds, train, plan, cfg.ds_config)
    tag_dir = resolve_checkpoint(train.resume, run_dir)
    meta: dict[str, Any] = {}
    if tag_dir is not None:
        meta = read_meta(tag_dir)
        check_resumable(meta, tag_dir, model_cfg, tokenizer)
        tag_dir = tag_for_world_size(tag_dir, meta, world, rank, ds_cfg, log)

    # -- model and engine ---------------------------------------------------------------------------
    torch.manual_seed(train.seed)
    model = LilLM(model_cfg)
    model.init_weights()
    model.activation_checkpointing = train.activation_checkpointing
    engine, optimizer = initialize_engine(model, ds_cfg, param_groups(model, train.weight_decay), device,
                                          cfg.ds_config)
    if train.compile:
        engine.compile()
    prec = precision(ds_cfg)

    step, tokens_seen = 0, 0
    if tag_dir is not None:
        state = load_engine_checkpoint(engine, tag_dir, meta, world, rank)
        step, tokens_seen = state["step"], state["tokens_seen"]
        loader.load_state_dict(state["loader"])
        log.info(f"resumed from {tag_dir} at step {step} ({tokens_seen:,} tokens, data position "
                 f"{loader.global_position:,} windows)")

    # -- run directory ------------------------------------------------------------------------------
    if rank == 0:
        write_run_files(run_dir, config_yaml, ds_cfg, tokenizer)
    writer = MetricsWriter(str(run_dir / "tensorboard") if rank == 0 and train.tensorboard else None,
                           run_dir / "metrics.jsonl" if rank == 0 else None)
    ckpt = Checkpointer(run_dir, train.keep_checkpoints, rank, world)
    peak = detect_peak_tflops(train.peak_tflops)
    flops_per_token = model_cfg.flops_per_token(seq_len)
    log.info(
        f"lillm pretraining: {model.num_params():,} parameters, {world} rank(s) on {device.type}, {prec}, "
        f"ZeRO stage {ds_cfg.get('zero_optimization', {}).get('stage', 0)}; micro batch {plan.micro_batch_size} x "
        f"seq {seq_len} x accum {plan.grad_accum} x {world} = {plan.tokens_per_step:,} tokens/step; "
        f"{plan.max_steps:,} steps ({plan.max_steps * plan.tokens_per_step:,} tokens); "
        f"{loader.num_windows:,} windows per epoch"
    )
    if rank == 0 and step == 0:
        writer.text("config", "```\n" + config_yaml + "\n```", 0)

    stop = StopFlag()
    meta_out = {"model_config": model_cfg.to_dict(), "tokenizer_fingerprint": tokenizer.fingerprint,
                "train_config": dataclasses.asdict(train)}

    def save(at_step: int) -> None:
        client_state = {
            "lillm": {"step": at_step, "tokens_seen": tokens_seen, "loader": loader.state_dict(), **meta_out,
                      "world_size": world},
            "universal_checkpoint_info": universal_info(),
        }
        path = ckpt.save(engine, at_step, client_state, meta_out)
        if rank == 0:
            (path / "config.yaml").write_text(config_yaml)
        log.info(f"saved checkpoint {path}")

    def evaluate(at_step: int) -> dict[str, float]:
        engine.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in validation_batches(val_shards, seq_len, plan.micro_batch_size, train.eval_batches,
                                            rank, world):
                batch = batch.to(device)
                logits = engine(batch[:, :-1])
                total += float(token_loss(logits, batch[:, 1:], 1.0))
                count += batch[:, 1:].numel()
        total, count = all_reduce([total, count], device)
        engine.train()
        val = total / count
        out = {"val/loss": val, "val/perplexity": math.exp(min(val, 50))}
        if rank == 0 and train.sample_tokens:
            from lillm.generate import SamplingConfig, generate

            ids = generate(engine.module, [tokenizer.prompt_ids(train.sample_prompt)],
                           SamplingConfig(max_new_tokens=train.sample_tokens, temperature=0.8, top_k=50,
                                          seed=train.seed), stop_ids=[tokenizer.eos_id])[0]
            sample = train.sample_prompt + tokenizer.decode(ids)
            writer.text("samples", sample, at_step)
            log.info(f"sample @ step {at_step}: {sample!r}")
        return out

    engine.train()
    batches = iter(loader)
    bar = tqdm(total=plan.max_steps, initial=step, desc="pretrain", unit="step", disable=rank != 0,
               dynamic_ncols=True, mininterval=2.0, file=sys.stderr)
    bad_steps, exit_code, last_val = 0, 0, float("nan")
    window = {"t0": time.perf_counter(), "data": 0.0, "steps": 0, "loss": 0.0}
    start_step, run_start = step, time.perf_counter()
    normalizer = plan.micro_batch_size * seq_len  # every window is full: the micro-batch mean
    try:
        while step < plan.max_steps:
            lr = apply_lr(optimizer, step, train, plan.max_steps)
            step_loss = 0.0
            for _ in range(plan.grad_accum):
                t = time.perf_counter()
                batch = next(batches).to(device, non_blocking=True)
                window["data"] += time.perf_counter() - t
                logits = engine(batch[:, :-1])
                loss = token_loss(logits, batch[:, 1:], normalizer)
                finite = bool(torch.isfinite(loss))
                if world > 1:
                    finite = all_reduce([0.0 if finite else 1.0], device)[0] == 0
                if not finite:
                    bad_steps += 1
                    if bad_steps > train.max_bad_steps:
                        diag = run_dir / f"nonfinite_step{step}_rank{rank}.pt"
                        torch.save({"step": step, "batch": batch.cpu(), "loss": loss.item(), "lr": lr}, diag)
                        raise UserError(
                            f"non-finite loss at step {step} (lr {lr:.3g}); the batch is saved in {diag}; the last "
                            f"checkpoint is untouched. Lower train.lr or raise train.max_bad_steps to skip batches"
                        )
                    log.warning(f"step {step}: non-finite loss, skipping the micro-batch ({bad_steps} skipped)")
                    # A zero loss that touches every parameter: the update sees no gradient from this batch.
                    loss = sum(p.sum() for p in engine.module.parameters()) * 0.0
                engine.backward(loss)
                engine.step()
                step_loss += float(loss.detach()) / plan.grad_accum
            step += 1
            tokens_seen += plan.tokens_per_step
            window["steps"] += 1
            window["loss"] += step_loss
            bar.update(1)

            # Every rank must agree to stop at the same step, or the save's collectives would hang.
            stop_now = all_reduce([float(stop.signum)], device, dist.ReduceOp.MAX)[0] > 0
            if step % train.log_interval == 0 or step == plan.max_steps:
                elapsed = time.perf_counter() - window["t0"]
                loss_avg = all_reduce([window["loss"] / window["steps"]], device)[0] / world
                tok_s = window["steps"] * plan.tokens_per_step / elapsed
                grad_norm = engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                scalars = {
                    "train/loss": loss_avg, "train/lr": lr, "train/grad_norm": grad_norm,
                    "perf/tokens_per_s": tok_s, "perf/step_time_s": elapsed / window["steps"],
                    "perf/data_wait_frac": window["data"] / elapsed, "train/tokens_seen": tokens_seen,
                    "train/epoch": loader.epoch,
                }
                mfu = tok_s * flops_per_token / (peak * 1e12 * world) if peak else None
                if mfu is not None:
                    scalars["perf/mfu"] = mfu
                if device.type == "cuda":
                    scalars["perf/max_mem_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
                writer.scalars(scalars, step)
                done = step - start_step
                eta = (time.perf_counter() - run_start) / done * (plan.max_steps - step) if done else 0
                if rank == 0:
                    bar.write(
                        f"step {step}/{plan.max_steps} | loss {loss_avg:.4f} | lr {lr:.2e} | gnorm {grad_norm:.2f} | "
                        f"{tok_s:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu is not None else "")
                        + f" | data {window['data'] / elapsed:.1%} | eta {format_duration(eta)}",
                        file=sys.stdout,
                    )
                window = {"t0": time.perf_counter(), "data": 0.0, "steps": 0, "loss": 0.0}
            if do_eval and (step % train.eval_interval == 0 or step == plan.max_steps):
                vals = evaluate(step)
                last_val = vals["val/loss"]
                writer.scalars(vals, step)
                log.info(f"eval @ step {step}: val loss {vals['val/loss']:.4f}, ppl {vals['val/perplexity']:.2f}")
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
        writer.hparams({**dataclasses.asdict(train), **{f"model.{k}": v for k, v in model_cfg.to_dict().items()},
                        "world_size": world, "precision": prec},
                       {"hparam/val_loss": last_val})
        writer.close()
    if exit_code == 0:
        log.info(f"done at step {step}; TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return exit_code


def main(argv: list[str] | None = None) -> None:
    """Entry point of launch/pretrain.py."""
    run_script("pretrain", lambda: run(*parse_config(argv)))
