"""The training loss, kept out of the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lillm.data.examples import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "preference_loss", "sequence_logps", "token_loss"]


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


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its target tokens (IGNORE_INDEX skipped), and their count."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view(targets.shape)  # (B, T), 0 where ignored
    return -nll.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO (sigmoid) or IPO loss from sequence log-probabilities; also the implicit rewards.

    sigmoid: -log sigmoid(beta * h), h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)).
    ipo:     (h - 1 / (2 beta))^2, with log-probabilities averaged per token (pass them averaged).
    Rewards are beta * (log pi(y) - log ref(y)) for the chosen and the rejected reply.
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss_type!r}")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
