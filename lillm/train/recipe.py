"""How the peak learning rates move with model width: the rule `benchmarks/learning.py` fitted, in one place.

    lr*(d_model) = lr*(128) x (d_model / 128) ** -exponent

The benchmark sweeps each recipe's learning rate by factors of 2 at d_model 128, 256 and 512 (depth 2, head_dim
32, 4,096 tokens per step, seq 256, one pass over the built-in `stdlib` corpus), takes each sweep's optimum
from a parabola through its best three points, and fits the power law through the optima
(docs/learning-quality.md has the sweeps). For Muon the rule moves `muon_lr` and AdamW's `lr` (tied embedding,
norms) by the same factor; `min_lr` stays at MIN_LR_RATIO of `lr`.

The shipped pretraining configs take their learning rates from `width_lrs` (a test checks every YAML). For
lil-39m and lil-300m this is a prediction: the rule was measured at 4,096 tokens per step and at most 200
steps, and those runs take 524,288 tokens per step for 15,259 steps. `benchmarks/gpu_check.sh` (step
lr_rule) runs lil-39m at 0.5x, 1x and 2x of it on a GPU to confirm or correct it.
"""

from __future__ import annotations

BASE_WIDTH = 128
MIN_LR_RATIO = 0.3
"""min_lr / lr: the cosine ends at 0.3 of the peak (measured at d128 with Muon, warmup 50 of 200 steps: val
loss 4.580 against 4.611 at 0.1 of the peak; decaying to 0 lost 0.075 at warmup 25)."""
RULES: dict[str, dict[str, float]] = {
    # Peak learning rates at d_model 128 (the best grid point there), and the exponent of their fall with width
    # fitted through the sweeps' optima at d128, d256 and d512 (Muon: 0.20; AdamW: 1.32, into which the ladder's
    # shorter runs at larger widths are mixed).
    "muon": {"muon_lr": 0.04, "lr": 0.048, "exponent": 0.20},
    "adamw": {"lr": 0.016, "exponent": 1.32},
}


def width_lrs(d_model: int, optimizer: str = "muon") -> dict[str, float]:
    """The peak (and final) learning rates of a `d_model`-wide model trained with `optimizer`, by the rule,
    rounded to 3 significant digits as the shipped YAML files write them."""
    rule = RULES[optimizer]
    scale = (d_model / BASE_WIDTH) ** -rule["exponent"]
    out = {k: float(f"{v * scale:.3g}") for k, v in rule.items() if k != "exponent"}
    out["min_lr"] = float(f"{out['lr'] * MIN_LR_RATIO:.3g}")
    return out
