"""Chat examples: conversations tokenized with their loss mask, fitted to the row length, packed into rows
and collated into batches.

The loss mask comes from token ids (`Tokenizer.assistant_spans`): SFT learns every assistant reply with its
end-of-turn token; DPO scores only the final reply. A row holds seq_len + 1 tokens (inputs and shifted
targets); conversations longer than that are truncated or dropped (`overlong`), and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lillm.data.records import ChatDataConfig, conversation, iter_records, preference
from lillm.data.sources import in_validation
from lillm.errors import UserError
from lillm.tokenizer import Tokenizer

IGNORE_INDEX = -100
"""Target id that the loss skips (torch's cross-entropy default): prompts, padding, packed neighbours."""


# -- tokenizing -----------------------------------------------------------------------------------------
@dataclass
class Example:
    """One tokenized sequence: ids, and which of them the loss learns (True) or only reads (False)."""

    ids: np.ndarray  # int64 (n,)
    learn: np.ndarray  # bool (n,)


def chat_example(tok: Tokenizer, messages: list[dict[str, str]], last_reply_only: bool = False) -> Example:
    """Tokenize a conversation; the learned tokens are every assistant reply (SFT) or only the last (DPO,
    which compares the final replies and never learns earlier turns)."""
    ids = tok.encode_chat(messages)
    learn = np.zeros(len(ids), dtype=bool)
    spans = tok.assistant_spans(ids)
    for a, b in spans[-1:] if last_reply_only else spans:
        learn[a:b] = True
    return Example(np.asarray(ids, dtype=np.int64), learn)


def fit(ex: Example, max_len: int, policy: str) -> Example | None:
    """Apply the over-long policy; None means dropped (too long, or nothing left to learn)."""
    if len(ex.ids) > max_len:
        if policy == "drop":
            return None
        ex = Example(ex.ids[:max_len], ex.learn[:max_len])
    # The first token is never a target (nothing predicts it), so it does not count as learnable.
    return ex if ex.learn[1:].any() else None


@dataclass
class ChatData:
    """The tokenized train and validation rows of a post-training run, with what was dropped and why."""

    train: list[Any]
    val: list[Any]
    stats: dict[str, int]


def split_key(messages: list[dict[str, str]]) -> str:
    """What decides a record's train/val side: its prompt, i.e. the conversation before its last assistant
    reply (a preference pair's prompt; an SFT conversation without its answer). SFT and DPO on the same
    questions then split them alike, so a DPO validation question is never in SFT's training data (with a DPO
    val_fraction at most SFT's: `in_validation` is monotone in the fraction)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return json.dumps(messages[:last], sort_keys=True)


def load_sft(cfg: ChatDataConfig, tok: Tokenizer, seq_len: int) -> ChatData:
    """Read, check and tokenize every conversation of `cfg.source`."""
    train, val, stats = [], [], {"records": 0, "truncated": 0, "dropped_overlong": 0}
    for where, rec in iter_records(cfg.source, cfg.split, cfg.hf_config):
        msgs = conversation(rec, where)
        stats["records"] += 1
        ex = chat_example(tok, msgs)
        fitted = fit(ex, seq_len + 1, cfg.overlong)
        if fitted is None:
            stats["dropped_overlong"] += 1
            continue
        stats["truncated"] += len(fitted.ids) < len(ex.ids)
        (val if in_validation(split_key(msgs), cfg.val_fraction) else train).append(fitted)
    return _checked(ChatData(train, val, stats), cfg.source)


def load_preferences(cfg: ChatDataConfig, tok: Tokenizer, seq_len: int) -> ChatData:
    """Read, check and tokenize every preference pair: rows are (chosen, rejected) Example pairs."""
    train, val, stats = [], [], {"records": 0, "truncated": 0, "dropped_overlong": 0}
    for where, rec in iter_records(cfg.source, cfg.split, cfg.hf_config):
        prompt, chosen, rejected = preference(rec, where)
        stats["records"] += 1
        pair = [chat_example(tok, [*prompt, {"role": "assistant", "content": reply}], last_reply_only=True)
                for reply in (chosen, rejected)]
        fitted = [fit(ex, seq_len + 1, cfg.overlong) for ex in pair]
        if fitted[0] is None or fitted[1] is None:
            stats["dropped_overlong"] += 1
            continue
        stats["truncated"] += any(len(f.ids) < len(e.ids) for f, e in zip(fitted, pair))
        (val if in_validation(split_key(prompt), cfg.val_fraction) else train).append(tuple(fitted))
    return _checked(ChatData(train, val, stats), cfg.source)


def _checked(data: ChatData, source: str) -> ChatData:
    if not data.train:
        raise UserError(f"{source}: no training records left ({data.stats}); check seq_len and data.overlong")
    return data


# -- rows and batches ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One training row: concatenated examples (one unless packed) and the example each token belongs to."""

    ids: np.ndarray
    learn: np.ndarray
    segment: np.ndarray  # int32 (n,), 0, 1, ... per packed example


def pack(examples: list[Example], order: np.ndarray, max_len: int, packing: bool) -> list[Row]:
    """Rows in `order`; with packing, consecutive examples fill a row while they fit (first fit, in order)."""
    rows, cur, cur_len = [], [], 0
    for i in order:
        ex = examples[i]
        if cur and (not packing or cur_len + len(ex.ids) > max_len):
            rows.append(make_row(cur))
            cur, cur_len = [], 0
        cur.append(ex)
        cur_len += len(ex.ids)
    if cur:
        rows.append(make_row(cur))
    return rows


def make_row(examples: list[Example]) -> Row:
    """One row from examples placed end to end (one, unless packed)."""
    seg = np.concatenate([np.full(len(e.ids), k, dtype=np.int32) for k, e in enumerate(examples)])
    return Row(np.concatenate([e.ids for e in examples]), np.concatenate([e.learn for e in examples]), seg)


def collate_pairs(pairs: list[tuple[Example, Example]], pad_id: int) -> Batch:
    """B preference pairs as one batch of 2B rows: the chosen replies, then the rejected ones in the same order."""
    return collate([make_row([c]) for c, _ in pairs] + [make_row([r]) for _, r in pairs], pad_id, False)


@dataclass
class Batch:
    """Model inputs (B, T), targets (B, T) with IGNORE_INDEX where nothing is learned, and, for packed rows,
    per-token rotary positions (B, T) and document ids (B, T), from which the model builds its attention mask."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    documents: torch.Tensor | None = None
    """Packed rows: the example each input token belongs to (0, 1, ... along the row), -1 for padding."""
    num_tokens: int = 0
    """Real (non-padding) input tokens."""
    num_targets: int = 0
    """Targets that are learned (not IGNORE_INDEX), counted on the host when collated."""

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.inputs), move(self.targets), move(self.positions), move(self.documents),
                     self.num_tokens, self.num_targets)


def collate(rows: list[Row], pad_id: int, packed: bool) -> Batch:
    """Right-pad rows to the longest one. Unpacked rows need no mask: causal attention never lets a real
    token see the padding after it. Packed rows get document ids (attention stays within a document) and
    positions restarting at each document."""
    L = max(len(r.ids) for r in rows)
    ids = np.full((len(rows), L), pad_id, dtype=np.int64)
    learn = np.zeros((len(rows), L), dtype=bool)
    seg = np.full((len(rows), L), -1, dtype=np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r.ids)], learn[b, : len(r.ids)], seg[b, : len(r.ids)] = r.ids, r.learn, r.segment
    ids_t, learn_t = torch.from_numpy(ids), torch.from_numpy(learn)
    targets = ids_t[:, 1:].masked_fill(~learn_t[:, 1:], IGNORE_INDEX)
    num_tokens, num_targets = sum(len(r.ids) - 1 for r in rows), int(learn[:, 1:].sum())
    if not packed:
        return Batch(ids_t[:, :-1], targets, num_tokens=num_tokens, num_targets=num_targets)
    seg_t = torch.from_numpy(seg[:, :-1]).long()  # (B, T)
    T = seg_t.shape[1]
    pos = torch.zeros_like(seg_t)
    for b in range(len(rows)):
        starts = np.flatnonzero(np.diff(seg[b, :T], prepend=-2))  # first index of each segment
        lengths = np.diff(np.append(starts, T))
        pos[b] = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))
    return Batch(ids_t[:, :-1], targets, pos, seg_t, num_tokens, num_targets)
