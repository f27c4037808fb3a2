"""Learning benchmark: how many tokens does lillm need to reach the loss of the best-tuned reference recipe?

    .venv/bin/python benchmarks/learning.py                         # d128, d256, d512; sweeps, then seed 2
    .venv/bin/python benchmarks/learning.py --widths d128 --seeds 1  # one width, the sweep only
    .venv/bin/python benchmarks/learning.py --quick                  # seconds: the smoke test's path
    .venv/bin/python benchmarks/learning.py --standard               # the essential points: 37 min cold on 2 cores
    .venv/bin/python benchmarks/learning.py --points d128-L4-b8k d256-L8-b16k   # any points of the ladder

Three arms, trained on the same single-pass corpus (the built-in `stdlib` source: every .py file of the
standard library, 9.1M train tokens with a 4096-token BPE; no run reads a window twice) at equal tokens. With
`--source pydoc --val_fraction 0.1` the corpus is the small built-in `pydoc` one (0.52M train tokens), which
a d128-L4-b8k run reads about 1.6 times, every arm in a fresh order each pass:
- reference: the recipe of the "little language model" project (a nanoGPT-derived loop) in plain PyTorch:
  windows in random order, fan-in init with small residual writes, torch AdamW defaults (betas 0.9/0.999,
  weight decay 0.01 on every parameter), clipping 1.0, warmup an eighth of the steps, cosine to lr / 10.
  It trains the same `LilLM` module, so only the recipe differs.
- lillm-muon, the shipped default: `python launch/pretrain.py` on one rank (DeepSpeed ZeRO-2, fp32, lillm's
  loader) with the training section of `launch/configs/debug.yaml` (optimizer muon: DeepSpeed's ZeRO Muon for
  the blocks' matrices, AdamW for the tied embedding and norms), its warmup and final lr at the same fractions
  of the run and of the peak; the sweep scales `--train.lr`, `--train.min_lr` and `--train.muon_lr` together.
- lillm-adamw: the same path and config with optimizer adamw (clipping 1.0), its lr swept.

The ladder: a point is a width at a depth (2, 4 or 8 layers) and a batch (4,096, 8,192 or 16,384 tokens per
optimizer step: micro 8 x seq 256, the accumulation grows), trained on the width's token budget (d128: 0.82M
tokens, so 200, 100 or 50 steps). `d128` alone names the width ladder's shape, depth 2 at 4,096 tokens.

Every arm gets its own best learning rate: at each width a sweep (seed 1, factors of 2) that must bracket
the optimum, extended by one point when the best sits at an end; then the best value of each arm runs with
the other seeds. Every model is scored by one function: loss and bits per byte over the first VAL_WINDOWS
windows of the val split, and its curve every eighth of the run on the first CURVE_WINDOWS.
Tokens-to-target: the fraction of the reference's tokens after which lillm's curve (linearly interpolated)
first reaches the reference's final curve loss, per seed, then averaged.

Results: a markdown table on stdout and benchmarks/results/learning-<host>.json; each run's row is kept in
--cache (default benchmarks/results/learning-runs/), so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lillm import LilLM, ModelConfig  # noqa: E402
from lillm.data.loader import ShardSet  # noqa: E402
from lillm.scoring import Score, byte_table, score_windows  # noqa: E402
from lillm.tokenizer import load_tokenizer  # noqa: E402
from lillm.train.recipe import BASE, RULES  # noqa: E402
from lillm.train.schedule import lr_at  # noqa: E402

MICRO_BATCH, GRAD_ACCUM, SEQ_LEN = 8, 2, 256  # 4,096 tokens per optimizer step, one rank
VOCAB = 4096
VAL_WINDOWS, CURVE_WINDOWS, CURVE_POINTS = 384, 64, 8
WIDTHS = {
    # Depth 2 and head_dim 32 at every width (lil-39m's head_dim), so that the ladder varies width alone.
    "d128": dict(model=dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32), steps=200),
    "d256": dict(model=dict(d_model=256, n_layers=2, n_heads=8, n_kv_heads=4, multiple_of=32), steps=120),
    "d512": dict(model=dict(d_model=512, n_layers=2, n_heads=16, n_kv_heads=8, multiple_of=128), steps=64),
}
ARMS = ("reference", "lillm-adamw", "lillm-muon")
# The sweep's starting points (learning rate, or for lillm-muon the factor on debug.yaml's lr and muon_lr).
GRIDS = {
    "reference": {"d128": [4e-3, 8e-3, 1.6e-2, 3.2e-2], "d256": [4e-3, 8e-3, 1.6e-2], "d512": [1e-3, 2e-3, 4e-3]},
    "lillm-adamw": {"d128": [8e-3, 1.6e-2, 3.2e-2], "d256": [4e-3, 8e-3, 1.6e-2], "d512": [1e-3, 2e-3, 4e-3]},
    "lillm-muon": {"d128": [0.5, 1.0, 2.0], "d256": [0.5, 1.0, 2.0], "d512": [0.5, 1.0, 2.0]},
}
REFERENCE = dict(min_lr_ratio=0.1, weight_decay=0.01, grad_clip=1.0, warmup_fraction=1 / 8)
DEPTHS, BATCHES = (2, 4, 8), (4096, 8192, 16384)  # the ladder's other axes: layers, tokens per optimizer step
STANDARD = ("d128", "d128-L4-b8k", "d256-L4-b8k")
CANDIDATES = ("no move", "width", "sqrt(batch)", "update RMS", "fitted")  # the rules ladder_rule compares
SHORT = 0.7  # the bar: the reference's final val loss in at most this fraction of its tokens
"""`--standard`: the width ladder's first point, the held-out setting (depth 4, 8,192 tokens per step) and the
same at the next width; reference and lillm-muon, one seed."""


@dataclass(frozen=True)
class Point:
    """One shape of the ladder: a width of WIDTHS at `depth` layers, `batch` tokens per optimizer step (micro
    batch x seq fixed, the accumulation grows), and the width's token budget (so steps = budget / batch)."""

    width: str
    depth: int = 2
    batch: int = MICRO_BATCH * GRAD_ACCUM * SEQ_LEN

    @property
    def name(self) -> str:
        """The width alone at the width ladder's shape (depth 2, 4,096 tokens per step), else e.g. d128-L4-b8k."""
        if (self.depth, self.batch) == (2, MICRO_BATCH * GRAD_ACCUM * SEQ_LEN):
            return self.width
        return f"{self.width}-L{self.depth}-b{self.batch // 1024}k"

    @property
    def accum(self) -> int:
        return self.batch // (MICRO_BATCH * SEQ_LEN)

    def steps(self, override: int = 0) -> int:
        return override or WIDTHS[self.width]["steps"] * MICRO_BATCH * GRAD_ACCUM * SEQ_LEN // self.batch

    def model(self) -> dict:
        return dict(WIDTHS[self.width]["model"], n_layers=self.depth)

    @classmethod
    def parse(cls, name: str) -> Point:
        width, *rest = name.split("-")
        depth = int(rest[0][1:]) if rest else 2
        batch = int(rest[1][1:-1]) * 1024 if len(rest) > 1 else MICRO_BATCH * GRAD_ACCUM * SEQ_LEN
        if width not in WIDTHS or depth not in DEPTHS or batch not in BATCHES or len(rest) not in (0, 2):
            raise argparse.ArgumentTypeError(f"{name}: a point is WIDTH or WIDTH-L<depth>-b<k tokens>k, e.g. "
                                             f"d128-L4-b8k (widths {', '.join(WIDTHS)}, depths {DEPTHS}, batches "
                                             f"{[b // 1024 for b in BATCHES]}k)")
        return cls(width, depth, batch)


def ensure_data(data_dir: Path, source: str = "stdlib", val_fraction: float = 0.03) -> None:
    """The benchmark corpus: a 4096-token BPE on `source`, val_fraction of its documents held out by hash."""
    if (data_dir / "manifest.json").is_file():
        return
    tok_dir = data_dir.with_name(data_dir.name + ".tokenizer")
    cli = [sys.executable, "-m", "lillm.cli"]
    if not (tok_dir / "tokenizer.json").is_file():
        subprocess.run([*cli, "train-tokenizer", source, str(tok_dir), "--vocab_size", str(VOCAB)], check=True,
                       cwd=REPO)
    subprocess.run([*cli, "prepare", source, str(tok_dir), str(data_dir), "--shard_tokens", "1048576",
                    "--val_fraction", str(val_fraction)], check=True, cwd=REPO)


def split_tokens(data_dir: Path, split: str) -> np.ndarray:
    """Every token of a split, shards concatenated in order (documents are already separated by EOS)."""
    shards = ShardSet(data_dir, split)
    return np.concatenate([np.asarray(m, dtype=np.int64) for m in shards.maps()])


def windows(tokens: np.ndarray, count: int) -> torch.Tensor:
    """The first `count` windows of seq_len + 1 tokens at stride seq_len: the layout of lillm's validation."""
    count = min(count, (len(tokens) - 1) // SEQ_LEN)
    return torch.from_numpy(np.stack([tokens[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1] for i in range(count)]))


def score(model: nn.Module, batch: torch.Tensor, table: torch.Tensor) -> Score:
    """The one scoring function of every arm: summed loss and bytes over `batch`'s windows, 16 at a time."""
    model.eval()
    total = Score()
    for i in range(0, len(batch), 16):
        total += score_windows(model, batch[i : i + 16], table)
    return total


def reference_init(model: LilLM) -> None:
    """The reference project's init: every Linear and the (tied) embedding ~ N(0, fan_in^-0.5), then the
    two projections that write the residual stream re-drawn at N(0, 0.02 / sqrt(2 * n_layers))."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=module.weight.shape[1] ** -0.5)
        for name, p in model.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * model.config.n_layers))


def curve_steps(steps: int) -> list[int]:
    """The steps at which curves are scored: every eighth of the run, the last step included."""
    return sorted({max(1, round(steps * k / CURVE_POINTS)) for k in range(1, CURVE_POINTS + 1)})


def reference_run(model_cfg: ModelConfig, train_tokens: np.ndarray, steps: int, seed: int, lr: float,
                  curve_batch: torch.Tensor, table: torch.Tensor, accum: int = GRAD_ACCUM
                  ) -> tuple[LilLM, list[list[float]]]:
    """The reference training loop (nanoGPT-style), fp32; windows drawn without replacement in random order, a
    fresh order each pass where the run reads the corpus more than once."""
    torch.manual_seed(seed)
    model = LilLM(model_cfg)
    reference_init(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=REFERENCE["weight_decay"])
    rng, count = np.random.default_rng(seed), (len(train_tokens) - 1) // SEQ_LEN
    passes = -(-steps * accum * MICRO_BATCH // count)
    starts = np.concatenate([rng.permutation(count) for _ in range(passes)]) * SEQ_LEN
    data = torch.from_numpy(train_tokens)
    warmup, at, curve = max(1, round(steps * REFERENCE["warmup_fraction"])), set(curve_steps(steps)), []
    for step in range(steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=lr, min_lr=lr * REFERENCE["min_lr_ratio"], warmup_steps=warmup,
                                max_steps=steps, schedule="cosine")
        for k in range(accum):
            first = (step * accum + k) * MICRO_BATCH
            x = torch.stack([data[s : s + SEQ_LEN + 1] for s in starts[first : first + MICRO_BATCH].tolist()])
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()) / accum
            loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), REFERENCE["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 in at:
            curve.append([step + 1, score(model, curve_batch, table).loss])
    return model, curve


def lillm_args(arm: str, lr: float, steps: int) -> list[str]:
    """The command-line options that make a lillm arm: debug.yaml's recipe (its warmup is a fraction of
    max_steps, so it keeps its share of the shorter run), min_lr at the same fraction of lr, one optimizer, one
    learning-rate setting."""
    base = debug_recipe()
    if arm == "lillm-adamw":
        return ["--train.optimizer", "adamw", "--train.grad_clip", "1.0", "--train.lr", str(lr),
                "--train.min_lr", str(lr * base["min_lr"] / base["lr"])]
    return ["--train.optimizer", "muon", "--train.grad_clip", "0", "--train.lr", str(base["lr"] * lr),
            "--train.min_lr", str(base["min_lr"] * lr), "--train.muon_lr", str(base["muon_lr"] * lr)]


def debug_recipe() -> dict:
    """The training section of the shipped launch/configs/debug.yaml."""
    import yaml

    return yaml.safe_load((REPO / "launch/configs/debug.yaml").read_text())["train"]


RUN_OPTIONS = ("run_dir", "micro_batch_size", "grad_accum", "seq_len", "max_steps", "seed", "eval_interval",
               "eval_batches", "sample_tokens", "ckpt_interval", "log_interval", "tensorboard", "keep_checkpoints")
"""Training options that lillm_run sets itself or that do not change what a run learns: they are not part of the
recipe a row measures."""


def recipe_tag() -> str:
    """A short hash of the recipe the lillm arms train with: debug.yaml's training section over lillm's defaults
    (the resolved TrainConfig), without RUN_OPTIONS. It is part of a lillm row's cache name, so rows of an
    earlier recipe, shipped in the YAML or in a default, are not reused as this one's."""
    from dataclasses import asdict

    from lillm.train.config import TrainConfig

    recipe = {k: v for k, v in asdict(TrainConfig(**debug_recipe())).items() if k not in RUN_OPTIONS}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:6]


def lillm_run(model_cfg: ModelConfig, arm: str, lr: float, data_dir: Path, steps: int, seed: int, run_dir: Path,
              threads: int, accum: int = GRAD_ACCUM, extra: str = "") -> tuple[LilLM, list[list[float]]]:
    """lillm's real path: `python launch/pretrain.py` on one rank (DeepSpeed engine + lillm loader), its val
    curve from metrics.jsonl (lillm's own evaluation of the first CURVE_WINDOWS windows), and the final model
    loaded as any lillm command loads it."""
    from lillm.loading import load_model

    at = curve_steps(steps)
    cmd = [sys.executable, "launch/pretrain.py", "--config", "launch/configs/debug.yaml",
           "--ds_config", "ds_configs/zero2_cpu.json", "--data.dir", str(data_dir), "--train.run_dir", str(run_dir),
           "--train.micro_batch_size", str(MICRO_BATCH), "--train.grad_accum", str(accum),
           "--train.seq_len", str(SEQ_LEN), "--train.max_steps", str(steps), "--train.seed", str(seed),
           "--train.eval_interval", str(at[0]),
           "--train.eval_batches", str(CURVE_WINDOWS // MICRO_BATCH), "--train.sample_tokens", "0",
           "--train.ckpt_interval", str(steps), "--train.log_interval", str(max(1, steps // 4)),
           "--train.tensorboard", "false", "--data.num_workers", "0", *lillm_args(arm, lr, steps), *shlex.split(extra)]
    for k, v in model_cfg.to_dict().items():
        cmd += [f"--model.{k}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"lillm run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [[r["step"], r["val/loss"]] for r in rows if "val/loss" in r and r["step"] in at]
    model, _ = load_model(run_dir)
    return model, curve


def run_one(name: str, arm: str, lr: float, seed: int, steps: int, data_dir: Path, threads: int,
            extra: str = "") -> dict:
    """Train one arm at one learning rate at one point of the ladder and score it."""
    point = Point.parse(name)
    steps = point.steps(steps)
    cfg = ModelConfig(vocab_size=VOCAB, max_seq_len=SEQ_LEN, max_batch_size=16, **point.model())
    torch.set_num_threads(threads)
    train_tokens, val_tokens = split_tokens(data_dir, "train"), split_tokens(data_dir, "val")
    table = byte_table(load_tokenizer(data_dir / "tokenizer").token_bytes(VOCAB))
    t0 = time.perf_counter()
    if arm == "reference":
        model, curve = reference_run(cfg, train_tokens, steps, seed, lr, windows(val_tokens, CURVE_WINDOWS), table,
                                     point.accum)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model, curve = lillm_run(cfg, arm, lr, data_dir, steps, seed, Path(tmp) / "run", threads, point.accum,
                                     extra)
    val = score(model, windows(val_tokens, VAL_WINDOWS), table)
    train_starts = np.linspace(0, (len(train_tokens) - 1) // SEQ_LEN - 1, 64).astype(np.int64) * SEQ_LEN
    train = score(model, torch.from_numpy(np.stack([train_tokens[s : s + SEQ_LEN + 1] for s in train_starts])), table)
    row = {"width": point.width, "point": name, "depth": point.depth, "batch": point.batch,
           "params": cfg.num_params(), "arm": arm, "lr": lr, "seed": seed, "steps": steps,
           "tokens": steps * point.batch, "val_loss": val.loss, "val_bpb": val.bits_per_byte,
           "train_loss": train.loss, "curve": curve, "seconds": time.perf_counter() - t0,
           "extra": extra if arm != "reference" else ""}
    print(f"   {name} {arm} lr {lr:g} seed {seed}: val {row['val_loss']:.4f} ({row['val_bpb']:.4f} bpb)  "
          f"train {row['train_loss']:.4f}  ({row['seconds']:.0f} s)", flush=True)
    return row


class Runner:
    """Runs (width, arm, lr, seed) tasks `jobs` at a time, each in a child process of this script; every row
    is cached as a JSON file, so a repeated or resumed benchmark runs only what it lacks."""

    def __init__(self, args: argparse.Namespace, threads: int) -> None:
        self.args, self.threads = args, threads
        self.cache = Path(args.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.recipe = recipe_tag()  # once: every lillm row's name carries it

    def path(self, task: tuple) -> Path:
        """A row's file; a task is (point, arm, lr, seed), or with a fifth item its own step count."""
        width, arm, lr, seed = task[:4]
        steps = task[4] if len(task) > 4 else Point.parse(width).steps(self.args.steps)
        variant = ""
        if arm != "reference":
            variant = "-r" + self.recipe  # a row trained by another shipped recipe is not this recipe's row
            if self.args.lillm_extra:  # a candidate change to the recipe: rows of its own
                variant += "-x" + hashlib.sha256(self.args.lillm_extra.encode()).hexdigest()[:8]
        return self.cache / f"{width}-{arm}{variant}-{lr:g}-s{seed}-{steps}.json"

    def run(self, tasks: list[tuple]) -> dict[tuple, dict]:
        """The rows of `tasks`, running those not cached yet (with --report: only the cached ones)."""
        todo = [] if self.args.report else [t for t in dict.fromkeys(tasks) if not self.path(t).is_file()]
        running: list[tuple] = []
        while todo or running:
            while todo and len(running) < self.args.jobs:
                task = todo.pop(0)
                width, arm, lr, seed = task[:4]
                steps = task[4] if len(task) > 4 else self.args.steps
                cmd = [sys.executable, __file__, "--one", f"{width}:{arm}:{lr!r}:{seed}", "--row_out",
                       str(self.path(task)), "--steps", str(steps), "--data", self.args.data,
                       f"--lillm_extra={self.args.lillm_extra}",
                       "--threads", str(self.threads)]
                print(f"== {width} {arm} lr {lr:g} seed {seed}", flush=True)
                running.append((subprocess.Popen(cmd), task))
            time.sleep(0.5)
            for proc, task in list(running):
                if proc.poll() is not None:
                    running.remove((proc, task))
                    if proc.returncode != 0:
                        raise SystemExit(f"a benchmark run failed: {task}")
        return {t: json.loads(self.path(t).read_text()) for t in tasks if self.path(t).is_file()}


def sweeps(runner: Runner, width: str, grids: dict[str, list[float]], seed: int, extend: int = 2
           ) -> dict[str, dict[float, dict]]:
    """Each arm's learning-rate sweep at one seed, all arms' runs sharing the job slots; while an arm's best value
    is at an end of its grid, one more point a factor of 2 beyond it (at most `extend` rounds)."""
    grids = {arm: sorted(grid) for arm, grid in grids.items()}
    for round_ in range(extend + 1):
        rows = runner.run([(width, arm, lr, seed) for arm, grid in grids.items() for lr in grid])
        out = {arm: {lr: rows[(width, arm, lr, seed)] for lr in grid if (width, arm, lr, seed) in rows}
               for arm, grid in grids.items()}
        out = {arm: points for arm, points in out.items() if points}
        grown = False
        for arm, grid in grids.items():
            if arm not in out or len(out[arm]) < len(grid):
                continue  # --report: a sweep that was not run (or not to its end)
            best = min(grid, key=lambda lr: out[arm][lr]["val_loss"])
            if round_ < extend and len(grid) > 1 and best in (grid[0], grid[-1]):
                grid.append(best / 2 if best == grid[0] else best * 2)
                grid.sort()
                grown = True
        if not grown:
            break
    return out


def tokens_to_target(curve: list[list[float]], target: float, tokens_per_step: int) -> float:
    """Tokens after which the curve, linearly interpolated from (0, ln(vocab)), first reaches `target`; inf when
    it never does."""
    points = [[0, math.log(VOCAB)], *curve]
    for (s0, l0), (s1, l1) in zip(points, points[1:]):
        if l1 <= target:
            frac = (l0 - target) / (l0 - l1) if l0 > l1 else 1.0
            return (s0 + frac * (s1 - s0)) * tokens_per_step
    return math.inf


def fitted_optimum(points: dict[float, float]) -> float:
    """The lr at the minimum of a parabola in log2(lr) through the best point of a sweep and its two neighbours
    (the best point itself when it sits at an end): the sweep's optimum between its factor-2 grid points."""
    lrs = sorted(points)
    i = min(range(len(lrs)), key=lambda k: points[lrs[k]])
    if i in (0, len(lrs) - 1):
        return lrs[i]
    x = np.log2(lrs[i - 1 : i + 2])
    a, b, _ = np.polyfit(x, [points[lr] for lr in lrs[i - 1 : i + 2]], 2)
    return float(2 ** np.clip(-b / (2 * a), x[0], x[2])) if a > 0 else lrs[i]


def width_rule(summary: dict) -> dict:
    """Per arm, the power law lr*(d) = lr*(128) x (d / 128)^-exponent fitted (least squares in log-log) to the
    sweeps' fitted optima at every measured width."""
    rule = {}
    for arm in ARMS:
        pts = [(int(w[1:]), s[arm]["fitted_lr"]) for w, s in summary.items() if arm in s and "-" not in w]
        if len(pts) < 2:
            continue
        slope, intercept = np.polyfit(np.log2([d / 128 for d, _ in pts]), np.log2([lr for _, lr in pts]), 1)
        rule[arm] = {"lr_at_128": float(2**intercept), "exponent": float(-slope), "points": pts}
    return rule


def axes(point: Point) -> list[float]:
    """A point's coordinates for the ladder rule: log2 of its width, depth and tokens per step over the rule's
    base shape (lillm/train/recipe.py's BASE)."""
    return [math.log2(int(point.width[1:]) / BASE["d_model"]), math.log2(point.depth / BASE["n_layers"]),
            math.log2(point.batch / BASE["tokens_per_step"])]


def ladder_rule(summary: dict, shipped_width_exponent: float | None = None) -> dict:
    """Per arm, which rule best predicts where its optimum sits across the ladder's points (width, depth, batch).

    The data are the sweeps' fitted optima at every point whose best grid value is bracketed. Each candidate
    predicts log2(lr*) up to one constant; the constant, and any exponent a candidate fits, is fitted on the
    other points (leave-one-out), so a rule with more free exponents gains nothing from fitting noise. Scored by
    the RMS of the held-out residuals in log2 units (1.0: off by a factor of 2, the sweep's grid step):
    - `no move`: the optimum stays where it is;
    - `width` (lillm/train/recipe.py's width term alone): lr* ~ width^e with the shipped e (for lillm-muon);
    - `sqrt(batch)` (nanochat's): the width term, and lr* ~ sqrt(tokens per step);
    - `update RMS` (Moonlight's, lillm-muon only): Muon's update RMS matched to AdamW's, so its lr follows the
      AdamW reference's optimum at the same point times sqrt(width) (DeepSpeed's Muon update has RMS
      1/sqrt(fan_in); Moonlight's, 0.2 at any shape);
    - `fitted`: exponents in width, depth and batch fitted by least squares (only the axes the data vary).
    Each candidate also reports its in-sample residuals (log2) with its constant fitted on every point, and that
    constant as `scale` (the optimum at the base point; for `update RMS`, the factor on the reference's).
    """
    out = {}
    for arm in ARMS:
        pts = [(Point.parse(n), s[arm]["fitted_lr"], s.get("reference", {}).get("fitted_lr"))
               for n, s in summary.items() if arm in s and s[arm]["bracketed"]]
        if len(pts) < 3:
            continue
        x = np.array([axes(p) for p, _, _ in pts])
        y = np.log2([lr for _, lr, _ in pts])
        varied = [k for k in range(3) if np.ptp(x[:, k]) > 0]
        fixed = {"no move": np.zeros(len(pts))}
        if arm == "lillm-muon" and shipped_width_exponent is not None:
            fixed["width"] = shipped_width_exponent * x[:, 0]
            fixed["sqrt(batch)"] = fixed["width"] + 0.5 * x[:, 2]
            if all(ref for _, _, ref in pts):
                fixed["update RMS"] = np.log2([ref for _, _, ref in pts]) + 0.5 * x[:, 0]
        candidates = {}
        for name, offset in fixed.items():  # one free constant
            held = [y[i] - offset[i] - np.mean(np.delete(y - offset, i)) for i in range(len(pts))]
            const = float(np.mean(y - offset))
            candidates[name] = {"loo_rms": float(np.sqrt(np.mean(np.square(held)))), "scale": float(2**const),
                                "residuals": {p.name: float(r) for (p, _, _), r in zip(pts, y - offset - const)}}
        design = np.column_stack([np.ones(len(pts)), x[:, varied]])
        if len(pts) > design.shape[1]:
            coef = np.linalg.lstsq(design, y, rcond=None)[0]
            held = []
            for i in range(len(pts)):
                keep = np.arange(len(pts)) != i
                c = np.linalg.lstsq(design[keep], y[keep], rcond=None)[0]
                held.append(y[i] - design[i] @ c)
            exps = {("width", "depth", "batch")[k]: float(c) for k, c in zip(varied, coef[1:])}  # axes the data vary
            residuals = {p.name: float(r) for (p, _, _), r in zip(pts, y - design @ coef)}
            candidates["fitted"] = {"loo_rms": float(np.sqrt(np.mean(np.square(held)))),
                                    "lr_at_base": float(2 ** coef[0]), "exponents": exps, "residuals": residuals}
        out[arm] = {"points": {p.name: lr for p, lr, _ in pts}, "candidates": candidates,
                    "best": min(candidates, key=lambda k: candidates[k]["loo_rms"])}
    return out


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}


def summarize(width: str, swept: dict[str, dict], finals: dict[str, list[dict]]) -> dict:
    """One width: each arm's sweep and best lr, val loss and bpb over seeds, and tokens-to-target against the
    reference, per seed pair."""
    out = {"sweeps": {arm: {f"{lr:g}": rows[lr]["val_loss"] for lr in rows} for arm, rows in swept.items()}}
    for arm, rows in finals.items():
        out[arm] = {"lr": rows[0]["lr"], "bracketed": rows[0]["lr"] not in (min(swept[arm]), max(swept[arm])),
                    "fitted_lr": fitted_optimum({lr: r["val_loss"] for lr, r in swept[arm].items()}),
                    "val_loss": spread([r["val_loss"] for r in rows]), "val_bpb": spread([r["val_bpb"] for r in rows]),
                    "train_loss": spread([r["train_loss"] for r in rows]), "params": rows[0]["params"],
                    "tokens": rows[0]["tokens"]}
    ref = {r["seed"]: r for r in finals.get("reference", [])}
    for arm, rows in finals.items():
        if arm == "reference" or not ref:
            continue
        fractions = [tokens_to_target(r["curve"], ref[r["seed"]]["curve"][-1][1], Point.parse(width).batch)
                     / ref[r["seed"]]["tokens"] for r in rows if r["seed"] in ref]
        out[arm]["tokens_to_target"] = spread(fractions) if fractions else None
    return out


def tables(summary: dict, rule: dict, ladder: dict) -> str:
    """The markdown tables: results at equal tokens, the sweeps, and the fitted rules (`width_rule` and
    `ladder_rule` of the same summary)."""
    lines = ["| point | params | tokens | arm | best lr (fitted) | val loss (min-max) | val bpb | seeds | "
             "tokens to reference's loss | at 0.70 of the tokens, own schedule |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for width, s in summary.items():
        for arm in ARMS:
            if arm not in s:
                continue
            a = s[arm]
            ttt = a.get("tokens_to_target")
            ttt_s = "-" if ttt is None else ("not reached" if math.isinf(ttt["mean"]) else f"{ttt['mean']:.2f}")
            sh = a.get("short")
            short_s = "-" if not sh else (f"{sh['val_loss']['mean']:.3f} vs {sh['target']:.3f}: "
                                          + ("reached" if sh["reached"] else "not reached"))
            lines.append(f"| {width} | {a['params'] / 1e6:.2f}M | {a['tokens'] / 1e6:.2f}M | {arm} | {a['lr']:g}"
                         f"{'' if a['bracketed'] else ' (edge)'} ({a['fitted_lr']:.3g}) | {a['val_loss']['mean']:.3f} "
                         f"({a['val_loss']['min']:.3f}-{a['val_loss']['max']:.3f}) | {a['val_bpb']['mean']:.4f} | "
                         f"{len(a['val_loss']['values'])} | {ttt_s} | {short_s} |")
    lines += ["", "| point | arm | sweep: lr -> val loss (seed 1) |", "|---|---|---|"]
    for width, s in summary.items():
        for arm, points in s["sweeps"].items():
            lines.append(f"| {width} | {arm} | " + ", ".join(f"{lr}: {v:.3f}" for lr, v in points.items()) + " |")
    if rule:
        lines += ["", "| arm | fitted lr* at d128 | exponent: lr* ~ d^-exponent |", "|---|---|---|"]
        lines += [f"| {arm} | {r['lr_at_128']:.3g} | {r['exponent']:.2f} |" for arm, r in rule.items()]
    if ladder:
        lines += ["", "Which rule predicts each arm's optimum across the points (RMS of leave-one-out residuals, "
                  "log2 units; fitted: lr* ~ width^a depth^b batch^c):", "",
                  "| arm | points | " + " | ".join(CANDIDATES) + " | fitted exponents (width, depth, batch) |",
                  "|---|---|" + "---|" * len(CANDIDATES) + "---|"]
        for arm, r in ladder.items():
            c = r["candidates"]
            cells = [f"{c[k]['loo_rms']:.2f}" + (" (best)" if k == r["best"] else "") if k in c else "-"
                     for k in CANDIDATES]
            fit = c.get("fitted")
            exps = "-" if not fit else ", ".join(f"{fit['exponents'][k]:+.2f}" if k in fit["exponents"] else "-"
                                                 for k in ("width", "depth", "batch"))
            lines.append(f"| {arm} | {len(r['points'])} | " + " | ".join(cells) + f" | {exps} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS),
                    help="Model widths to train at the width ladder's shape (depth 2, 4,096 tokens per step).")
    ap.add_argument("--points", nargs="+", type=lambda v: Point.parse(v).name, default=None,
                    help="Points of the ladder instead of --widths: WIDTH-L<depth>-b<k>k, e.g. d128-L4-b8k (depths "
                         f"{DEPTHS}, batches {[b // 1024 for b in BATCHES]}k tokens per step, each width's token "
                         "budget).")
    ap.add_argument("--standard", action="store_true",
                    help=f"The essential points ({', '.join(STANDARD)}), reference and lillm-muon, seed 1, "
                         "sweeps extended as in the full run: the developer's benchmark, under an hour on 2 cores.")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="Which recipes to run.")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2],
                    help="Seeds (init and data order); the sweep runs on the first.")
    ap.add_argument("--steps", type=int, default=0, help="Override every width's optimizer steps (0: its own).")
    ap.add_argument("--quick", action="store_true",
                    help="Smoke mode: d128, 4 steps, two grid points per arm, one seed, no extension.")
    ap.add_argument("--data", default=str(REPO / "data/stdlib"), help="Prepared shards (made here when missing).")
    ap.add_argument("--source", default="stdlib", help="Text source the corpus is prepared from when missing.")
    ap.add_argument("--val_fraction", type=float, default=0.03,
                    help="Share of the source's documents held out as the val split when the corpus is prepared "
                         "(a small corpus such as pydoc needs more than the default to fill the val windows).")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="Runs at a time, each in its own process; the cores are shared out among them.")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: cores // jobs).")
    ap.add_argument("--cache", default=str(REPO / "benchmarks/results/learning-runs"),
                    help="Directory of finished runs' rows (reused when the same run is asked again).")
    ap.add_argument("--out", default=str(REPO / f"benchmarks/results/learning-{platform.node()}.json"),
                    help="JSON written here.")
    ap.add_argument("--report", action="store_true",
                    help="Run nothing: report what --cache holds (a width or seed that was not run is left out).")
    ap.add_argument("--lillm_extra", default="",
                    help="Options appended to the lillm arms' command (a candidate recipe change, e.g. "
                         "'--train.warmup_fraction 0.1'); their rows are cached apart from the shipped recipe's.")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "width:arm:lr:seed", run by Runner children
    ap.add_argument("--row_out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    data_dir = Path(args.data)
    if args.one:
        width, arm, lr, seed = args.one.split(":")
        row = run_one(width, arm, float(lr), int(seed), args.steps, data_dir, threads, args.lillm_extra)
        Path(args.row_out).write_text(json.dumps(row))
        return
    if args.quick:
        args.widths, args.seeds, args.steps = ["d128"], args.seeds[:1], args.steps or 4
    points = args.points or list(args.widths)
    extend = 0 if args.quick else 2
    if args.standard:
        points, args.seeds, args.arms = list(STANDARD), args.seeds[:1], ["reference", "lillm-muon"]
    ensure_data(data_dir, args.source, args.val_fraction)
    n_train, n_val = (len(split_tokens(data_dir, split)) for split in ("train", "val"))
    print(f"corpus: {n_train:,} train tokens, {n_val:,} val tokens; {args.jobs} job(s) x {threads} thread(s)",
          flush=True)
    runner, summary, t0 = Runner(args, threads), {}, time.perf_counter()
    for width in points:
        grids = {arm: GRIDS[arm][Point.parse(width).width][: 2 if args.quick else None] for arm in args.arms}
        swept = sweeps(runner, width, grids, args.seeds[0], extend=extend)
        best = {arm: min(rows, key=lambda lr: rows[lr]["val_loss"]) for arm, rows in swept.items()}
        rows = runner.run([(width, arm, best[arm], seed) for arm in best for seed in args.seeds])
        finals = {arm: [rows[(width, arm, best[arm], seed)] for seed in args.seeds if (width, arm, best[arm], seed)
                        in rows] for arm in best}
        if not finals:
            continue
        summary[width] = summarize(width, swept, finals)
        if not args.quick and "reference" in finals:  # each lillm arm on SHORT of the tokens, its own schedule
            short = round(SHORT * Point.parse(width).steps(args.steps))
            shorts = runner.run([(width, arm, best[arm], seed, short) for arm in best if arm != "reference"
                                 for seed in args.seeds])
            target = statistics.fmean(r["val_loss"] for r in finals["reference"])
            for arm in best:
                got = [shorts[t]["val_loss"] for t in shorts if t[1] == arm]
                if arm != "reference" and got:
                    summary[width][arm]["short"] = {"steps": short, "fraction": SHORT, "val_loss": spread(got),
                                                    "target": target, "reached": statistics.fmean(got) <= target}
    out = Path(args.out)
    if out.is_file():  # widths measured by an earlier invocation stay in the report
        summary = {**{w: v for w, v in json.loads(out.read_text()).get("summary", {}).items() if w not in summary},
                   **summary}
        summary = {w: summary[w] for w in sorted(summary, key=lambda w: (Point.parse(w).width != w, w))}
    rule, ladder = width_rule(summary), ladder_rule(summary, RULES["muon"]["width"])
    table = tables(summary, rule, ladder)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\nmean over seeds {args.seeds}; val: the first {VAL_WINDOWS} val windows of {SEQ_LEN} tokens; "
          f"{minutes:.1f} min wall time for what ran now ({args.jobs} job(s))\n\n{table}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "processor": platform.processor(), "threads": threads,
                               "jobs": args.jobs, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                               "minutes": minutes, "points": points, "budget": {
                                   "micro_batch": MICRO_BATCH, "grad_accum": GRAD_ACCUM, "seq_len": SEQ_LEN,
                                   "val_windows": VAL_WINDOWS, "curve_windows": CURVE_WINDOWS},
                               "widths": WIDTHS, "grids": GRIDS, "reference": REFERENCE, "summary": summary,
                               "width_rule": rule, "table": table, "ladder_rule": ladder}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
