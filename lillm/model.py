"""The lillm model: a Llama-3-style decoder on one screen.

Order of the file: RMSNorm -> rotary embeddings -> KV cache -> masks of packed rows -> Attention -> FeedForward ->
Block -> LilLM.
Parameter names follow Meta's Llama reference (`tok_embeddings`, `layers.{i}.attention.wq`, ...), so the
mapping onto transformers' `LlamaForCausalLM` keys is one-to-one (see `lillm.hf`).

Rotary embeddings use the "rotate half" layout (the first half of each head's dimensions pairs with the
second half), which is what transformers' Llama computes. Meta's checkpoints pair adjacent dimensions
instead and need a permutation of wq/wk on conversion; lillm trains in the half layout, so export and
import are plain renames.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from lillm.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalising in bf16 loses most of the mantissa of small activations; upcast for the reduction.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (max_seq_len, head_dim), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (L, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (L, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, head_dim) by position; cos/sin are (T, head_dim) or (B, T, head_dim)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys and values for every layer: (n_layers, batch, n_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, config: ModelConfig, batch_size: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (config.n_layers, batch_size, config.n_kv_heads, config.max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_heads, T, head_dim) at start_pos; return everything cached so far."""
        end = start_pos + k.shape[2]
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv_heads, end, head_dim)


def _compiled(fn):
    # Compiled on first use: importing the compiler takes seconds that generation and data commands never need.
    # Eager, flex_attention materialises the (B, H, T, T) scores and create_block_mask the (B, 1, T, T) mask.
    # Packed batches change length from step to step: the second length seen compiles for every length.
    # Inside a compiled model the function itself is traced into the model's graph.
    return fn if torch.compiler.is_compiling() else _compile(fn)


@functools.cache
def _compile(fn):
    return torch.compile(fn)


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask from per-token document ids (B, T): causal within each document. Padding
    (document -1) attends to padding only, so its outputs stay finite."""
    T = documents.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    same = documents[:, :, None] == documents[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]  # (B, 1, T, T)


def document_block_mask(documents: torch.Tensor) -> BlockMask:
    """`document_mask` as flex attention's BlockMask: which 128 x 128 tiles to compute, never a (T, T) tensor."""

    def same_document_causal(b, h, q, kv):
        return (documents[b, q] == documents[b, kv]) & (q >= kv)

    B, T = documents.shape
    return _compiled(create_block_mask)(same_document_causal, B, None, T, T, device=documents.device)


@torch.compiler.disable
@functools.cache
def flex_unavailable(device_type: str, dtype: torch.dtype, n_heads: int, n_kv_heads: int, head_dim: int,
                     backward: bool) -> str | None:
    """Why compiled flex attention fails here (forward, and backward when asked), or None when it runs.

    Tried once per process and kind, on two tiny packed rows; a failure (no compiler, no kernel for this
    device or dtype, no backward on CPU) is logged as one warning line, and packed rows fall back to the
    dense mask.
    """
    try:
        documents = torch.tensor([[0] * 100 + [1] * 100, [0] * 150 + [-1] * 50], device=device_type)  # (2, 200)
        # Laid out as Attention lays them out; ones, not random numbers: the probe leaves training's RNG alone.
        q, k, v = (torch.ones(2, 200, n, head_dim, device=device_type, dtype=dtype, requires_grad=backward)
                   .transpose(1, 2) for n in (n_heads, n_kv_heads, n_kv_heads))  # (2, heads, 200, head_dim)
        out = _compiled(flex_attention)(q, k, v, block_mask=document_block_mask(documents),
                                        enable_gqa=n_kv_heads != n_heads)
        if backward:
            out.sum().backward()
        return None
    except Exception as e:  # whatever the compiler or the kernel raises: the dense mask always works
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        logging.getLogger("lillm").warning(f"flex attention unavailable ({reason}); packed rows use a dense mask")
        return reason


class Attention(nn.Module):
    """Grouped-query self-attention through PyTorch's fused scaled_dot_product_attention, or flex attention when
    packed rows bring a BlockMask."""

    def __init__(self, layer_id: int, config: ModelConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int = 0,
        mask: torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v, start_pos)  # (B, n_kv_heads, S, head_dim)
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(mask, BlockMask):
            out = _compiled(flex_attention)(q, k, v, block_mask=mask, enable_gqa=gqa)  # (B, n_heads, T, head_dim)
        else:
            # Without an explicit mask, a multi-token call is causal and a single-token decode step sees
            # everything cached: no mask tensor is ever built on the pretraining path.
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=gqa
            )  # (B, n_heads, T, head_dim)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, d_model)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden_dim, config.d_model, bias=False)
        self.w3 = nn.Linear(config.d_model, config.ffn_hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + ffn(norm(.))."""

    def __init__(self, layer_id: int, config: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(layer_id, config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int = 0,
        mask: torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LilLM(nn.Module):
    """Token ids (B, T) in, logits (B, T, vocab_size) out. The loss lives in `lillm.train.loss`."""

    def __init__(self, config: ModelConfig, *, activation_checkpointing: bool = False,
                 packed_attention: Literal["auto", "flex", "dense"] = "auto") -> None:
        """`config` is the shape (what checkpoints record); the other two are how this instance computes, which
        changes no result: memory (activation checkpointing) and the kernel for packed rows."""
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is unset: set it, or let pretraining take the data's")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(i, config) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        # Not persistent: derived from the config, so checkpoints carry weights only.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = activation_checkpointing
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.packed_attention = packed_attention
        """How packed rows (`documents`) attend: 'flex' (compiled flex attention, block-sparse, no (T, T) mask),
        'dense' (SDPA with a boolean (B, 1, T, T) mask), 'auto' (flex on CUDA, dense elsewhere)."""

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fan-in-scaled normal init, with small projections into the residual stream.

        Every matrix that reads the residual stream (wq, wk, wv, w1, w3) and the token embedding, which is
        also the output projection when tied, is drawn from N(0, d_model^-0.5): unit-variance outputs for
        unit-variance (normed) inputs, so the tied output starts with logits of standard deviation ~1. The
        two projections that write the residual stream (wo, w2) are drawn from N(0, init_std / sqrt(2 *
        n_layers)) (GPT-2's depth scaling: each block adds two residual writes), so every block starts close
        to the identity.

        Chosen by measurement (docs/learning-quality.md): with AdamW at the debug shape, N(0, 0.02) for every
        matrix ends 0.44 nats worse (val loss 5.314 against 4.874, 240 steps of 8,192 tokens); at 0.02 the tied
        output starts with logits of std 0.02 * sqrt(d_model), and Adam's roughly lr-sized steps are then large
        relative to every weight. Under Muon (the shipped recipe) the two inits end within 0.03 nats.

        Kept out of `__init__` so the model can be built on the meta device (or by a sharding engine) and
        initialised afterwards; draws from torch's global RNG, which the trainer seeds.
        """
        self.tie_weights()  # `to_empty` (after meta-device construction) gives each module its own tensor
        fan_in_std = self.config.d_model**-0.5
        nn.init.normal_(self.tok_embeddings.weight, std=fan_in_std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.output.weight, std=fan_in_std)
        residual_std = self.config.init_std / (2 * self.config.n_layers) ** 0.5
        for layer in self.layers:
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.feed_forward.w1,
                        layer.feed_forward.w3):
                nn.init.normal_(lin.weight, std=fan_in_std)
            nn.init.normal_(layer.attention.wo.weight, std=residual_std)
            nn.init.normal_(layer.feed_forward.w2.weight, std=residual_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        self.reset_rope()

    def tie_weights(self) -> None:
        """Share the output projection with the token embeddings (when the config ties them)."""
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def reset_rope(self) -> None:
        """Refill the rotary tables (derived from the config, never loaded), e.g. after `to_empty`."""
        cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | BlockMask | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `tokens` (B, T).

        start_pos: where these tokens start in the sequence (decoding with `cache`).
        positions: per-sequence rotary positions (B, T), for left-padded or packed rows; default start_pos + arange(T).
        mask: boolean (B, 1, T, S) attention mask, True where attention is allowed, or a flex BlockMask; default causal.
        documents: instead of `mask`, for packed rows: each token's document id (B, T), -1 for padding; attention
            is causal within each document (see `packed_attention`).
        """
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)  # (B, T, d_model)
        if positions is None:
            cos, sin = self.rope_cos[start_pos : start_pos + T], self.rope_sin[start_pos : start_pos + T]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, head_dim)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        if documents is not None:
            mask = self.document_attention(documents, h.dtype)  # built once, shared by every layer
        if mask is None and T > 1 and start_pos > 0:
            # Chunked prefill: queries at start_pos.. see the whole cache and their own causal prefix.
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=tokens.device).tril(start_pos)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, cache, start_pos, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache, start_pos, mask)
        return self.output(self.norm(h))  # (B, T, vocab_size)

    def document_attention(self, documents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | BlockMask:
        """The attention mask of packed rows (B, T) for a `dtype` forward: a flex BlockMask when
        `packed_attention` asks for flex and it runs here, else the dense (B, 1, T, T) mask."""
        # 'auto' is dense off CUDA: torch has no flex attention backward on CPU (benchmarks/packed_attention.py
        # measures both there, forward only; docs/performance.md).
        flex = self.packed_attention == "flex" or (self.packed_attention == "auto" and documents.device.type == "cuda")
        c = self.config
        # Inside torch.compile the probe is skipped (calling it would break the graph on every forward): a flex
        # that fails to compile there makes the step run eagerly, where the probe decides.
        if flex and (torch.compiler.is_compiling() or flex_unavailable(
                documents.device.type, dtype, c.n_heads, c.n_kv_heads, c.head_dim, torch.is_grad_enabled()) is None):
            return document_block_mask(documents)
        return document_mask(documents)

    def num_params(self) -> int:
        """Unique parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())
