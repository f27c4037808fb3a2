"""The training loss, kept out of the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_loss(logits: torch.Tensor, targets: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Sum of token cross-entropies (targets == -100 ignored) divided by `normalizer`.

    Exact averaging under gradient accumulation and data parallelism: DeepSpeed divides each micro-batch
    loss by the accumulation steps and averages gradients over ranks, so pass
    normalizer = (valid tokens in the whole global batch) / (grad_accum x world_size). When every
    micro-batch is full (pretraining) that is simply the micro-batch's token count: the mean.
    """
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss / normalizer
