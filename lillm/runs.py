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


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def universal_dir(tag_dir: Path) -> Path:
    """Where a tag's universal-format copy lives (made on demand, for a resume at another world size)."""
    return tag_dir.with_name(tag_dir.name + "_universal")


def read_meta(tag_dir: Path) -> dict[str, Any]:
    """A checkpoint's lillm.json; refuses a tag that has none (an interrupted save)."""
    f = tag_dir / META
    if not f.is_file():
        raise UserError(f"{tag_dir}: not a complete lillm checkpoint (no {META})")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: unreadable ({e})") from None


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
        intact = newest_intact_tag(run_dir_of(tag_dir)) if TAG_RE.match(tag_dir.name) else None
        hint = f"; the newest intact checkpoint of this run is {intact}" if intact is not None else ""
        raise UserError(f"checkpoint {tag_dir} is damaged: {problem}{hint}")


def newest_intact_tag(run_dir: str | os.PathLike) -> Path | None:
    """The run's newest tag that passes `checkpoint_problem` (older ones are not read)."""
    d = checkpoints_dir(run_dir)
    tags = sorted((p for p in d.iterdir() if p.is_dir() and TAG_RE.match(p.name)), reverse=True) if d.is_dir() else []
    return next((t for t in tags if checkpoint_problem(t) is None), None)


def resolve_checkpoint(spec: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> Path | None:
    """A checkpoint tag directory from 'auto', 'none', a tag name, a run dir, a checkpoints dir or a tag dir."""
    spec = str(spec)
    if spec == "none":
        return None
    if spec == "auto":
        if run_dir is None:
            return None
        latest = checkpoints_dir(run_dir) / LATEST
        return checkpoints_dir(run_dir) / latest.read_text().strip() if latest.is_file() else None
    p = Path(spec)
    if not p.exists() and run_dir is not None and (checkpoints_dir(run_dir) / spec).is_dir():
        p = checkpoints_dir(run_dir) / spec
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / LATEST).is_file():
        p = p / (p / LATEST).read_text().strip()
    if not p.is_dir():
        raise UserError(f"checkpoint {spec!r}: not found")
    read_meta(p)
    return p


def is_checkpoint_path(p: Path) -> bool:
    return (p / "checkpoints" / LATEST).is_file() or (p / LATEST).is_file() or (p / META).is_file()


def run_dir_of(tag_dir: Path) -> Path:
    """The run directory a tag directory belongs to."""
    return tag_dir.parent.parent
