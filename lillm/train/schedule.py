"""Learning-rate schedules: a pure function of the step, so resuming needs only the step."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str,
          decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup over warmup_steps (the first step gets lr / warmup_steps, not 0), then: cosine or linear
    decay reaching min_lr exactly at the last step; 'wsd' holds lr and decays linearly to min_lr over the
    final decay_fraction of the steps; 'constant' holds lr.
    """
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    last = max_steps - 1
    if schedule == "wsd":
        decay_start = max(warmup_steps, last - int(decay_fraction * max_steps))
        if step <= decay_start:
            return lr
        frac = (step - decay_start) / max(1, last - decay_start)
        return lr + (min_lr - lr) * min(frac, 1.0)
    frac = min(1.0, (step - warmup_steps) / max(1, last - warmup_steps))
    if schedule == "linear":
        return lr + (min_lr - lr) * frac
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule {schedule!r}")


def apply_lr(optimizer, step: int, train, max_steps: int) -> float:
    """Set every parameter group's lr for `step` from the training config's schedule; returns the AdamW lr.
    Muon's groups (optimizer muon) follow the same schedule scaled to their own peak, train.muon_lr."""
    lr = lr_at(step, lr=train.lr, min_lr=train.min_lr, warmup_steps=train.warmup_for(max_steps), max_steps=max_steps,
               schedule=train.schedule, decay_fraction=train.decay_fraction)
    for group in optimizer.param_groups:
        group["lr"] = lr * train.muon_lr / train.lr if group.get("use_muon") else lr
    return lr
