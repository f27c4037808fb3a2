"""Post-training with a DeepSpeed engine: supervised fine-tuning and DPO, full or with LoRA.

    deepspeed launch/sft.py --ds_config ds_configs/zero2.json --config launch/configs/sft-lil-39m.yaml
    deepspeed launch/dpo.py --ds_config ds_configs/zero2.json --config launch/configs/dpo-lil-39m.yaml

The run starts from `init_from` (a pretraining or SFT run directory, a checkpoint, or an exported
directory) and uses its tokenizer, which must carry the chat tokens. The loop, batches, schedule,
checkpoints, TensorBoard, SIGTERM saves and exact resume (also at another world size, for full
fine-tuning) are pretraining's (`lillm.train.loop`); this module adds two objectives.

SFT's loss is the mean over every learned token of the global batch (assistant replies and their
end-of-turn tokens), exact under gradient accumulation and data parallelism. DPO's is the mean over the
pairs of the global batch; its reference model is the starting policy, frozen: a separate copy outside
the engine (no gradients, no optimizer state) or, with LoRA, the same model with its adapters switched off.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from lillm.data.chat_loader import ChatLoader, chat_validation_batches
from lillm.data.examples import Batch, ChatData, load_preferences, load_sft
from lillm.data.records import ChatDataConfig
from lillm.errors import UserError
from lillm.generate import SamplingConfig, generate
from lillm.loading import load_model
from lillm.lora import LoRAConfig, adapters_disabled, apply_lora, base_fingerprint
from lillm.model import LilLM
from lillm.runs import tensorboard_hint
from lillm.tokenizer import Tokenizer
from lillm.train.assemble import Task, assemble
from lillm.train.checkpoint import RunIdentity
from lillm.train.config import BatchPlan, TrainConfig, new_parser, parse, resolve_seq_len
from lillm.train.dist import Process, all_reduce, run_training, to_device
from lillm.train.ds_config import load_ds_config, resolve_ds_config
from lillm.train.loop import Objective, Trainer, perplexity, until_stopped
from lillm.train.loss import preference_loss, sequence_logps, token_loss

TaskName = Literal["sft", "dpo"]
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
    ds_config: str = "zero2"
    """The resolved DeepSpeed JSON path."""


def build_parser(objective: TaskName):
    what = {"sft": "Supervised fine-tuning", "dpo": "Direct preference optimisation"}[objective]
    sections = "data/train/lora" + ("/dpo" if objective == "dpo" else "")
    parser = new_parser(f"{objective}.py", f"{what} of a lillm model with DeepSpeed (ZeRO-2).",
                        f"YAML file with init_from and {sections} sections.")
    parser.add_argument("--init_from", type=str, required=True,
                        help="Starting model: a run directory, a checkpoint, or an exported transformers directory.")
    parser.add_class_arguments(ChatDataConfig, "data", help="Conversations (SFT) or preference pairs (DPO).")
    parser.add_class_arguments(TrainConfig, "train", help="Training.")
    parser.add_class_arguments(LoRAConfig, "lora", help="Low-rank adapters (rank 0: full fine-tuning).")
    if objective == "dpo":
        parser.add_class_arguments(DPOConfig, "dpo", help="Preference loss.")
    return parser


def parse_config(objective: TaskName, argv: list[str] | None = None) -> tuple[PostTrainConfig, str]:
    """Parse command line and YAML into a PostTrainConfig; returns it with its YAML rendering."""
    return run_config(objective, *parse(build_parser(objective), argv))


def run_config(objective: TaskName, ns: Any, yaml: str, init: Any) -> tuple[PostTrainConfig, str]:
    """The PostTrainConfig of a parse of `build_parser(objective)`, with its YAML rendering."""
    cfg = PostTrainConfig(init_from=ns.init_from, data=init.data, train=init.train, lora=init.lora,
                          dpo=init.dpo if objective == "dpo" else None, ds_config=resolve_ds_config(ns.ds_config))
    return cfg, yaml


class ChatObjective(Objective):
    """What SFT and DPO share: chat rows, their validation set, a chat-formatted sample."""

    def __init__(self, cfg: PostTrainConfig, data: ChatData, loader: ChatLoader, tokenizer: Tokenizer,
                 model: LilLM, plan: BatchPlan, process: Process) -> None:
        self.cfg, self.train, self.data, self.loader, self.tokenizer = cfg, cfg.train, data, loader, tokenizer
        self.plan, self.process, self.device = plan, process, process.device
        self.has_validation = len(data.val) > 0
        self.flops_per_token = model.config.flops_per_token(plan.seq_len)

    def num_tokens(self, batch: Batch) -> int:
        return batch.num_tokens

    def val_batches(self):
        return chat_validation_batches(self.data.val, self.plan.micro_batch_size, self.train.eval_batches,
                                       self.process.rank, self.process.world, self.loader.pad_id,
                                       self.loader.pairs)

    def sample(self, model: LilLM) -> str:
        tok, prompt = self.tokenizer, self.train.sample_prompt
        ids = generate(model, [tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)],
                       SamplingConfig(max_new_tokens=self.train.sample_tokens, temperature=0, seed=self.train.seed),
                       stop_ids=[tok.eot_id, tok.eos_id])[0]
        return f"user: {prompt}\nassistant: {tok.decode(ids)}"

    def start_scalars(self) -> dict[str, float]:
        return {f"data/{k}": v for k, v in self.data.stats.items()}

    def hparams(self) -> dict[str, Any]:
        return {**{f"lora.{k}": v for k, v in dataclasses.asdict(self.cfg.lora).items()}, "objective": self.name}

    def done_hint(self) -> str:
        run_dir = self.train.run_dir
        pinned = ["train/loss", "val/loss"] + (["val/accuracy", "val/reward_margin"] if self.name == "dpo" else [])
        return (f"export with: lillm export {run_dir} OUT; chat with: lillm chat {run_dir}; "
                + tensorboard_hint(run_dir, pinned))


class SFT(ChatObjective):
    """Token cross-entropy over the learned tokens (assistant replies), averaged over the whole global batch."""

    name = "sft"

    def begin_step(self, micro: list[Batch]) -> None:
        # The global count of learned tokens in this step: each micro-batch's loss is a share of it.
        # Summed on the device, not read back: the step is queued without waiting for it.
        learned = to_device([sum(b.num_targets for b in micro)], self.device)
        if dist.is_initialized():
            dist.all_reduce(learned)
        self.normalizer = (learned[0] / (self.plan.grad_accum * self.process.world)).float()

    def loss(self, engine: Any, batch: Batch) -> torch.Tensor:
        return token_loss(engine(batch.inputs, positions=batch.positions, documents=batch.documents), batch.targets,
                          self.normalizer)

    def evaluate(self, engine: Any) -> dict[str, float]:
        total, count = 0.0, 0
        for batch in until_stopped(engine, self.val_batches()):
            batch = batch.to(self.device)
            total += float(token_loss(engine(batch.inputs), batch.targets, 1.0))
            count += batch.num_targets
        total, count = all_reduce([total, count], self.device)
        return {"val/loss": total / max(count, 1), "val/perplexity": perplexity(total / max(count, 1))}


class DPO(ChatObjective):
    """The preference loss of each pair against a frozen reference, averaged over the pairs of the global batch."""

    name = "dpo"

    def __init__(self, *args: Any, reference: LilLM | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference = reference  # None with LoRA: the policy with its adapters switched off
        self.flops_per_token *= 4 / 3  # and the reference's forward pass
        self.sums = dict.fromkeys(DPO_SUMS, 0.0)

    def reference_logps(self, engine: Any, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                logits = self.reference(batch.inputs)
            else:
                with adapters_disabled(engine.module):
                    logits = engine.module(batch.inputs)
            return sequence_logps(logits, batch.targets)[0]

    def terms(self, engine: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean preference loss of a micro-batch of pairs, and the sums the metrics are made of."""
        ref = self.reference_logps(engine, batch)
        logps, counts = sequence_logps(engine(batch.inputs), batch.targets)
        dpo = self.cfg.dpo
        if dpo.loss == "ipo":
            logps, ref = logps / counts, ref / counts
        n = logps.shape[0] // 2
        losses, r_c, r_r = preference_loss(logps[:n], logps[n:], ref[:n], ref[n:], dpo.beta, dpo.loss)
        sums = {"pairs": n, "loss": losses.detach().sum(), "accuracy": (r_c > r_r).sum(),
                "reward_margin": (r_c - r_r).sum(), "rewards_chosen": r_c.sum(), "rewards_rejected": r_r.sum(),
                "logps_chosen": logps[:n].detach().sum(), "logps_rejected": logps[n:].detach().sum()}
        # Float64 sums that stay on the device until a log or eval step reads them.
        return losses.mean(), {k: v if k == "pairs" else v.double() for k, v in sums.items()}

    def mean_scalars(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        totals = all_reduce([sums[k] for k in DPO_SUMS], self.device)
        return {f"{prefix}/{k}": v / max(totals[0], 1) for k, v in zip(DPO_SUMS[1:], totals[1:])}

    def loss(self, engine: Any, batch: Batch) -> torch.Tensor:
        loss, sums = self.terms(engine, batch)
        self.sums = {k: self.sums[k] + sums[k] for k in DPO_SUMS}
        return loss

    def window_scalars(self) -> dict[str, float]:
        out, self.sums = self.mean_scalars(self.sums, "dpo"), dict.fromkeys(DPO_SUMS, 0.0)
        return out

    def log_suffix(self, scalars: dict[str, float]) -> str:
        return f" | acc {scalars['dpo/accuracy']:.2f} | margin {scalars['dpo/reward_margin']:.3f}"

    def evaluate(self, engine: Any) -> dict[str, float]:
        sums = dict.fromkeys(DPO_SUMS, 0.0)  # all keys even on a rank without validation pairs
        for batch in until_stopped(engine, self.val_batches()):
            _, s = self.terms(engine, batch.to(self.device))
            sums = {k: sums[k] + s[k] for k in DPO_SUMS}
        return self.mean_scalars(sums, "val")


def load_start(init_from: str, **runtime: Any) -> tuple[LilLM, Tokenizer]:
    """The starting model (`runtime`: its constructor's options) and its tokenizer, which must carry the chat
    tokens."""
    model, tokenizer = load_model(init_from, **runtime)
    if tokenizer is None:
        raise UserError(f"{init_from}: no tokenizer stored with the model")
    if not tokenizer.has_chat_tokens:
        raise UserError(f"{init_from}: its tokenizer lacks the chat tokens (<|start_header_id|>, "
                        "<|end_header_id|>, <|eot_id|>); train one with `lillm train-tokenizer` and pretrain with it")
    return model, tokenizer


def task(cfg: PostTrainConfig, name: TaskName) -> Task:
    """Post-training's part of the run: the starting model (with LoRA adapters when asked) and its tokenizer,
    the conversations or pairs (checked before the process group exists), and the SFT or DPO objective."""
    train, lora, pairs = cfg.train, cfg.lora, name == "dpo"
    model, tokenizer = load_start(cfg.init_from, activation_checkpointing=train.activation_checkpointing,
                                  packed_attention=cfg.data.packed_attention)
    seq_len = resolve_seq_len(train, model.config.max_seq_len, "the model's max_seq_len")
    data = (load_preferences if pairs else load_sft)(cfg.data, tokenizer, seq_len)
    base_fp = base_fingerprint(model) if lora.enabled else None
    torch.manual_seed(train.seed)  # the adapters' initialisation: identical on every rank
    trainable = apply_lora(model, lora) if lora.enabled else model.num_params()
    reference = copy.deepcopy(model).eval().requires_grad_(False) if pairs and not lora.enabled else None
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id

    def make_objective(process: Process, plan: BatchPlan, engine: Any) -> ChatObjective:
        loader = ChatLoader(data.train, plan.micro_batch_size, process.rank, process.world, train.seed, seq_len,
                            pad_id, shuffle=cfg.data.shuffle, packing=cfg.data.packing, pairs=pairs)
        if reference is not None:
            reference.to(device=process.device, dtype=next(engine.module.parameters()).dtype)
        args = (cfg, data, loader, tokenizer, model, plan, process)
        return DPO(*args, reference=reference) if pairs else SFT(*args)

    def describe(trainer: Trainer) -> str:
        plan, stats, batches = trainer.plan, data.stats, max(1, trainer.objective.loader.batches_per_epoch)
        return (f"{name}: {trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters"
                + (f" (LoRA rank {lora.rank} on {','.join(lora.targets)})" if lora.enabled else "")
                + f"; {len(data.train):,} train / {len(data.val):,} val records ({stats['truncated']} truncated, "
                f"{stats['dropped_overlong']} dropped as over-long); micro batch {plan.micro_batch_size} x accum "
                f"{plan.grad_accum} x {plan.world_size} ranks; {plan.max_steps:,} steps = "
                f"{plan.max_steps * plan.grad_accum * plan.world_size / batches:.2f} epochs")

    identity = RunIdentity(name, model.config.to_dict(), tokenizer.fingerprint, dataclasses.asdict(train),
                           init_from=str(Path(cfg.init_from).resolve()),
                           lora=dataclasses.asdict(lora) if lora.enabled else None, base_fingerprint=base_fp)
    return Task(model, tokenizer, identity, seq_len, make_objective, describe)


def build(cfg: PostTrainConfig, config_yaml: str, name: TaskName) -> Trainer:
    """Everything a post-training run needs, restored from its checkpoint when resuming; `.fit()` trains."""
    raw_ds = load_ds_config(cfg.ds_config)  # a bad JSON path fails before the model is loaded
    return assemble(task(cfg, name), cfg.train, cfg.ds_config, raw_ds, config_yaml)


def main(name: TaskName, argv: list[str] | None = None) -> None:
    """Entry point of `lillm sft|dpo`, `python -m lillm.train.posttrain sft|dpo`, launch/sft.py and dpo.py."""
    run_training(name, lambda: build(*parse_config(name, argv), name).fit())


if __name__ == "__main__":
    import sys

    # The task is the first word; `deepspeed --module` puts its --local_rank=N before it.
    args = sys.argv[1:]
    tasks = [a for a in args if a in ("sft", "dpo")]
    if not tasks or any(not a.startswith("--local_rank") for a in args[: args.index(tasks[0])]):
        print("usage: python -m lillm.train.posttrain {sft,dpo} [options]  (--help after the task for options)",
              file=sys.stderr)
        sys.exit(2)
    args.remove(tasks[0])
    main(tasks[0], args)
