"""LoRA: low-rank adapters on the linear layers, a frozen base, adapter-only saves, and merging.

A wrapped layer computes W x + (alpha / r) * B A dropout(x) with W frozen, A (r x in) drawn like a
default nn.Linear and B (out x r) zero, so training starts exactly at the base model. The wrapper keeps
the base weight under its original name (`layers.0.attention.wq.weight`), which is why a base state dict
loads into an adapted model unchanged and why the adapter is just the `lora_a`/`lora_b` tensors.

An adapter belongs to one base: `base_fingerprint` (a hash of every base weight) is stored with it and
checked before it is applied, so an adapter is never silently merged into another model.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lillm.config import nonfinite_fields
from lillm.errors import UserError

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoRAConfig:
    """Low-rank adapters; rank 0 trains every weight instead."""

    rank: int = 0
    """Adapter rank r; 0 disables LoRA (full fine-tuning)."""
    alpha: float = 16.0
    """Scale numerator: the adapter's output is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layers to adapt, by Meta name: wq, wk, wv, wo (attention), w1, w2, w3 (feed-forward)."""

    def __post_init__(self) -> None:
        problems = nonfinite_fields(self)
        if self.rank < 0:
            problems.append(f"rank must be >= 0, got {self.rank}")
        if self.alpha <= 0:
            problems.append(f"alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            problems.append(f"targets must be a non-empty subset of {list(LORA_TARGETS)}, got {self.targets}")
        if problems:
            raise ValueError("invalid LoRAConfig: " + "; ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class LoRALinear(nn.Module):
    """A frozen nn.Linear (bias-free) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        out_features, in_features = base.weight.shape
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, **kw))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **kw))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # what nn.Linear does for its weight
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.adapter_enabled:
            y = y + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale
        return y

    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight is W + scale * B A (computed in fp32)."""
        w = self.weight.float() + self.scale * (self.lora_b.float() @ self.lora_a.float())
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        return lin


def _targets(model: nn.Module, cls: type, names: list[str]) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    for parent in model.modules():
        for name, child in parent.named_children():
            if name in names and isinstance(child, cls):
                yield parent, name, child


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> int:
    """Wrap the target layers in place and freeze everything else; returns the trainable parameter count.

    Draws A from torch's global RNG: seed it identically on every rank.
    """
    wrapped = 0
    for parent, name, child in list(_targets(model, nn.Linear, cfg.targets)):
        setattr(parent, name, LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout))
        wrapped += 1
    if not wrapped:
        raise UserError(f"LoRA: no linear layer named {cfg.targets} in the model")
    for pname, p in model.named_parameters():
        p.requires_grad_("lora_" in pname)
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        # A tied output weight is the (frozen) embedding under a second name, which named_parameters() skips;
        # leave it out of state dicts too, or "exclude frozen parameters" saves would still carry it.
        model.register_state_dict_post_hook(_drop_tied_output)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _drop_tied_output(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict.pop(prefix + "output.weight", None)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in place); the model becomes a plain LilLM again."""
    for parent, name, child in list(_targets(model, LoRALinear, list(LORA_TARGETS))):
        setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, by their full parameter names."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load adapter tensors into an adapted model; every adapter must be present with its shape."""
    own = lora_state_dict(model)
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise UserError(f"{source}: the adapter does not fit this model (missing {missing[:3]}, extra {extra[:3]}); "
                        "was it trained with other LoRA targets or rank?")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise UserError(f"{source}: adapter tensor {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone (DPO's reference model, when the policy is base + adapter)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.adapter_enabled = True


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and fp32 bytes of every non-adapter weight."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name or name == "output.weight" and getattr(model.config, "tie_embeddings", False):
            continue
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
