"""Model configuration: one typed dataclass, validated in one place, with named presets."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from lillm.errors import UserError


def nonfinite_fields(cfg: Any) -> list[str]:
    """A problem for each float field of a dataclass (or float inside a tuple/list field) that is NaN or
    infinite. Comparisons with NaN are all false, so range checks alone let NaN through."""
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            problems.append(f"{f.name} must be a finite number, got {value!r}")
    return problems


@dataclass
class ModelConfig:
    """Shape of a Llama-3-style decoder. Defaults are the reference `lil-39m` model."""

    vocab_size: int | None = 8192
    """Number of token ids the embedding table holds (at least the tokenizer's vocabulary). Pretraining
    leaves it unset (null) by default and takes the vocabulary of its data's tokenizer."""
    d_model: int = 512
    """Width of the residual stream."""
    n_layers: int = 12
    """Number of transformer blocks."""
    n_heads: int = 16
    """Number of query heads."""
    n_kv_heads: int = 8
    """Number of key/value heads (grouped-query attention); must divide n_heads."""
    ffn_hidden_dim: int = 0
    """SwiGLU hidden size; 0 derives it as 2/3 * 4 * d_model rounded up to `multiple_of`."""
    multiple_of: int = 128
    """Rounding granularity of the derived SwiGLU hidden size."""
    norm_eps: float = 1e-6
    """Epsilon of RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    max_seq_len: int = 512
    """Longest sequence the model attends over (training windows and KV cache length)."""
    max_batch_size: int = 32
    """Largest batch of prompts the KV cache is sized for."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the output projection."""
    init_std: float = 0.02
    """Initialisation scale of the residual-writing projections (wo, w2), divided by sqrt(2 * n_layers); the
    other matrices and the embedding are drawn with the fan-in std d_model**-0.5 (see LilLM.init_weights)."""
    head_dim: int = field(init=False, default=0)
    """Derived: d_model // n_heads."""

    def __post_init__(self) -> None:
        problems = nonfinite_fields(self)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "max_batch_size"):
            if name == "vocab_size" and self.vocab_size is None:
                continue  # to be filled from the data (pretraining); a model cannot be built until it is
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.multiple_of <= 0:
            problems.append(f"multiple_of must be positive, got {self.multiple_of}")
        if self.ffn_hidden_dim < 0:
            problems.append(f"ffn_hidden_dim must be >= 0 (0 derives it), got {self.ffn_hidden_dim}")
        if self.norm_eps <= 0:
            problems.append(f"norm_eps must be positive, got {self.norm_eps}")
        if self.rope_theta <= 0:
            problems.append(f"rope_theta must be positive, got {self.rope_theta}")
        if self.init_std <= 0:
            problems.append(f"init_std must be positive, got {self.init_std}")
        if self.n_heads > 0 and self.d_model > 0:
            if self.d_model % self.n_heads:
                problems.append(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
            elif (self.d_model // self.n_heads) % 2:
                problems.append(f"head_dim={self.d_model // self.n_heads} is odd; rotary embeddings need an even one")
        if self.n_kv_heads > 0 and self.n_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        self.head_dim = self.d_model // self.n_heads
        if self.ffn_hidden_dim == 0:
            hidden = int(2 * 4 * self.d_model / 3)
            self.ffn_hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset, optionally with some fields replaced."""
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments (derived fields left out), JSON-serializable."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def num_params(self) -> int:
        """Parameter count from the shapes alone (tied embeddings counted once)."""
        d, h = self.d_model, self.ffn_hidden_dim
        kv = self.n_kv_heads * self.head_dim
        attn = d * d * 2 + d * kv * 2
        block = attn + 3 * d * h + 2 * d
        emb = self.vocab_size * d
        return emb * (1 if self.tie_embeddings else 2) + self.n_layers * block + d

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 x non-embedding matmul parameters + attention (PaLM appendix B).

        The output projection counts (it is a matmul even when tied); the embedding lookup does not.
        Attention scores and values add 12 x layers x d_model x seq_len (forward + backward, causal
        masking ignored, as is customary).
        """
        t = seq_len or self.max_seq_len
        matmul = self.num_params() - self.d_model * (2 * self.n_layers + 1)  # minus norm weights
        if not self.tie_embeddings:
            matmul -= self.vocab_size * self.d_model  # the untied input table is a lookup, not a matmul
        return 6.0 * matmul + 12.0 * self.n_layers * self.d_model * t


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized, for tests and CI: about 1.8M parameters.
    "debug": dict(
        vocab_size=8192, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32,
        max_seq_len=256, max_batch_size=16,
    ),
    # The reference "little language model": exactly 39,596,544 parameters.
    "lil-39m": dict(),
    # The reference's larger run.
    "lil-300m": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8, max_seq_len=1024),
}
