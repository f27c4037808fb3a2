"""The run directory: where a training run keeps its checkpoints, and how a path names one.

Layout under a run directory:
  checkpoints/step_00001000/          DeepSpeed's files (one optimizer shard per rank), plus
      rng_rank{r}.pt                  each rank's RNG states
      adapter.safetensors             a LoRA run's adapter (the frozen base is not in the checkpoint)
      config.yaml                     the resolved configuration that wrote it
      lillm.json                      what the run is (model config, tokenizer, objective ...), its step and
                                      world size; written last, by rank 0: a tag without it is incomplete
  checkpoints/step_00001000_universal/  made on demand by `ds_to_universal` for another world size
  checkpoints/latest                  the newest complete tag; replaced atomically after every rank wrote
  tokenizer/, config.yaml, ds_config.json, metrics.jsonl
  data-verified.json                  `--data.verify`'s result: the shards it checked, reused while they stay
  tensorboard/<name>/                 TensorBoard events, <name> the run directory's own name

Both the trainer (which writes checkpoints) and inference loading (which reads them) build on this module;
it imports nothing of lillm's but errors and files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

from lillm.errors import UserError
from lillm.files import sampled_sha256

TAG_RE = re.compile(r"^step_(\d{8})$")
META = "lillm.json"
ADAPTER = "adapter.safetensors"
LATEST = "latest"
DATA_VERIFIED = "data-verified.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def tensorboard_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run's TensorBoard events go: a folder named as the run, so that `tensorboard --logdir
    RUN/tensorboard` shows the run by its name (events directly in the log dir show as ".")."""
    return Path(run_dir) / "tensorboard" / (Path(run_dir).resolve().name or "run")


def tensorboard_hint(run_dir: str | os.PathLike, pinned: list[str]) -> str:
    """How to look at a run: the `tensorboard` command, and the address that opens it with the `pinned` scalar
    cards at the top (TensorBoard's Time Series view lists groups alphabetically, so `perf/` would come first;
    its `pinnedCards` query parameter pins cards from the address), unsmoothed: lillm's train scalars are already
    means over their log interval, and TensorBoard's default smoothing (0.6) would drag a handful of evaluations
    far from their values."""
    cards = json.dumps([{"plugin": "scalars", "tag": tag} for tag in pinned], separators=(",", ":"))
    return (f"TensorBoard: tensorboard --logdir {tensorboard_dir(run_dir).parent}, then open "
            f"http://localhost:6006/?pinnedCards={urllib.parse.quote(cards, safe='/:,')}&smoothing=0#timeseries "
            f"({', '.join(pinned)} pinned at the top)")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def universal_dir(tag_dir: Path) -> Path:
    """Where a tag's universal-format copy lives (made on demand, for a resume at another world size)."""
    return tag_dir.with_name(tag_dir.name + "_universal")


def read_meta(tag_dir: Path) -> dict[str, Any]:
    """A checkpoint's lillm.json, checked for encoding and shape (every reader of it relies on these fields);
    refuses a tag that has none (an interrupted save) or a damaged one, naming the file."""
    f = tag_dir / META
    if not f.is_file():
        raise UserError(f"{tag_dir}: not a complete lillm checkpoint (no {META})")
    try:
        meta = json.loads(f.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: unreadable ({e})") from None
    except OSError as e:
        raise UserError(f"{f}: cannot be read ({e.strerror})") from None
    if problem := _meta_problem(meta):
        raise UserError(f"{f}: {problem} (damaged)")
    return meta


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with a lillm.json's shape, or None."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"

    def count(key: str, least: int) -> bool:
        v = meta.get(key)
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    for key, least in (("step", 0), ("world_size", 1)):
        if not count(key, least):
            return f"{key!r} is {meta.get(key)!r}, expected an integer >= {least}"
    if not isinstance(meta.get("model_config"), dict):
        return "no 'model_config' object"
    if not isinstance(meta.get("tokenizer_fingerprint"), str):
        return "no 'tokenizer_fingerprint' string"
    if meta.get("objective", "pretrain") not in ("pretrain", "sft", "dpo"):
        return f"'objective' is {meta.get('objective')!r}"
    for key, kind in (("train_config", dict), ("files", dict), ("lora", dict), ("init_from", str),
                      ("base_fingerprint", str)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            return f"{key!r} is a {type(meta[key]).__name__}"
    for name, want in (meta.get("files") or {}).items():
        if not isinstance(want, dict) or not isinstance(want.get("size"), int):
            return f"the file record of {name!r} has no size"
    return None


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag that `ckpt_dir/latest` names; None where there is no `latest`. A `latest` that is empty,
    undecodable or names no tag is damaged: refused naming the file."""
    f = ckpt_dir / LATEST
    if not f.is_file():
        return None
    try:
        text = f.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UserError(f"{f}: not text (damaged)") from None
    except OSError as e:
        raise UserError(f"{f}: cannot be read ({e.strerror})") from None
    if not TAG_RE.match(text):
        raise UserError(f"{f}: {'empty' if not text else f'names {text[:40]!r}, not a checkpoint tag'} (damaged)")
    return text


SMALL_FILE = 4 << 20  # files up to this size get a full sha256 in the integrity record; larger ones a sampled one
SAMPLES, SAMPLE_BYTES = 16, 64 << 10  # a larger file's record hashes 1 MiB of it (`lillm.files.sampled_sha256`)


def file_record(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """Every file of a tag but lillm.json: its size, and a sha256 of the whole file for the small ones (config,
    RNG states, an adapter) or of sampled blocks for the large ones (model states, optimizer shards): a lil-39m
    tag's 605 MiB are checked by reading about 5 MiB."""
    out = {}
    for p in sorted(tag_dir.rglob("*")):
        if p.is_file() and p.name != META:
            size = p.stat().st_size
            entry: dict[str, Any] = {"size": size}
            if size <= SMALL_FILE:
                entry["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                entry["sampled_sha256"] = sampled_sha256(p, SAMPLES, SAMPLE_BYTES)
            out[p.relative_to(tag_dir).as_posix()] = entry
    return out


def checkpoint_problem(tag_dir: Path) -> str | None:
    """What is wrong with a tag (None when it is complete and intact), from its lillm.json and the file
    record in it. Tags written before the record existed are checked for lillm.json only."""
    try:
        meta = read_meta(tag_dir)
    except UserError as e:
        return str(e)
    for name, want in (meta.get("files") or {}).items():
        f = tag_dir / name
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f}: {size} bytes, {want['size']} when saved (truncated or changed)"
        if "sha256" in want and hashlib.sha256(f.read_bytes()).hexdigest() != want["sha256"]:
            return f"{f}: contents changed since it was saved (sha256 mismatch)"
        if "sampled_sha256" in want and sampled_sha256(f, SAMPLES, SAMPLE_BYTES) != want["sampled_sha256"]:
            return f"{f}: contents changed since it was saved (same size, sampled sha256 mismatch)"
    return None


def check_checkpoint(tag_dir: Path) -> None:
    """Refuse a damaged checkpoint with one line naming what is wrong, and the run's newest intact tag if any."""
    problem = checkpoint_problem(tag_dir)
    if problem:
        hint = _intact_hint(run_dir_of(tag_dir)) if TAG_RE.match(tag_dir.name) else ""
        raise UserError(f"checkpoint {tag_dir} is damaged: {problem}{hint}")


def newest_intact_tag(run_dir: str | os.PathLike) -> Path | None:
    """The run's newest tag that passes `checkpoint_problem` (older ones are not read)."""
    d = checkpoints_dir(run_dir)
    tags = sorted((p for p in d.iterdir() if p.is_dir() and TAG_RE.match(p.name)), reverse=True) if d.is_dir() else []
    return next((t for t in tags if checkpoint_problem(t) is None), None)


def resolve_checkpoint(spec: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> Path | None:
    """A checkpoint tag directory from 'auto', 'none', a tag name, a run dir, a checkpoints dir or a tag dir.
    A damaged `latest` is refused naming it, and the run's newest intact tag, where there is one."""
    spec = str(spec)
    if spec == "none":
        return None
    if spec == "auto":
        if run_dir is None:
            return None
        tag = _latest_or_hint(checkpoints_dir(run_dir))
        return checkpoints_dir(run_dir) / tag if tag else None
    p = Path(spec)
    if not p.exists() and run_dir is not None and (checkpoints_dir(run_dir) / spec).is_dir():
        p = checkpoints_dir(run_dir) / spec
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / LATEST).is_file():
        p = p / _latest_or_hint(p)
    if not p.is_dir():
        raise UserError(f"checkpoint {spec!r}: not found")
    try:
        read_meta(p)
    except UserError as e:
        raise UserError(f"{e}{_intact_hint(p.parent.parent) if TAG_RE.match(p.name) else ''}") from None
    return p


def _latest_or_hint(ckpt_dir: Path) -> str | None:
    try:
        return read_latest(ckpt_dir)
    except UserError as e:
        raise UserError(f"{e}{_intact_hint(ckpt_dir.parent)}") from None


def _intact_hint(run_dir: Path) -> str:
    intact = newest_intact_tag(run_dir)
    return f"; the newest intact checkpoint of this run is {intact}" if intact is not None else ""


def is_checkpoint_path(p: Path) -> bool:
    return (p / "checkpoints" / LATEST).is_file() or (p / LATEST).is_file() or (p / META).is_file()


def run_dir_of(tag_dir: Path) -> Path:
    """The run directory a tag directory belongs to."""
    return tag_dir.parent.parent
