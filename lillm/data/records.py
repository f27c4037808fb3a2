"""Chat records for post-training: where conversations and preference pairs come from, and what a valid
one is.

Records come from a Hub dataset (`hf:NAME`, through `datasets.load_dataset`), local .jsonl / .json /
.parquet files, a folder of them, a folder saved by `Dataset.save_to_disk`, or `pydoc-chat`: a small
built-in set (questions about standard-library functions answered by their docstrings' first paragraph,
with another function's answer as the rejected reply) for trying SFT and DPO offline. The files are read by
`lillm.data.sources`, as pretraining text is. Per record:

  SFT  {"messages": [{"role": ..., "content": ...}, ...]}          roles: system (first only), user, assistant
       {"prompt": "...", "response": "..."}                        (and an optional "system")
  DPO  {"prompt": "...", "chosen": "...", "rejected": "..."}
       {"chosen": [messages], "rejected": [messages]}              both lists share the prompt turns and end
                                                                    with the assistant reply (UltraFeedback's
                                                                    layout; a "prompt" field is then ignored)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lillm.data.sources import find_files, iter_file_records, iter_hf_records
from lillm.errors import UserError
from lillm.tokenizer import CHAT_ROLES

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
    packed_attention: Literal["auto", "flex", "dense"] = "auto"
    """With packing: 'flex' attends through compiled flex attention with a block mask from document ids,
    'dense' through SDPA with a boolean (B, 1, T, T) mask, 'auto' is flex on CUDA and dense elsewhere."""
    shuffle: bool = True
    """Shuffle rows each epoch (deterministically, by seed and epoch)."""

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"invalid ChatDataConfig: val_fraction must be in [0, 1), got {self.val_fraction}")


# -- reading records ---------------------------------------------------------------------------------
def iter_records(spec: str, split: str = "train", hf_config: str | None = None) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs; `where` names the file and line or record index for error messages."""
    if not spec:
        raise UserError("no data source given (data.source)")
    if spec == BUILTIN_CHAT:
        for i, rec in enumerate(_builtin_chat()):
            yield f"{BUILTIN_CHAT}: record {i}", rec
        return
    if spec.startswith("hf:"):
        yield from iter_hf_records(spec[3:], hf_config, split, streaming=False)
        return
    for f in find_files(spec, RECORD_SUFFIXES):
        yield from iter_file_records(f, split)


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
        if not isinstance(prompt, list):
            raise UserError(f"{where}: 'prompt' must be text or a list of messages, got {type(prompt).__name__}")
        prompt = check_messages([*prompt, {"role": "assistant", "content": chosen or " "}], where)[:-1]
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise UserError(f"{where}: empty {name} response")
    else:
        raise UserError(f"{where}: 'chosen' and 'rejected' must both be text or both be message lists")
    if chosen == rejected:
        raise UserError(f"{where}: chosen and rejected responses are identical: the pair carries no preference")
    return prompt, chosen, rejected
