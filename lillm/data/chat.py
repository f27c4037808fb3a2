"""Chat data for post-training: conversations (SFT), preference pairs (DPO), and their loader.

Records come from a Hub dataset (`hf:NAME`, through `datasets.load_dataset`), local .jsonl / .json /
.parquet files, a folder of them, a folder saved by `Dataset.save_to_disk`, or `pydoc-chat`: a small
built-in set (questions about standard-library functions answered by their docstrings' first paragraph,
with another function's answer as the rejected reply) for trying SFT and DPO offline. Per record:

  SFT  {"messages": [{"role": ..., "content": ...}, ...]}          roles: system (first only), user, assistant
       {"prompt": "...", "response": "..."}                        (and an optional "system")
  DPO  {"prompt": "...", "chosen": "...", "rejected": "..."}
       {"chosen": [messages], "rejected": [messages]}              both lists share the prompt turns and end
                                                                    with the assistant reply (UltraFeedback's
                                                                    layout; a "prompt" field is then ignored)

The loss mask comes from token ids (`Tokenizer.assistant_spans`): SFT learns every assistant reply with its
end-of-turn token; DPO scores only the final reply. Conversations longer than seq_len + 1 tokens are
truncated or dropped (`overlong`), and counted.

The loader follows the pretraining stream's rules (see `lillm.data.loader`): epoch e is a permutation of
the rows drawn from (seed, e); micro-batch q of the global stream goes to rank q % world_size; the state is
one global micro-batch counter, so a run resumes exactly, at any world size. With packing, several
conversations share a row; each keeps its own rotary positions and attends only to itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lillm.errors import UserError
from lillm.tokenizer import CHAT_ROLES, Tokenizer
from lillm.train.loss import IGNORE_INDEX

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
BUILTIN_CHAT = "pydoc-chat"
_CHAT_MODULES = ("base64", "bisect", "calendar", "colorsys", "copy", "csv", "difflib", "fnmatch", "fractions", "glob",
                 "gzip", "heapq", "hmac", "json", "os", "platform", "random", "secrets", "shlex", "shutil",
                 "statistics", "string", "tempfile", "textwrap", "uuid", "warnings", "zipfile")


@dataclass
class ChatDataConfig:
    """Where conversations or preference pairs come from and how they become training rows."""

    source: str = ""
    """'hf:NAME' (a Hub dataset or local dataset folder), or a .jsonl/.json/.parquet file, folder or saved dataset."""
    split: str = "train"
    """Split for hf: sources and saved datasets."""
    hf_config: str | None = None
    """Dataset configuration name for hf: sources."""
    val_fraction: float = 0.02
    """Fraction of records (chosen by a hash of their content) held out for validation."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Records longer than seq_len + 1 tokens: cut at the end (dropped if no reply token is left) or dropped."""
    packing: bool = False
    """SFT: put several conversations in one row (isolated from each other by the attention mask)."""
    shuffle: bool = True
    """Shuffle rows each epoch (deterministically, by seed and epoch)."""

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"invalid ChatDataConfig: val_fraction must be in [0, 1), got {self.val_fraction}")


# -- reading records ---------------------------------------------------------------------------------
def iter_records(spec: str, split: str = "train", hf_config: str | None = None) -> Iterator[tuple[str, dict]]:
    """(where, record) pairs; `where` names the file and line or record index for error messages."""
    if not spec:
        raise UserError("no data source given (data.source)")
    if spec == BUILTIN_CHAT:
        for i, rec in enumerate(_builtin_chat()):
            yield f"{BUILTIN_CHAT}: record {i}", rec
        return
    if spec.startswith("hf:"):
        yield from _iter_dataset(spec[3:], split, hf_config)
        return
    p = Path(spec)
    if p.is_dir() and (p / "dataset_info.json").is_file():
        yield from _iter_dataset(str(p), split, None, saved=True)
        return
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in RECORD_SUFFIXES)
        if not files:
            raise UserError(f"{p}: folder holds no {', '.join(RECORD_SUFFIXES)} files")
    elif p.is_file():
        if p.suffix not in RECORD_SUFFIXES:
            raise UserError(f"{p}: unsupported file type {p.suffix!r}; expected {', '.join(RECORD_SUFFIXES)}")
        files = [p]
    else:
        raise UserError(f"{spec}: no such file or directory")
    for f in files:
        if f.suffix == ".parquet":
            yield from _iter_parquet(f)
        else:
            yield from _iter_json(f)


def _builtin_chat() -> Iterator[dict]:
    """Deterministic question/answer records from the standard library's function docstrings (parsed, never
    imported). Each holds `messages` (for SFT) and `prompt`/`chosen`/`rejected` (for DPO)."""
    import ast
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pairs = []
    for mod in _CHAT_MODULES:
        f = stdlib / f"{mod}.py"
        if not f.is_file():
            continue
        for node in ast.parse(f.read_bytes()).body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc and not node.name.startswith("_"):
                answer = " ".join(doc.split("\n\n")[0].split())
                if 20 < len(answer) < 300 and not answer.startswith(node.name):  # skip bare signatures
                    pairs.append((f"What does {mod}.{node.name}() do?", answer))
    for i, (question, answer) in enumerate(pairs):
        other = pairs[(i * 7 + 3) % len(pairs)][1]
        yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
               "prompt": question, "chosen": answer,
               "rejected": other if other != answer else "I do not know."}


def _iter_json(f: Path) -> Iterator[tuple[str, dict]]:
    text = f.read_text(encoding="utf-8", errors="replace")
    if f.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from None
        for i, rec in enumerate(records):
            yield f"{f}: record {i}", rec
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{f}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{f}:{lineno}: invalid JSON: {e.msg}") from None


def _iter_parquet(f: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(f)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise UserError(f"{f}: not a readable parquet file ({e})") from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"{f}: row {i}", rec


def _iter_dataset(name: str, split: str, hf_config: str | None, saved: bool = False) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        if saved:
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"{name}: no split {split!r} (has {list(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, hf_config, split=split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"cannot load dataset {name!r} (config {hf_config}, split {split}): {e}") from None
    for i, rec in enumerate(ds):
        yield f"{name}[{split}]: record {i}", rec


# -- checking and normalising records ----------------------------------------------------------------
def check_messages(messages: Any, where: str, final_assistant: bool = False) -> list[dict[str, str]]:
    """A validated list of {role, content}: known roles, system only first, text content, non-empty replies."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i} is not a {{role, content}} object: {str(m)[:80]}")
        role, content = m["role"], m["content"]
        if role not in CHAT_ROLES:
            raise UserError(f"{where}: message {i} has unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if role == "system" and i != 0:
            raise UserError(f"{where}: message {i}: a system message may only come first")
        if not isinstance(content, str):
            raise UserError(f"{where}: message {i}: content is {type(content).__name__}, not text")
        if role == "assistant" and not content.strip():
            raise UserError(f"{where}: message {i}: empty assistant turn")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: no assistant turn: nothing to learn from this conversation")
    if final_assistant and out[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's reply")
    return out


def _present(rec: dict) -> dict:
    # A `datasets` table has one schema for all rows: a field a record lacks comes back as None.
    return {k: v for k, v in rec.items() if v is not None}


def conversation(rec: Any, where: str) -> list[dict[str, str]]:
    """An SFT record as a validated message list."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected an object, got {type(rec).__name__}")
    rec = _present(rec)
    if "messages" in rec:
        return check_messages(rec["messages"], where)
    if "prompt" in rec and "response" in rec:
        msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
        msgs += [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
        return check_messages(msgs, where)
    raise UserError(f"{where}: expected a 'messages' field or 'prompt' and 'response' fields (has {sorted(rec)})")


def preference(rec: Any, where: str) -> tuple[list[dict[str, str]], str, str]:
    """A DPO record as (prompt messages, chosen reply, rejected reply)."""
    rec = _present(rec) if isinstance(rec, dict) else rec
    if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
        has = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        raise UserError(f"{where}: expected 'chosen' and 'rejected' fields (has {has})")
    chosen, rejected = rec["chosen"], rec["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        c = check_messages(chosen, f"{where} (chosen)", final_assistant=True)
        r = check_messages(rejected, f"{where} (rejected)", final_assistant=True)
        if c[:-1] != r[:-1]:
            raise UserError(f"{where}: chosen and rejected conversations differ before their last reply")
        prompt, chosen, rejected = c[:-1], c[-1]["content"], r[-1]["content"]
        if not prompt:
            raise UserError(f"{where}: the conversations hold a reply but no prompt")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        p = rec.get("prompt")
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else p
        if prompt is None:
            raise UserError(f"{where}: text 'chosen'/'rejected' need a 'prompt' field")
        prompt = check_messages([*prompt, {"role": "assistant", "content": chosen or " "}], where)[:-1]
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise UserError(f"{where}: empty {name} response")
    else:
        raise UserError(f"{where}: 'chosen' and 'rejected' must both be text or both be message lists")
    if chosen == rejected:
        raise UserError(f"{where}: chosen and rejected responses are identical: the pair carries no preference")
    return prompt, chosen, rejected


def in_validation(key: str, fraction: float) -> bool:
    """Hash split: the same record lands in the same split whatever the order or machine."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


# -- tokenizing ----------------------------------------------------------------------------------------
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
        (val if in_validation(json.dumps(msgs, sort_keys=True), cfg.val_fraction) else train).append(fitted)
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
        key = json.dumps([prompt, chosen, rejected], sort_keys=True)
        (val if in_validation(key, cfg.val_fraction) else train).append(tuple(fitted))
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
            rows.append(_row(cur))
            cur, cur_len = [], 0
        cur.append(ex)
        cur_len += len(ex.ids)
    if cur:
        rows.append(_row(cur))
    return rows


def _row(examples: list[Example]) -> Row:
    seg = np.concatenate([np.full(len(e.ids), k, dtype=np.int32) for k, e in enumerate(examples)])
    return Row(np.concatenate([e.ids for e in examples]), np.concatenate([e.learn for e in examples]), seg)


def collate_pairs(pairs: list[tuple[Example, Example]], pad_id: int) -> Batch:
    """B preference pairs as one batch of 2B rows: the chosen replies, then the rejected ones in the same order."""
    return collate([_row([c]) for c, _ in pairs] + [_row([r]) for _, r in pairs], pad_id, False)


@dataclass
class Batch:
    """Model inputs (B, T), targets (B, T) with IGNORE_INDEX where nothing is learned, and, for packed rows,
    per-token rotary positions (B, T) and a boolean attention mask (B, 1, T, T)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    num_tokens: int = 0
    """Real (non-padding) input tokens."""

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.inputs), move(self.targets), move(self.positions), move(self.mask), self.num_tokens)

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def collate(rows: list[Row], pad_id: int, packed: bool) -> Batch:
    """Right-pad rows to the longest one. Unpacked rows need no mask: causal attention never lets a real
    token see the padding after it. Packed rows get block-diagonal causal masks and restarted positions."""
    L = max(len(r.ids) for r in rows)
    ids = np.full((len(rows), L), pad_id, dtype=np.int64)
    learn = np.zeros((len(rows), L), dtype=bool)
    seg = np.full((len(rows), L), -1, dtype=np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r.ids)], learn[b, : len(r.ids)], seg[b, : len(r.ids)] = r.ids, r.learn, r.segment
    ids_t, learn_t = torch.from_numpy(ids), torch.from_numpy(learn)
    targets = ids_t[:, 1:].masked_fill(~learn_t[:, 1:], IGNORE_INDEX)
    num_tokens = sum(len(r.ids) - 1 for r in rows)
    if not packed:
        return Batch(ids_t[:, :-1], targets, num_tokens=num_tokens)
    seg_t = torch.from_numpy(seg[:, :-1]).long()  # (B, T)
    T = seg_t.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = seg_t[:, :, None] == seg_t[:, None, :]  # (B, T, T)
    mask = (same & causal)[:, None]  # (B, 1, T, T); padding (segment -1) attends to padding only
    pos = torch.zeros_like(seg_t)
    for b in range(len(rows)):
        starts = np.flatnonzero(np.diff(seg[b, :T], prepend=-2))  # first index of each segment
        lengths = np.diff(np.append(starts, T))
        pos[b] = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))
    return Batch(ids_t[:, :-1], targets, pos, mask, num_tokens)


class ChatLoader:
    """Micro-batches of SFT rows (or DPO pairs) for one rank, from a global stream that resumes exactly.

    For DPO (`pairs=True`) a micro-batch of B pairs is one Batch of 2B rows: the B chosen rows, then the
    B rejected rows in the same order.
    """

    def __init__(self, examples: list[Any], micro_batch_size: int, rank: int, world_size: int, seed: int,
                 max_len: int, pad_id: int, shuffle: bool = True, packing: bool = False, pairs: bool = False):
        self.examples, self.micro_batch_size = examples, micro_batch_size
        self.rank, self.world_size, self.seed, self.max_len = rank, world_size, seed, max_len
        self.pad_id, self.shuffle, self.packing, self.pairs = pad_id, shuffle, packing and not pairs, pairs
        self.position = 0  # global micro-batches consumed by all ranks together
        self._epoch_rows: tuple[int, list[Any]] = (-1, [])
        self._per_epoch: dict[int, int] = {}  # micro-batches per epoch (packing makes it vary a little)
        if self.batches_per_epoch == 0:
            raise UserError(f"{len(examples)} training records make fewer rows than one micro-batch "
                            f"({micro_batch_size}); lower train.micro_batch_size or add data")

    def _rows(self, epoch: int) -> list[Any]:
        if self._epoch_rows[0] != epoch:
            n = len(self.examples)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            if self.pairs:
                rows = [self.examples[i] for i in order]
            else:
                rows = pack(self.examples, order, self.max_len, self.packing)
            self._epoch_rows = (epoch, rows)
            self._per_epoch[epoch] = len(rows) // self.micro_batch_size
        return self._epoch_rows[1]

    def _count(self, epoch: int) -> int:
        if epoch not in self._per_epoch:
            self._rows(epoch)
        return self._per_epoch[epoch]

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches in epoch 0 (with packing, later epochs can differ slightly)."""
        return self._count(0)

    def micro_batch(self, q: int) -> Batch:
        """Global micro-batch q: epochs follow each other, each its own permutation; a short tail is dropped."""
        epoch = 0
        while q >= self._count(epoch):
            q -= self._count(epoch)
            epoch += 1
        rows = self._rows(epoch)[q * self.micro_batch_size : (q + 1) * self.micro_batch_size]
        if self.pairs:
            return collate_pairs(rows, self.pad_id)
        return collate(rows, self.pad_id, self.packing)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self.micro_batch(self.position + self.rank)
            self.position += self.world_size
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "rows": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rows"] != len(self.examples) or state["seed"] != self.seed:
            raise UserError(f"cannot resume the data stream: the checkpoint saw {state['rows']} records with seed "
                            f"{state['seed']}, this run has {len(self.examples)} with seed {self.seed}")
        self.position = state["position"]


def validation_batches(rows: list[Any], micro_batch_size: int, rank: int, world_size: int, pad_id: int,
                       pairs: bool = False) -> Iterator[Batch]:
    """This rank's share of the validation rows (row i goes to rank i % world_size), unpacked."""
    mine = rows[rank::world_size]
    for i in range(0, len(mine), micro_batch_size):
        chunk = mine[i : i + micro_batch_size]
        if pairs:
            yield collate_pairs(chunk, pad_id)
        else:
            yield collate([_row([e]) for e in chunk], pad_id, False)
