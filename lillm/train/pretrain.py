"""Pretraining with a DeepSpeed engine: `deepspeed launch/pretrain.py --ds_config ... --config ...`.

One process per device (or CPU rank). Each rank builds the same model from the same seed, registers it
with `deepspeed.initialize` (ZeRO-2 partitions optimizer state and gradients), reads its share of the
global data stream, and steps in lockstep (`lillm.train.loop`). The objective is next-token prediction on
full windows of the token shards.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from lillm.config import ModelConfig
from lillm.data.loader import PretrainLoader, ShardSet, validation_windows, verify_once
from lillm.data.prepare import read_manifest
from lillm.errors import UserError
from lillm.generate import SamplingConfig, generate
from lillm.model import LilLM
from lillm.runs import DATA_VERIFIED, tensorboard_hint
from lillm.scoring import Score, byte_table, score_windows
from lillm.tokenizer import Tokenizer, load_tokenizer
from lillm.train.assemble import Task, assemble
from lillm.train.checkpoint import RunIdentity
from lillm.train.config import BatchPlan, DataConfig, TrainConfig, new_parser, parse, plan_batches, resolve_seq_len
from lillm.train.dist import Process, all_reduce, launched_world_size, run_training
from lillm.train.ds_config import load_ds_config, resolve_ds_config
from lillm.train.loop import Objective, Trainer, perplexity, until_stopped
from lillm.train.loss import token_loss


@dataclasses.dataclass
class RunConfig:
    """Everything a pretraining run is made of."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    ds_config: str = "zero2"
    """The resolved DeepSpeed JSON path."""


def build_parser():
    parser = new_parser("pretrain.py", "Pretrain a lillm model with DeepSpeed (ZeRO-2).",
                        "YAML file with model/data/train sections.")
    parser.add_class_arguments(ModelConfig, "model", help="Model shape (defaults: the lil-39m reference model, "
                               "with the vocabulary of the data's tokenizer).")
    parser.set_defaults({"model.vocab_size": None})
    parser.add_class_arguments(DataConfig, "data", help="Token shards.")
    parser.add_class_arguments(TrainConfig, "train", help="Training.")
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[RunConfig, str]:
    """Parse command line and YAML into a RunConfig; returns it with its YAML rendering."""
    return run_config(*parse(build_parser(), argv))


def run_config(ns: Any, yaml: str, init: Any) -> tuple[RunConfig, str]:
    """The RunConfig of a parse of `build_parser()` (`lillm.train.config.parse` or `instantiate`), with its YAML."""
    ds_config = resolve_ds_config(ns.ds_config)
    return RunConfig(model=init.model, data=init.data, train=init.train, ds_config=ds_config), yaml


class LanguageModeling(Objective):
    """Next-token cross-entropy on full windows: each micro-batch's mean is its share of the step's mean."""

    name = "pretrain"

    def __init__(self, loader: PretrainLoader, val_shards: dict[str, ShardSet], tokenizer: Tokenizer,
                 model_cfg: ModelConfig, train: TrainConfig, plan: BatchPlan, process: Process,
                 val_weights: dict[str, float] | None = None) -> None:
        """`val_shards`: the validation split of each source by name ('' for a single data.dir); with several,
        each is scored on its own and the total is weighted by `val_weights`."""
        self.loader, self.tokenizer, self.model_cfg = loader, tokenizer, model_cfg
        self.train, self.plan, self.process, self.device = train, plan, process, process.device
        self.val_shards = {name: v for name, v in val_shards.items() if int(v.tokens.sum()) > plan.seq_len}
        for name in val_shards:
            if name and name not in self.val_shards:
                process.log.warning(f"source {name!r}: its val split ({val_shards[name].data_dir}) is shorter than "
                                    "one window; it is not scored, and val/loss weighs the other sources")
        weights = {name: (val_weights or {}).get(name, 1.0) for name in self.val_shards}
        if sum(weights.values()) <= 0:  # only sources of weight 0 (used in stages) have a val split: equal weights
            weights = dict.fromkeys(weights, 1.0)
        self.val_weights = {name: w / sum(weights.values()) for name, w in weights.items()}
        self.has_validation = bool(self.val_shards)
        self.flops_per_token = model_cfg.flops_per_token(plan.seq_len)
        self.normalizer = plan.micro_batch_size * plan.seq_len  # every window is full: the micro-batch mean
        self.byte_table = byte_table(tokenizer.token_bytes(model_cfg.vocab_size), self.device)

    def num_tokens(self, batch: torch.Tensor) -> int:
        return batch[:, :-1].numel()

    def loss(self, engine: Any, batch: torch.Tensor) -> torch.Tensor:
        return token_loss(engine(batch[:, :-1]), batch[:, 1:], self.normalizer)

    def window_scalars(self) -> dict[str, float]:
        scalars = {"train/epoch": self.loader.epoch}
        for name, (windows, epochs) in self.loader.source_progress().items():
            scalars[f"train/tokens/{name}"] = windows * self.plan.seq_len
            scalars[f"train/epoch/{name}"] = epochs
        return scalars

    def evaluate(self, engine: Any) -> dict[str, float]:
        """Mean loss, perplexity and bits per byte over the fixed validation windows (summed over ranks). With
        several sources, each source's (val/<name>/loss, val/<name>/bpb) and their weighted mean as the total."""
        scores = {}
        for name, shards in self.val_shards.items():
            score = Score()
            windows = validation_windows(shards, self.plan.seq_len, self.plan.micro_batch_size,
                                         self.train.eval_batches, self.process.rank, self.process.world)
            for batch in until_stopped(engine, windows):
                score += score_windows(engine, batch.to(self.device), self.byte_table)
            scores[name] = Score(*all_reduce([score.nats, score.tokens, score.bytes], self.device))
        if list(scores) == [""]:
            total = scores[""]
            return {"val/loss": total.loss, "val/perplexity": perplexity(total.loss), "val/bpb": total.bits_per_byte}
        loss = sum(self.val_weights[n] * s.loss for n, s in scores.items())
        out = {"val/loss": loss, "val/perplexity": perplexity(loss),
               "val/bpb": sum(self.val_weights[n] * s.bits_per_byte for n, s in scores.items())}
        for name, score in scores.items():
            out[f"val/{name}/loss"] = score.loss
            out[f"val/{name}/bpb"] = score.bits_per_byte
        return out

    def sample(self, model: LilLM) -> str:
        prompt = self.train.sample_prompt
        ids = generate(model, [self.tokenizer.prompt_ids(prompt)],
                       SamplingConfig(max_new_tokens=self.train.sample_tokens, temperature=0.8, top_k=50,
                                      seed=self.train.seed), stop_ids=[self.tokenizer.eos_id])[0]
        return prompt + self.tokenizer.decode(ids)

    def hparams(self) -> dict[str, Any]:
        return {f"model.{k}": v for k, v in self.model_cfg.to_dict().items()}

    def done_hint(self) -> str:
        per_source = [f"val/{name}/loss" for name in self.val_shards if name]
        return tensorboard_hint(self.train.run_dir, ["train/loss", "val/loss", "val/bpb", *per_source])


def model_for_data(model_cfg: ModelConfig, data_vocab: int, data_dir: str) -> ModelConfig:
    """The model shape with the data's vocabulary where model.vocab_size is unset; a set one must hold every
    id of the data's tokenizer (a larger one only pads the embedding table)."""
    if model_cfg.vocab_size is None:
        return dataclasses.replace(model_cfg, vocab_size=data_vocab)
    if data_vocab > model_cfg.vocab_size:
        raise UserError(f"the tokenizer of {data_dir} has {data_vocab} tokens but model.vocab_size is "
                        f"{model_cfg.vocab_size}: drop --model.vocab_size (and the config's model.vocab_size) to "
                        f"use the data's, or set it to {data_vocab}")
    return model_cfg


def sources(data: DataConfig) -> dict[str, str]:
    """The run's prepared directories by source name: data.sources, or {'': data.dir}."""
    return {name: src.dir for name, src in data.sources.items()} or {"": data.dir}


def check_mixture(data: DataConfig, dirs: dict[str, str], max_steps: int) -> None:
    """A mixture's sources share one tokenizer, and its stages end within the run."""
    first, first_tok = "", None
    for name, d in dirs.items():
        tok = read_manifest(d)["tokenizer"]
        if first_tok is None:
            first, first_tok = d, tok
        elif tok["fingerprint"] != first_tok["fingerprint"] or tok["vocab_size"] != first_tok["vocab_size"]:
            raise UserError(f"data.sources: {first} and {d} were prepared with different tokenizers (vocab "
                            f"{first_tok['vocab_size']}, fingerprint {first_tok['fingerprint'][:12]}; vocab "
                            f"{tok['vocab_size']}, fingerprint {tok['fingerprint'][:12]}): a mixture needs one "
                            f"tokenizer, so prepare {name!r} again with the other's")
    if data.stages and data.stages[-1].until_step > max_steps:
        raise UserError(f"data.stages[{len(data.stages) - 1}].until_step={data.stages[-1].until_step} is past the "
                        f"run's last step ({max_steps:,}): end the last stage at or before max_steps")


def task(cfg: RunConfig) -> Task:
    """Pretraining's part of the run: the token shards (checked before the process group exists), a freshly
    initialised model, and its objective."""
    train = cfg.train
    dirs = sources(cfg.data)
    for d in dirs.values():
        read_manifest(d)  # a directory that is not prepared data says so before its tokenizer is missed
    first_dir = next(iter(dirs.values()))
    tokenizer = load_tokenizer(Path(first_dir) / "tokenizer")
    model_cfg = model_for_data(cfg.model, tokenizer.vocab_size, first_dir)
    seq_len = resolve_seq_len(train, model_cfg.max_seq_len, "model.max_seq_len")
    check_mixture(cfg.data, dirs, plan_batches(train, seq_len, launched_world_size()).max_steps)
    train_shards = {n: ShardSet(d, "train", tokenizer=tokenizer) for n, d in dirs.items()}  # sizes; --data.verify
    val_shards = {n: ShardSet(d, "val") for n, d in dirs.items()}                           # hashes with the ranks
    torch.manual_seed(train.seed)
    model = LilLM(model_cfg, activation_checkpointing=train.activation_checkpointing)
    model.init_weights()
    mixed = bool(cfg.data.sources)

    def make_objective(process: Process, plan: BatchPlan, engine: Any) -> LanguageModeling:
        loader = PretrainLoader(train_shards if mixed else train_shards[""], plan.seq_len, plan.micro_batch_size,
                                process.rank, process.world, seed=train.seed, shuffle=cfg.data.shuffle,
                                num_workers=cfg.data.num_workers, pin_memory=process.device.type == "cuda",
                                allow_changed=cfg.data.allow_changed,
                                stages=cfg.data.mixture() if mixed else None,
                                windows_per_step=plan.micro_batch_size * plan.grad_accum * plan.world_size,
                                say=process.log.info)
        val_weights = {n: s.weight for n, s in cfg.data.sources.items()}
        return LanguageModeling(loader, val_shards, tokenizer, model_cfg, train, plan, process, val_weights)

    def describe(trainer: Trainer) -> str:
        plan, loader = trainer.plan, trainer.objective.loader
        mixture = ""
        if loader.schedule is not None:
            shares = ", ".join(f"{n} {s:.3g}" for n, s in loader.schedule.shares(loader.global_position).items())
            later = sum(s.until_step > loader.step[0] for s in cfg.data.stages) - 1
            stages = f" then {later} more stage(s)" if later > 0 else ""
            mixture = f"; mixture of {len(dirs)} sources: {shares}{stages}"
        return (f"pretraining: {model.num_params():,} parameters; micro batch {plan.micro_batch_size} x seq "
                f"{plan.seq_len} x accum {plan.grad_accum} x {plan.world_size} = {plan.tokens_per_step:,} "
                f"tokens/step; {plan.max_steps:,} steps ({plan.max_steps * plan.tokens_per_step:,} tokens); "
                f"{loader.num_windows:,} windows per epoch{mixture}; data position {loader.global_position:,} "
                "windows")

    def check_data(process: Process) -> None:
        def gather(problem: str) -> list[str]:
            if not torch.distributed.is_initialized():
                return [problem]
            out: list[Any] = [None] * process.world
            torch.distributed.all_gather_object(out, problem)
            return out

        for name, d in dirs.items():
            record = Path(train.run_dir) / (DATA_VERIFIED if not mixed else f"data-verified-{name}.json")
            process.log.info(verify_once(d, record, process.rank, process.world, gather))

    identity = RunIdentity("pretrain", model_cfg.to_dict(), tokenizer.fingerprint, dataclasses.asdict(train))
    return Task(model, tokenizer, identity, seq_len, make_objective, describe,
                check_data if cfg.data.verify else None)


def build(cfg: RunConfig, config_yaml: str) -> Trainer:
    """Everything a pretraining run needs, restored from its checkpoint when resuming; `.fit()` trains."""
    raw_ds = load_ds_config(cfg.ds_config)  # a bad JSON path fails before the shards are read
    return assemble(task(cfg), cfg.train, cfg.ds_config, raw_ds, config_yaml)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `lillm pretrain`, `python -m lillm.train.pretrain` and launch/pretrain.py."""
    run_training("pretrain", lambda: build(*parse_config(argv)).fit())


if __name__ == "__main__":
    main()
