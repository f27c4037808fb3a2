"""Scoring text under a model: summed negative log-likelihood over targets, and bits per byte.

Loss per token depends on the tokenizer: a vocabulary that cuts text into longer tokens has fewer, harder
targets. Bits per byte does not: the nats summed over the scored targets, divided by ln 2 and by the UTF-8
bytes those targets decode to, is the code length of the text itself, the kind of figure other projects
report and that two tokenizers can be compared by. Special tokens decode to no bytes; their nats stay in
the sum (predicting where a document ends is part of coding the text). nanochat's `evaluate_bpb` leaves
them out of both sums instead, which gives slightly lower figures on corpora of short documents.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Score:
    """Sums over scored targets: natural-log loss, target count, and the UTF-8 bytes the targets stand for."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0

    def __add__(self, other: Score) -> Score:
        return Score(self.nats + other.nats, self.tokens + other.tokens, self.bytes + other.bytes)

    @property
    def loss(self) -> float:
        """Mean nats per target token."""
        return self.nats / max(self.tokens, 1)

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.nats, self.bytes)


def bits_per_byte(nats: float, num_bytes: float) -> float:
    """Summed nats as bits per UTF-8 byte of the text they score (NaN when there are no bytes)."""
    return nats / (math.log(2) * num_bytes) if num_bytes > 0 else float("nan")


def byte_table(token_bytes: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """A tokenizer's `token_bytes()` as an int64 lookup table on `device`."""
    return torch.tensor(list(token_bytes), dtype=torch.int64, device=device)


@torch.no_grad()
def score_windows(model: torch.nn.Module, windows: torch.Tensor, table: torch.Tensor) -> Score:
    """Score a batch of (B, T + 1) token windows: every token after the first is a target of the tokens
    before it. `table` is `byte_table(tokenizer.token_bytes(vocab))` on the model's device."""
    logits = model(windows[:, :-1])
    targets = windows[:, 1:]
    nats = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    return Score(float(nats), targets.numel(), int(table[targets].sum()))
