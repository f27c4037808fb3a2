"""Sampling and KV-cache decoding: batched prompts of different lengths, streamed token by token."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lillm.config import nonfinite_fields
from lillm.errors import UserError
from lillm.model import KVCache, LilLM


@dataclass
class SamplingConfig:
    """How to pick each next token."""

    max_new_tokens: int = 128
    """Most tokens to generate per prompt (fewer if the sequence reaches max_seq_len)."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy decoding."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1 disables."""
    seed: int = 0
    """Seed of the sampling generator, so the same call gives the same text."""

    def __post_init__(self) -> None:
        problems = nonfinite_fields(self)
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if problems:
            raise UserError("invalid sampling options: " + "; ".join(problems))


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of logits (B, vocab) -> (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely one always stays.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_prompts(model: LilLM, prompts: Sequence[Sequence[int]]) -> None:
    cfg = model.config
    if not prompts:
        raise UserError("no prompt given")
    if len(prompts) > cfg.max_batch_size:
        raise UserError(f"{len(prompts)} prompts exceed the model's max_batch_size={cfg.max_batch_size}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty")
        if len(p) > cfg.max_seq_len:
            raise UserError(f"prompt {i} has {len(p)} tokens, longer than max_seq_len={cfg.max_seq_len}")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise UserError(f"prompt {i} has token ids outside the vocabulary (size {cfg.vocab_size}): {bad[:5]}")


@torch.inference_mode()
def stream_generate(
    model: LilLM,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of every prompt (None once that prompt has stopped).

    Prompts are left-padded to a common length; padded positions are masked out of attention and
    rotary positions restart at 0 for every prompt, so each prompt decodes as if it were alone. Each
    step after the prefill feeds one token per sequence through the KV cache.
    """
    _check_prompts(model, prompts)
    cfg = model.config
    device = model.tok_embeddings.weight.device
    dtype = model.tok_embeddings.weight.dtype
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, P, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        valid[i, P - len(p) :] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
    padded = not bool(valid.all())
    key_valid = torch.zeros(B, cfg.max_seq_len, dtype=torch.bool, device=device)
    key_valid[:, :P] = valid
    mask = None
    if padded:
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        # A padding query would see no key at all (NaN softmax): let it see itself; its output is unused.
        mask = (causal & key_valid[:, None, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)

    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    cache = KVCache(cfg, B, dtype, device)
    model_was_training = model.training
    model.eval()
    try:
        logits = model(tokens, 0, cache, positions if padded else None, mask)[:, -1]  # (B, vocab)
        next_pos = positions[:, -1] + 1  # (B,)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        steps = min(sampling.max_new_tokens, cfg.max_seq_len - P + 1)
        for step in range(steps):
            nxt = sample_next(logits, sampling, generator)
            yield [None if f else int(t) for t, f in zip(nxt.tolist(), finished.tolist())]
            finished |= torch.isin(nxt, stop)
            cur = P + step  # cache slot of the token just sampled
            if bool(finished.all()) or step == steps - 1:
                break
            key_valid[:, cur] = True
            step_mask = key_valid[:, None, None, : cur + 1] if padded else None  # (B, 1, 1, cur+1)
            logits = model(nxt[:, None], cur, cache, next_pos[:, None] if padded else None, step_mask)[:, -1]
            next_pos += 1
    finally:
        model.train(model_was_training)


def generate(
    model: LilLM,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> list[list[int]]:
    """The new tokens of every prompt (a stop token, when reached, is the last one)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step_tokens in stream_generate(model, prompts, sampling, stop_ids, pad_id):
        for seq, tok in zip(out, step_tokens):
            if tok is not None:
                seq.append(tok)
    return out
