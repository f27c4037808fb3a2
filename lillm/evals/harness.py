"""Scoring a model on evaluation tasks: log-likelihoods of continuations, accuracies, bits per byte.

Each multiple-choice item becomes one (context, continuation) request per choice; its log-likelihood is the
sum of the continuation tokens' log-probabilities given everything before them. Accuracy takes the choice
with the highest sum (`acc`) and, normalised by the choice's length in characters, `acc_norm`: the two
figures lm-evaluation-harness reports. A cloze item is correct when greedy decoding reproduces every token
of its target (lm-evaluation-harness's `acc` for LAMBADA); its perplexity is exp of minus the mean
log-likelihood per item.

Requests are encoded as lm-evaluation-harness encodes them for a causal model: trailing spaces of the
context move to the continuation, the continuation's tokens are those of the whole string past the
context's, and the text starts after an end-of-text token (where lillm's documents start). lm-eval with its
default settings on a lillm export gives the same ids, since the export's tokenizer puts that token in front;
its `add_bos_token=True` would put <|begin_of_text|> there instead, which lillm's pretraining never does.
A request longer than the model's context keeps its last max_seq_len + 1 tokens and is counted as truncated.

Every figure is a sum over items first, so ranks can each score a share of the items and add up
their sums: the result does not depend on the world size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lillm.errors import UserError
from lillm.evals.tasks import Choice, Cloze, Task, chance, iter_items
from lillm.scoring import Score, bits_per_byte, byte_table, score_windows
from lillm.tokenizer import Tokenizer

Request = tuple[list[int], list[int]]
"""(context ids, continuation ids)."""
Reduce = Callable[[list[float]], list[float]]
"""Sums a list of floats over ranks (identity on one process)."""


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> Request:
    """Context and continuation ids, split where lm-evaluation-harness splits them (see module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tok.prompt_ids(context)
    whole = tok.prompt_ids(context + continuation)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model: Any, requests: Sequence[Request], max_len: int, batch_size: int,
                   device: torch.device, progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of the continuation, whether greedy decoding gives it) per request.

    Longest requests first (so a batch holds similar lengths), right-padded; causal attention keeps the
    padding out of every scored position.
    """
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        inputs = [(requests[i][0] + requests[i][1])[-(max_len + 1):][:-1] for i in rows]
        width = max(len(x) for x in inputs)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for j, x in enumerate(inputs):
            batch[j, :len(x)] = torch.tensor(x)
        logits = model(batch.to(device))
        for j, i in enumerate(rows):
            cont = torch.tensor(requests[i][1], device=logits.device)
            end = len(inputs[j])
            logp = torch.log_softmax(logits[j, end - len(cont):end].float(), dim=-1)
            ll = float(logp.gather(-1, cont[:, None]).sum())
            out[i] = (ll, bool((logp.argmax(-1) == cont).all()))
        if progress is not None:
            progress(len(rows))
    return out


@dataclasses.dataclass
class PreparedTask:
    """A task's items, encoded once: requests for multiple choice and cloze, a token stream for bpb."""

    task: Task
    items: list[Choice | Cloze] = dataclasses.field(default_factory=list)
    requests: list[list[Request]] = dataclasses.field(default_factory=list)
    stream: np.ndarray | None = None
    documents: int = 0
    truncated: int = 0

    @property
    def size(self) -> int:
        """Scoring units: requests, or tokens of the bpb stream."""
        return len(self.stream) if self.stream is not None else sum(len(r) for r in self.requests)


def prepare_task(task: Task, tok: Tokenizer, max_len: int, limit: int | None = None) -> PreparedTask:
    """Read and encode a task's items (at most `limit`, or `limit` documents for bpb)."""
    if task.is_bpb:
        return _prepare_bpb(task, tok, limit)
    prepared = PreparedTask(task, items=list(iter_items(task, limit)))
    if not prepared.items:
        raise UserError(f"task {task.spec!r}: no items")
    for n, item in enumerate(prepared.items):
        pairs = [(item.context, " " + c) for c in item.choices] if isinstance(item, Choice) else \
            [(item.context, item.target)]
        reqs = [encode_pair(tok, c, x) for c, x in pairs]
        for ctx, cont in reqs:
            if not cont:
                raise UserError(f"task {task.spec!r}, item {n}: a continuation encodes to no tokens")
            if len(cont) > max_len:
                raise UserError(f"task {task.spec!r}, item {n}: a continuation of {len(cont)} tokens is longer "
                                f"than the model's context ({max_len})")
            prepared.truncated += len(ctx) + len(cont) > max_len + 1
        prepared.requests.append(reqs)
    return prepared


def _prepare_bpb(task: Task, tok: Tokenizer, limit: int | None) -> PreparedTask:
    """The token stream of the source's documents, each followed by end-of-text as in the shards, after one
    end-of-text so the first document starts as every other does. A directory written by `lillm prepare`
    gives its split's tokens as they are (default: val); its tokenizer must be the model's."""
    from pathlib import Path

    from lillm.data.loader import ShardSet
    from lillm.data.sources import iter_texts, open_source

    eos = np.array([tok.eos_id], dtype=np.int64)
    if (Path(task.source) / "manifest.json").is_file():
        shards = ShardSet(task.source, task.split or "val", tokenizer=tok)
        tokens = np.concatenate([eos, *(np.asarray(m, dtype=np.int64) for m in shards.maps())])
        ends = np.flatnonzero(tokens[1:] == tok.eos_id) + 1
        if limit is not None and len(ends) > limit:
            tokens = tokens[:ends[limit - 1] + 1]
        documents = min(len(ends), limit or len(ends))
    else:
        src = open_source(task.source, hf_config=task.hf_config, split=task.split or "train")
        docs = [np.array([*tok.encode(text), tok.eos_id], dtype=np.int64) for text in iter_texts(src, limit=limit)]
        tokens, documents = np.concatenate([eos, *docs]), len(docs)
    if documents == 0:
        raise UserError(f"task {task.spec!r}: the source holds no documents")
    return PreparedTask(task, stream=tokens, documents=documents)


@dataclasses.dataclass
class Scorer:
    """What scoring needs of the model: a callable from (B, T) ids to (B, T, vocab) logits (a LilLM or the
    DeepSpeed engine around one), its tokenizer, context length and vocabulary, and how to batch."""

    model: Any
    tokenizer: Tokenizer
    max_len: int
    vocab_size: int
    batch_size: int = 16
    device: torch.device = torch.device("cpu")


def run_task(scorer: Scorer, prepared: PreparedTask, rank: int = 0, world: int = 1, reduce: Reduce | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Score this rank's share (item or window i goes to rank i % world) and return the task's metrics, summed
    over ranks by `reduce`."""
    reduce = reduce or (lambda xs: xs)
    if prepared.stream is not None:
        return _run_bpb(scorer, prepared, rank, world, reduce, progress)
    mine = range(rank, len(prepared.items), world)
    flat = [r for i in mine for r in prepared.requests[i]]
    lls = iter(loglikelihoods(scorer.model, flat, scorer.max_len, scorer.batch_size, scorer.device, progress))
    sums = np.zeros(4)  # correct by sum, correct by length-normalised sum, log-likelihood of golds, items
    for i in mine:
        item = prepared.items[i]
        scored = [next(lls) for _ in prepared.requests[i]]
        if isinstance(item, Choice):
            ll = np.array([s[0] for s in scored])
            lengths = np.array([len(c) for c in item.choices], dtype=np.float64)
            sums += [np.argmax(ll) == item.gold, np.argmax(ll / lengths) == item.gold, ll[item.gold], 1]
        else:
            sums += [scored[0][1], scored[0][1], scored[0][0], 1]
    correct, correct_norm, gold_ll, n = reduce(sums.tolist())
    out = {"acc": correct / n, "acc_stderr": _stderr(correct / n, n), "items": n, "truncated": prepared.truncated}
    if isinstance(prepared.items[0], Choice):
        out["acc_norm"] = correct_norm / n
        out["chance"] = chance(prepared.items)
    else:
        out["perplexity"] = math.exp(-gold_ll / n)
    return out


def _stderr(p: float, n: float) -> float:
    """Standard error of a mean of n 0/1 outcomes (lm-evaluation-harness's acc_stderr)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def _windows(stream: np.ndarray, seq_len: int) -> Iterator[np.ndarray]:
    """Windows of seq_len + 1 tokens overlapping by one, so every token after the first is scored once;
    the last window may be shorter."""
    for start in range(0, len(stream) - 1, seq_len):
        yield stream[start:start + seq_len + 1]


@torch.no_grad()
def _run_bpb(scorer: Scorer, prepared: PreparedTask, rank: int, world: int, reduce: Reduce,
             progress: Callable[[int], None] | None) -> dict[str, float]:
    model, seq_len, batch_size, device = scorer.model, scorer.max_len, scorer.batch_size, scorer.device
    table = byte_table(scorer.tokenizer.token_bytes(scorer.vocab_size), device)
    windows = list(_windows(prepared.stream, seq_len))[rank::world]
    score = Score()
    full = [w for w in windows if len(w) == seq_len + 1]
    for start in range(0, len(full), batch_size):
        batch = torch.from_numpy(np.stack(full[start:start + batch_size])).to(device)
        score += score_windows(model, batch, table)
        if progress is not None:
            progress(batch.numel())
    for w in windows[len(full):]:  # the shorter last window
        score += score_windows(model, torch.from_numpy(w[None]).to(device), table)
    nats, tokens, num_bytes = reduce([score.nats, score.tokens, score.bytes])
    return {"bpb": bits_per_byte(nats, num_bytes), "loss": nats / max(tokens, 1), "tokens": tokens,
            "bytes": num_bytes, "documents": prepared.documents}
