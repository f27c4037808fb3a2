"""Where the peak learning rates sit for a model's width, depth and batch: the rule `benchmarks/learning.py`
measured, in one place.

    lr*(d_model, n_layers, tokens_per_step) = lr*(BASE)
        x (d_model / 128) ** width x (n_layers / 2) ** depth x (tokens_per_step / 4,096) ** batch

BASE is the benchmark's d128 shape: d_model 128, 2 layers, head_dim 32, 4,096 tokens per optimizer step, seq
256, one pass over the built-in `stdlib` corpus. The benchmark sweeps each recipe's learning rate by factors
of 2 at every point of its ladder (widths 128/256/512; depths 2/4/8 and 4,096/8,192/16,384 tokens per step at
d128 and d256), takes each sweep's optimum from a parabola through its best three points, and asks which rule
predicts the optima it did not see (`ladder_rule`: leave-one-out residuals). docs/learning-quality.md has the
sweeps, the fit and its residuals.

For Muon the rule moves `muon_lr` and AdamW's `lr` (tied embedding, norms) by the same factor; `min_lr` stays
at MIN_LR_RATIO of `lr`, and the warmup is WARMUP_FRACTION of the run.

The shipped pretraining configs take their learning rates from `rule_lrs` (a test checks every YAML). For
lil-39m and lil-300m the rule is a prediction: it was measured at up to 16,384 tokens per step, 8 layers and
400 steps, and those runs take 524,288 tokens per step, 12 or 24 layers and 15,259 or 38,147 steps.
`benchmarks/gpu_check.sh` (step lr_rule) runs lil-39m at 0.5x, 1x and 2x of it on a GPU to confirm or correct
it. The rule has no term for the run's length: at 4x the tokens Muon's optimum fell to 0.71x, but a power law
through two horizons would cut lil-39m's rates 13x, which no peer's long runs support. The measured lever across
horizons is Muon's weight decay (`train.muon_weight_decay`), which the recipe does not use yet.
"""

from __future__ import annotations

BASE = {"d_model": 128, "n_layers": 2, "tokens_per_step": 4096}
MIN_LR_RATIO = 0.3
"""min_lr / lr: the cosine ends at 0.3 of the peak (measured at d128 with Muon, warmup 50 of 200 steps: val
loss 4.580 against 4.611 at 0.1 of the peak; decaying to 0 lost 0.075 at warmup 25)."""
WARMUP_FRACTION = 0.25
"""Warmup as a share of max_steps in every shipped pretraining config: with Muon at d128 a quarter beat an eighth
at 200 steps (4.611 against 4.627) and a sixteenth at 400 steps (3.720 against 3.781, the 100-step run's 25
warmup steps): a warmup that keeps its share of a longer run beats one that keeps its length."""
RULES: dict[str, dict] = {
    # Peak learning rates at BASE (the best grid point there) and the exponents of the rule. Muon: the width
    # exponent fitted through the width ladder's optima (d128, d256, d512); depth and batch measured on the
    # ladder's other axes, where the optimum did not move beyond the sweeps' noise (docs/learning-quality.md).
    # AdamW: width exponent fitted on the width ladder, into which its shorter runs at larger widths are mixed;
    # its depth and batch terms were not measured (lillm-adamw is not on those axes), so they stay 0.
    "muon": {"rates": {"muon_lr": 0.04, "lr": 0.048}, "width": -0.20, "depth": 0.0, "batch": 0.0},
    "adamw": {"rates": {"lr": 0.016}, "width": -1.32, "depth": 0.0, "batch": 0.0},
}


def rule_factor(d_model: int, n_layers: int, tokens_per_step: int, optimizer: str = "muon") -> float:
    """How far the rule moves `optimizer`'s learning rates from BASE for this shape."""
    rule = RULES[optimizer]
    return ((d_model / BASE["d_model"]) ** rule["width"] * (n_layers / BASE["n_layers"]) ** rule["depth"]
            * (tokens_per_step / BASE["tokens_per_step"]) ** rule["batch"])


def rule_lrs(d_model: int, n_layers: int, tokens_per_step: int, optimizer: str = "muon") -> dict[str, float]:
    """The peak (and final) learning rates of a model of this shape trained with `optimizer`, by the rule,
    rounded to 3 significant digits as the shipped YAML files write them."""
    scale = rule_factor(d_model, n_layers, tokens_per_step, optimizer)
    out = {k: float(f"{v * scale:.3g}") for k, v in RULES[optimizer]["rates"].items()}
    out["min_lr"] = float(f"{out['lr'] * MIN_LR_RATIO:.3g}")
    return out
