"""Training configuration: typed dataclasses whose docstrings become `--help` text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lillm.config import nonfinite_fields
from lillm.errors import UserError
from lillm.files import strict_yaml_load, use_strict_yaml

MAX_WEIGHT = 1e9  # weights are relative; a bound keeps their sums finite


@dataclass
class SourceConfig:
    """One prepared dataset of a mixture."""

    dir: str
    """Directory written by `lillm prepare`; every source of a mixture must use the same tokenizer."""
    weight: float = 1.0
    """Share of the training windows read from this source (weights are normalised; with data.stages, what
    the total validation loss is weighted by)."""


@dataclass
class StageConfig:
    """A part of the run with its own mixture."""

    until_step: int
    """The step at which this stage ends (the next one, if any, starts there)."""
    weights: dict[str, float]
    """Weight of each source (by its name in data.sources) during the stage; a source left out has weight 0."""


@dataclass
class DataConfig:
    """Where the token shards are and how they are read."""

    dir: str = "data/pydoc"
    """Directory written by `lillm prepare` (holds manifest.json and the tokenizer); unused when data.sources
    is set."""
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    """A mixture: name -> {dir, weight}, e.g. {web: {dir: data/owt, weight: 0.8}, code: {dir: data/code,
    weight: 0.2}}; each training position reads one source, in proportion to the weights, and each source's
    validation split is scored on its own (val/<name>/loss, val/<name>/bpb)."""
    stages: list[StageConfig] = field(default_factory=list)
    """With data.sources: the mixture changes at steps, e.g. [{until_step: 800, weights: {web: 0.8, code: 0.2}},
    {until_step: 1000, weights: {web: 0.5, code: 0.5}}]; in order, the last ending at or before max_steps (its
    mixture then goes on to the end). Empty: the sources' weights throughout."""
    shuffle: bool = True
    """Shuffle windows each epoch (deterministically, by seed and epoch); false reads in order."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 reads in the training process)."""
    verify: bool = False
    """Check every shard's sha256 against the manifest before training: once per run, the ranks sharing the
    pass; the result is recorded in the run directory (data-verified.json) and a resume on unchanged shards
    reuses it."""
    allow_changed: bool = False
    """Resume even though the shards' bytes differ from those the checkpoint was trained on (a resume checks a
    digest of the manifest and of a few sampled KB per shard, and refuses a change); the stream keeps its
    position."""

    def __post_init__(self) -> None:
        problems = []
        if self.num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {self.num_workers}")
        names = list(self.sources)
        for name, src in self.sources.items():
            if not isinstance(name, str) or not name or "/" in name:
                problems.append(f"sources: {name!r} is not a usable source name (a non-empty string without '/')")
            if not math.isfinite(src.weight) or not 0 <= src.weight <= MAX_WEIGHT:
                problems.append(f"sources.{name}.weight must be a number from 0 to {MAX_WEIGHT:g}, got {src.weight}")
        if self.sources and not problems and not any(s.weight > 0 for s in self.sources.values()):
            problems.append("the weights of data.sources sum to 0: give at least one source a positive weight")
        if self.stages and not self.sources:
            problems.append("stages need data.sources (the weights name sources)")
        previous = 0
        for k, stage in enumerate(self.stages if self.sources else []):
            where = f"stages[{k}]"
            if stage.until_step <= previous:
                problems.append(f"{where}.until_step={stage.until_step} must be after "
                                + (f"the previous stage's ({previous}): stages go in order" if k else "step 0"))
            previous = max(previous, stage.until_step)
            for name, w in stage.weights.items():
                if name not in self.sources:
                    problems.append(f"{where}.weights names {name!r}, which is not a source (sources: "
                                    f"{', '.join(names) or 'none'})")
                elif not math.isfinite(w) or not 0 <= w <= MAX_WEIGHT:
                    problems.append(f"{where}.weights.{name} must be a number from 0 to {MAX_WEIGHT:g}, got {w}")
            if not stage.weights or all(math.isfinite(w) and w == 0 for w in stage.weights.values()):
                problems.append(f"{where}.weights sum to 0: give at least one source a positive weight")
        if problems:
            raise ValueError("invalid DataConfig: " + "; ".join(problems))

    def mixture(self) -> list[tuple[int, dict[str, float]]]:
        """The stages as (end step, {source: weight}), the sources' weights as one stage when none are given."""
        if self.stages:
            return [(s.until_step, {n: float(s.weights.get(n, 0.0)) for n in self.sources}) for s in self.stages]
        return [(0, {n: s.weight for n, s in self.sources.items()})]


@dataclass
class TrainConfig:
    """Optimisation, batch arithmetic, schedule, evaluation, checkpointing and logging."""

    run_dir: str = "runs/debug"
    """Directory for checkpoints, TensorBoard events and the resolved config."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward pass."""
    grad_accum: int = 0
    """Micro-batches accumulated per optimizer step; 0 derives it from global_batch_tokens."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step across all ranks; 0 derives it from grad_accum."""
    seq_len: int = 0
    """Tokens per training sequence; 0 uses the model's max_seq_len."""
    max_steps: int = 0
    """Optimizer steps to train; 0 derives them from max_tokens."""
    max_tokens: int = 0
    """Token budget, used when max_steps is 0."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """'adamw': AdamW for every parameter. 'muon': DeepSpeed's ZeRO Muon for the blocks' matrices (attention
    and feed-forward projections, orthogonalised momentum) and AdamW at `lr` for the rest (embedding, tied
    output, norms); needs grad_clip 0."""
    lr: float = 6e-4
    """Peak learning rate of AdamW (with optimizer muon: of the embedding, output and norms)."""
    muon_lr: float = 0.02
    """With optimizer muon: peak learning rate of the blocks' matrices; the schedule scales it like lr."""
    muon_momentum: float = 0.95
    """With optimizer muon: Muon's (Nesterov) momentum."""
    muon_weight_decay: float = 0.0
    """With optimizer muon: decoupled weight decay of the Muon matrices (per step, p -= lr x wd x p)."""
    min_lr: float = 6e-5
    """Learning rate at the end of the decay."""
    warmup_steps: int | None = None
    """Linear warmup steps from 0 to lr. When set (0: no warmup), it wins over warmup_fraction."""
    warmup_fraction: float = 0.1
    """Linear warmup as a fraction of max_steps (rounded, at least 1 step when > 0), used when warmup_steps is
    unset: a run made longer or shorter with --train.max_steps keeps its schedule's shape."""
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to min_lr at the last step, warmup-stable-decay, or constant."""
    decay_fraction: float = 0.2
    """For wsd: the final fraction of steps over which lr decays linearly to min_lr."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not norms)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""
    seed: int = 1337
    """Seed of weight initialisation, data order and sampling."""
    log_interval: int = 10
    """Steps between console lines and TensorBoard scalars."""
    eval_interval: int = 250
    """Steps between validation runs (and a text sample); 0 disables."""
    eval_batches: int = 20
    """Validation micro-batches per evaluation, in total (split across ranks; the same set at any world size)."""
    eval_tasks: list[str] = field(default_factory=list)
    """Tasks of `lillm eval` scored at every evaluation besides the validation loss, e.g. [bpb:pydoc,
    pydoc-continuation, hellaswag:data/hellaswag.jsonl]; items split across ranks, results as eval/TASK/METRIC."""
    eval_task_limit: int = 0
    """Items per evaluation task (documents for bpb); 0: all of them."""
    sample_prompt: str = "The"
    """Prompt of the text sample generated at evaluation time."""
    sample_tokens: int = 48
    """Tokens of the evaluation-time text sample; 0 disables samples."""
    ckpt_interval: int = 1000
    """Steps between checkpoints (one is always written at the end and on SIGTERM/SIGINT)."""
    keep_checkpoints: int = 3
    """Most recent checkpoints to keep; older ones are deleted."""
    resume: str = "auto"
    """'auto' (latest in run_dir, if any), 'none', a checkpoint tag, or a checkpoint path."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    compile: bool | None = None
    """torch.compile the model; default: on with CUDA, off on CPU (where it did not pay at the quickstart's
    shape, see docs/performance.md). A graph that fails to compile runs eagerly, with a warning."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s per device for MFU; 0 detects A100/H100/H200 (bf16) and skips MFU elsewhere."""
    max_bad_steps: int = 0
    """Micro-batches with a NaN/inf loss (on any rank) to skip before stopping; 0 stops at the first. A skipped
    micro-batch adds no gradient on the rank that had it."""
    watchdog_s: float = 600.0
    """End the job, naming the rank that stopped, when a rank makes no progress for this long, or for 20x the
    slowest step, evaluation or save measured so far if that is longer (a rank stopped or hung would otherwise
    hold the others in a collective forever); 0 disables."""
    tensorboard: bool = True
    """Write TensorBoard events under run_dir/tensorboard/<run_dir's name>."""
    verbose: bool = False
    """Show what the ranks' libraries say that lillm hides by default: torch.distributed's deprecation
    warnings raised from DeepSpeed's calls, and DeepSpeed's line on loading its CPU op."""

    def __post_init__(self) -> None:
        problems = nonfinite_fields(self)
        for name in ("micro_batch_size", "log_interval", "eval_batches", "ckpt_interval", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("grad_accum", "global_batch_tokens", "seq_len", "max_steps", "max_tokens", "warmup_steps",
                     "eval_interval", "sample_tokens", "max_bad_steps", "eval_task_limit"):
            if (getattr(self, name) or 0) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and self.max_tokens == 0:
            problems.append("set max_steps or max_tokens")
        if self.watchdog_s < 0:
            problems.append(f"watchdog_s must be >= 0 (0 disables), got {self.watchdog_s}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            problems.append(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if not 0 <= self.warmup_fraction < 1:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.decay_fraction <= 1:
            problems.append(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.muon_weight_decay < 0:
            problems.append("grad_clip, weight_decay and muon_weight_decay must be >= 0")
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1:
            problems.append(f"need muon_lr > 0 and 0 <= muon_momentum < 1, got muon_lr={self.muon_lr} "
                            f"muon_momentum={self.muon_momentum}")
        if self.optimizer == "muon" and self.muon_lr * self.muon_weight_decay >= 1:
            problems.append(f"muon_weight_decay={self.muon_weight_decay} with muon_lr={self.muon_lr} shrinks the Muon "
                            f"matrices by {self.muon_lr * self.muon_weight_decay:.3g} of themselves per step at the "
                            "peak (p -= lr x decay x p; it must stay below 1)")
        if self.optimizer == "muon" and self.grad_clip:
            problems.append(f"grad_clip={self.grad_clip} with optimizer muon: set train.grad_clip 0 (DeepSpeed's "
                            "ZeRO Muon clips the orthogonalised updates together with the gradients, which "
                            "would shrink every step by the number of matrices)")
        existing = Path(self.run_dir)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            problems.append(f"run_dir {self.run_dir}: {existing} is a file, not a directory")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def warmup_for(self, max_steps: int) -> int:
        """The run's warmup steps: warmup_steps when set, else warmup_fraction of max_steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, round(self.warmup_fraction * max_steps)) if self.warmup_fraction > 0 else 0


@dataclass
class BatchPlan:
    """The resolved batch arithmetic of a run."""

    micro_batch_size: int
    seq_len: int
    grad_accum: int
    world_size: int
    max_steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.seq_len * self.grad_accum * self.world_size


def plan_batches(train: TrainConfig, seq_len: int, world_size: int) -> BatchPlan:
    """Global batch = micro x seq_len x accumulation x world size; derive and check whichever is missing."""
    per_micro = train.micro_batch_size * seq_len * world_size
    accum = train.grad_accum
    if train.global_batch_tokens:
        if train.global_batch_tokens % per_micro:
            raise UserError(
                f"global_batch_tokens={train.global_batch_tokens} is not a multiple of micro_batch_size x seq_len x "
                f"world_size = {train.micro_batch_size} x {seq_len} x {world_size} = {per_micro}"
            )
        derived = train.global_batch_tokens // per_micro
        if accum and accum != derived:
            raise UserError(
                f"grad_accum={accum} disagrees with global_batch_tokens={train.global_batch_tokens} "
                f"(which needs grad_accum={derived} at world size {world_size})"
            )
        accum = derived
    accum = accum or 1
    steps = train.max_steps or math.ceil(train.max_tokens / (per_micro * accum))
    return BatchPlan(train.micro_batch_size, seq_len, accum, world_size, steps)


def resolve_seq_len(train: TrainConfig, max_seq_len: int, limit_name: str) -> int:
    """train.seq_len, or the model's max_seq_len when it is 0; refused above the model's limit."""
    seq_len = train.seq_len or max_seq_len
    if seq_len > max_seq_len:
        raise UserError(f"train.seq_len={seq_len} exceeds {limit_name}={max_seq_len}")
    return seq_len


PACKAGE = Path(__file__).resolve().parents[1]
SHIPPED = {"ds_config": (PACKAGE / "ds_configs", ".json"), "config": (PACKAGE / "configs", ".yaml")}


def shipped_file(value: str, kind: Literal["ds_config", "config"]) -> str:
    """A path as given, or the name of a config shipped with lillm (`zero2`, `debug`, `sft-debug` ...) as the
    path of that file, so an installed lillm runs from any directory."""
    if Path(value).exists() or "/" in value or value.startswith("."):
        return value
    folder, suffix = SHIPPED[kind]
    found = folder / (value if value.endswith(suffix) else value + suffix)
    if found.is_file():
        return str(found)
    names = ", ".join(sorted(f.stem for f in folder.glob("*" + suffix)))
    raise UserError(f"--{kind} {value}: no such file, and not a config shipped with lillm ({names})")


def resolve_shipped(argv: list[str], shipped: bool = True) -> list[str]:
    """argv with `--config NAME` made a path (jsonargparse opens the file while parsing; `shipped=False` takes
    paths only), each config file checked for a key written twice first, so that the refusal names the file."""
    def resolve(value: str) -> str:
        return check_yaml_file(shipped_file(value, "config") if shipped else value)

    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve(arg.split("=", 1)[1])
    return out


def check_yaml_file(path: str) -> str:
    """`path`, after refusing a YAML file that names a key twice (one line naming the file, key and lines);
    other problems with the file are jsonargparse's to report."""
    import yaml

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return path
    try:
        strict_yaml_load(text)
    except yaml.constructor.ConstructorError as e:
        if "duplicate key" in str(e.problem):
            raise UserError(f"{path}: {e.problem}") from None
    except yaml.YAMLError:
        pass
    return path


def new_parser(prog: str, description: str, config_help: str):
    """A training script's jsonargparse parser: `--config FILE.yaml`, `--ds_config` and the launcher's
    `--local_rank`; the dataclass sections added later take their `--help` text from the one-line docstrings
    under each field."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    use_strict_yaml()
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help=config_help)
    parser.add_argument("--ds_config", type=str, default="auto",
                        help="DeepSpeed JSON, by path or by the name of a shipped one (zero2, zero2_cpu, zero2_fp16, "
                             "zero2_offload); 'auto': the deepspeed_config_file of `accelerate launch --config_file` "
                             "when launched by it, else zero2 with CUDA and zero2_cpu without. Batch, lr and "
                             "clipping keys may be \"auto\" (filled from --train).")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher; not for users.")
    return parser


def parse(parser, argv: list[str] | None) -> tuple:
    """(namespace, its YAML rendering, instantiated dataclasses); invalid values become a UserError."""
    import sys

    from jsonargparse import ArgumentError

    try:
        ns = parser.parse_args(resolve_shipped(sys.argv[1:] if argv is None else argv))
    except ArgumentError as e:  # a parse error: one line, not the whole usage
        raise UserError(" ".join(str(e).split()) + f" (see {parser.prog} --help)") from None
    return instantiate(parser, ns)


def instantiate(parser, ns) -> tuple:
    """(namespace, its YAML rendering, instantiated dataclasses) of a parsed namespace; a dataclass that refuses
    its values (`__post_init__`) becomes a UserError."""
    try:
        return ns, parser.dump(ns, skip_none=False), parser.instantiate_classes(ns)
    except ValueError as e:
        raise UserError(str(e)) from None
