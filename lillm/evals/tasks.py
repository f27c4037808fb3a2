"""Evaluation tasks: what `lillm eval --tasks` names, where each task's items come from, and how a record of
the real dataset becomes an item.

A task spec is `KIND` or `KIND:SOURCE`. SOURCE is what lillm reads elsewhere: a local .jsonl / .json /
.parquet file, a folder of them or one saved by `Dataset.save_to_disk`, or `hf:NAME` (a Hugging Face dataset).
Without a SOURCE, a downstream task reads its dataset from the Hub (the name, configuration and split that
lm-evaluation-harness uses). Kinds:

  bpb:SOURCE            bits per byte of a text source (the built-ins `pydoc` and `stdlib` included), or
                        of a split of a directory written by `lillm prepare` (default: its val split)
  hellaswag             {"activity_label", "ctx_a", "ctx_b", "endings": [4], "label": "0".."3"}
  arc_easy, arc_challenge
                        {"question", "choices": {"text": [...], "label": [...]}, "answerKey"}
  piqa                  {"goal", "sol1", "sol2", "label": 0 | 1}
  lambada               {"text"}: predict the last word from the rest
  pydoc-continuation, stdlib-continuation
                        built in and offline: pick a held-out passage's true continuation among 4

Multiple-choice items are built as lm-evaluation-harness builds them (its task YAMLs and HellaSwag's
preprocessing), so the two score the same strings: the context, then each choice after one space.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lillm.data.sources import BUILTINS, find_files, in_validation, iter_file_records, iter_hf_records, open_source
from lillm.errors import UserError

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
CONTINUATION_CHOICES = 4
CONTINUATION_CONTEXT_CHARS = 200
CONTINUATION_CHARS = 60
HELD_OUT_FRACTION = 0.005
"""The built-in tasks' passages come from the documents `lillm prepare`'s default val_fraction holds out."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """A multiple-choice item: the context and the choices, each scored as a continuation of it."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclasses.dataclass(frozen=True)
class Cloze:
    """A last-word item: correct when greedy decoding of the target's tokens reproduces them all."""

    context: str
    target: str


@dataclasses.dataclass(frozen=True)
class Task:
    """A parsed task spec: its kind and where its items come from."""

    spec: str
    kind: str
    source: str | None = None
    hf_config: str | None = None
    split: str | None = None

    @property
    def is_bpb(self) -> bool:
        return self.kind == "bpb"

    @property
    def name(self) -> str:
        """A short name for metric tags: the kind, and for a source its Hub name or its file's stem."""
        if self.source is None:
            return self.kind
        source = self.source[3:] if self.source.startswith("hf:") else Path(self.source).stem
        return f"{self.kind}:{source}"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one dataset's records become items, and which Hub dataset holds it by default."""

    make: Callable[[dict, str], Choice | Cloze]
    hub: tuple[str, str | None, str]
    """(dataset name, configuration, split) lm-evaluation-harness evaluates."""


def _field(rec: Any, name: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if name not in rec:
        raise UserError(f"{where}: missing field {name!r}")
    value = rec[name]
    if not isinstance(value, kind):
        raise UserError(f"{where}: field {name!r} is {type(value).__name__}, expected "
                        f"{getattr(kind, '__name__', 'one of ' + str(kind))}")
    return value


def _gold(value: Any, count: int, where: str, name: str) -> int:
    try:
        gold = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: field {name!r} is {value!r}, not an answer index") from None
    if not 0 <= gold < count:
        raise UserError(f"{where}: field {name!r} is {gold}, but there are {count} choices")
    return gold


def _choice(context: str, choices: list, gold: int, where: str) -> Choice:
    if len(choices) < 2:
        raise UserError(f"{where}: {len(choices)} choice(s); a multiple-choice item needs at least 2")
    if not all(isinstance(c, str) and c for c in choices):
        raise UserError(f"{where}: every choice must be a non-empty string")
    if not context:
        raise UserError(f"{where}: empty context")
    return Choice(context, tuple(choices), gold)


def hellaswag_preprocess(text: str) -> str:
    """HellaSwag's clean-up of WikiHow artefacts, as lm-evaluation-harness does it."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(rec: dict, where: str) -> Choice:
    ctx = _field(rec, "ctx_a", where) + " " + _field(rec, "ctx_b", where).capitalize()
    endings = _field(rec, "endings", where, list)
    query = hellaswag_preprocess(_field(rec, "activity_label", where) + ": " + ctx)
    gold = _gold(_field(rec, "label", where, (str, int)), len(endings), where, "label")
    return _choice(query, [hellaswag_preprocess(e) if isinstance(e, str) else e for e in endings], gold, where)


def arc(rec: dict, where: str) -> Choice:
    choices = _field(rec, "choices", where, dict)
    texts, labels = _field(choices, "text", where, list), _field(choices, "label", where, list)
    key = _field(rec, "answerKey", where)
    if key not in labels:
        raise UserError(f"{where}: answerKey {key!r} is not among the labels {labels}")
    return _choice(f"Question: {_field(rec, 'question', where)}\nAnswer:", texts, labels.index(key), where)


def piqa(rec: dict, where: str) -> Choice:
    sols = [_field(rec, "sol1", where), _field(rec, "sol2", where)]
    gold = _gold(_field(rec, "label", where, (int, str)), 2, where, "label")
    return _choice(f"Question: {_field(rec, 'goal', where)}\nAnswer:", sols, gold, where)


def lambada(rec: dict, where: str) -> Cloze:
    words = _field(rec, "text", where).split(" ")
    if len(words) < 2 or not words[-1]:
        raise UserError(f"{where}: field 'text' needs at least two words, the last one the target")
    return Cloze(" ".join(words[:-1]), " " + words[-1])


LAYOUTS: dict[str, Layout] = {
    "hellaswag": Layout(hellaswag, ("Rowan/hellaswag", None, "validation")),
    "arc_easy": Layout(arc, ("allenai/ai2_arc", "ARC-Easy", "test")),
    "arc_challenge": Layout(arc, ("allenai/ai2_arc", "ARC-Challenge", "test")),
    "piqa": Layout(piqa, ("baber/piqa", None, "validation")),
    "lambada": Layout(lambada, ("EleutherAI/lambada_openai", "default", "test")),
}
BUILTIN_TASKS = {f"{name}-continuation": name for name in sorted(BUILTINS)}
KINDS = ("bpb", *LAYOUTS, *BUILTIN_TASKS)


def parse_task(spec: str, split: str | None = None, hf_config: str | None = None) -> Task:
    """`KIND` or `KIND:SOURCE` (see the module docstring); an unknown kind is one line naming the known ones."""
    kind, _, source = spec.partition(":")
    if kind not in KINDS:
        raise UserError(f"unknown task {spec!r}; tasks: {', '.join(KINDS)} (bpb and the downstream tasks take "
                        ":SOURCE, e.g. bpb:pydoc, hellaswag:data/hellaswag.jsonl)")
    if kind == "bpb" and not source:
        raise UserError(f"task {spec!r}: bpb needs a text source, e.g. bpb:pydoc or bpb:hf:NAME")
    if kind in BUILTIN_TASKS and source:
        raise UserError(f"task {spec!r}: {kind} is built in and takes no source")
    if source and kind != "bpb" and source not in BUILTINS and not source.startswith("hf:"):
        find_files(source, RECORD_SUFFIXES)  # a missing path is refused before any model is loaded
    return Task(spec, kind, source or None, hf_config, split)


def iter_items(task: Task, limit: int | None = None) -> Iterator[Choice | Cloze]:
    """The items of a multiple-choice or cloze task, in the dataset's order, at most `limit` of them."""
    if task.kind in BUILTIN_TASKS:
        items: Iterator = continuation_items(BUILTIN_TASKS[task.kind])
    else:
        layout = LAYOUTS[task.kind]
        items = (layout.make(rec, where) for where, rec in _records(task, layout))
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield item


def _records(task: Task, layout: Layout) -> Iterator[tuple[str, Any]]:
    name, config, split = layout.hub
    if task.source is None or task.source.startswith("hf:"):
        hub = name if task.source is None else task.source[3:]
        yield from iter_hf_records(hub, task.hf_config or config, task.split or split, streaming=True)
        return
    for f in find_files(task.source, RECORD_SUFFIXES):
        yield from iter_file_records(f, task.split or "train")


def continuation_items(corpus: str) -> Iterator[Choice]:
    """The built-in task: held-out passages of a built-in corpus, each a context of about 200 characters
    and its true next 60 among 4 (the other 3: the continuations of the next 3 passages). Chance is 1/4.

    The passages come from the documents that prepare's split puts in validation at its default val_fraction
    (0.005), and so at any larger one (the quickstart's 0.02): a model trained on the train shards has not
    seen them. That is 18 items for pydoc (a standard error near 0.1: a coarse check that the model reads
    its text) and 421 for stdlib. Every cut is at a space, so no word is split between context and choice.
    """
    passages: list[tuple[str, str]] = []
    for text in open_source(corpus):
        if not in_validation(text, HELD_OUT_FRACTION):
            continue
        passages.extend(_cuts(" ".join(text.split())))
    n = len(passages)
    for i, (context, true) in enumerate(passages):
        others = [passages[(i + k) % n][1] for k in range(1, CONTINUATION_CHOICES)]
        gold = i % CONTINUATION_CHOICES
        choices = others[:gold] + [true] + others[gold:]
        if n >= CONTINUATION_CHOICES and len(set(choices)) == len(choices):
            yield Choice(context, tuple(choices), gold)


def _cuts(text: str) -> Iterator[tuple[str, str]]:
    """Non-overlapping (context, continuation) pairs of one whitespace-normalised document."""
    start = 0
    while True:
        mid = text.find(" ", start + CONTINUATION_CONTEXT_CHARS)
        end = text.find(" ", mid + 1 + CONTINUATION_CHARS) if mid >= 0 else -1
        if mid < 0 or end < 0:
            return
        yield text[start:mid], text[mid + 1:end]
        start = end + 1


def chance(items: list[Choice | Cloze]) -> float | None:
    """Expected accuracy of a uniform guess (the mean of 1/choices); None for cloze items."""
    if not items or not isinstance(items[0], Choice):
        return None
    return sum(1 / len(i.choices) for i in items) / len(items)
