"""`lillm prepare`: tokenize a text source into fixed-size binary token shards plus a manifest.

Layout of the output directory:
  manifest.json                      written last, atomically: the only file that says what is valid
  tokenizer/                         the tokenizer the shards were made with
  {split}-{run}-{index:05d}.bin      flat arrays of token ids (uint16, or uint32 past 65,535 ids)

Every document is stored as its tokens followed by <|end_of_text|> (see `lillm.tokenizer` for the
BOS policy). Documents go to the validation split by a hash of their text, so the split is stable
whatever the order or the number of workers. Shards are written as `.tmp` and renamed when complete;
the manifest is replaced last, so an interrupted run never leaves a manifest naming a missing or partial
shard. The shard names carry a run id, so a rerun never overwrites the shards a valid manifest names:
files the current manifest does not name are leftovers of an interrupted run and are removed.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lillm.data.sources import TextSource, dataset_source, in_validation
from lillm.errors import UserError
from lillm.files import read_json, write_json_atomic
from lillm.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^(train|val)-[0-9a-f]{8}-\d{5}\.bin(\.tmp)?$")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


# -- encoding, in worker processes ----------------------------------------------------------------
_WORKER_TOK: Tokenizer | None = None


def _init_worker(tokenizer_json: str, threads: bool = False) -> None:
    """Load the tokenizer; `threads` lets its Rust thread pool use every core (in-process mode)."""
    global _WORKER_TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
    from tokenizers import Tokenizer as HFTokenizer

    _WORKER_TOK = Tokenizer(HFTokenizer.from_str(tokenizer_json))


def _encode(texts: list[str], val_fraction: float, dtype: str) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Encode a batch; returns per-document token arrays (end-of-text appended), val flags, text bytes."""
    tok = _WORKER_TOK
    assert tok is not None
    ids = tok.encode_batch(texts)
    arrays = [np.array([*doc, tok.eos_id], dtype=dtype) for doc in ids]
    flags = np.array([in_validation(t, val_fraction) for t in texts], dtype=bool)
    return arrays, flags, sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


# -- shard writing -------------------------------------------------------------------------------
class ShardWriter:
    """Fills fixed-size shards of one split and writes each atomically when full."""

    def __init__(self, out_dir: Path, split: str, run_id: str, shard_tokens: int, dtype: np.dtype, eos_id: int):
        self.out_dir, self.split, self.run_id = out_dir, split, run_id
        self.buf = np.empty(shard_tokens, dtype=dtype)
        self.fill = 0
        self.eos_id = eos_id
        self.shards: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(self.buf) - self.fill, len(tokens))
            self.buf[self.fill : self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == len(self.buf):
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        data = self.buf[: self.fill]
        name = f"{self.split}-{self.run_id}-{len(self.shards):05d}.bin"
        tmp = self.out_dir / (name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.out_dir / name)
        self.shards.append({
            "file": name,
            "tokens": int(self.fill),
            "documents": int(np.count_nonzero(data == self.eos_id)),
            "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
        })
        self.fill = 0

    def summary(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
        }


def _batches(source: TextSource, batch_docs: int, batch_bytes: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in source:
        batch.append(text)
        size += len(text)
        if len(batch) >= batch_docs or size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared directory, checked for format."""
    path = Path(data_dir) / MANIFEST
    manifest = read_json(path, f"{data_dir}: no {MANIFEST}; run `lillm prepare` first (or the run was interrupted)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


def _clean_leftovers(out_dir: Path, keep: set[str]) -> int:
    """Remove shard files (ours by name) that no valid manifest names: leftovers of an interrupted run."""
    removed = 0
    for f in out_dir.iterdir():
        if SHARD_RE.match(f.name) and f.name not in keep:
            f.unlink()
            removed += 1
    return removed


def prepare(
    source: TextSource | Any,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_tokens: int = 1 << 26,
    val_fraction: float = 0.005,
    num_workers: int = 0,
    batch_docs: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `source` (a TextSource, or an in-memory `datasets.Dataset`/`IterableDataset` with a "text"
    column) into shards under `out_dir`; returns the manifest."""
    if not isinstance(source, TextSource):
        source = dataset_source(source)
    if shard_tokens < 1024:
        raise UserError(f"shard_tokens={shard_tokens} is too small (at least 1024)")
    if num_workers < 0:
        raise UserError(f"num_workers must be >= 0, got {num_workers}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tok = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tok.vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "source": source.describe(),
        "tokenizer_fingerprint": tok.fingerprint,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
    }
    keep: set[str] = set()
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        if old.get("settings") == settings and not overwrite:
            print(f"{out}: already prepared with these settings ({old['splits']['train']['tokens']:,} train tokens)")
            return old
        if not overwrite:
            raise UserError(f"{out} already holds shards made with other settings; pass --overwrite to replace them")
        keep = {s["file"] for split in old["splits"].values() for s in split["shards"]}
    removed = _clean_leftovers(out, keep)
    if removed:
        print(f"removed {removed} leftover shard file(s) of an interrupted run")

    run_id = hashlib.sha256(f"{time.time_ns()}{os.getpid()}".encode()).hexdigest()[:8]
    writers = {s: ShardWriter(out, s, run_id, shard_tokens, dtype, tok.eos_id) for s in ("train", "val")}
    workers = num_workers
    tok_json = tok.tok.to_str()
    bar = tqdm(total=None, unit="B", unit_scale=True, desc="prepare", disable=not progress, smoothing=0.1)
    start, n_bytes, n_tokens = time.time(), 0, 0

    def consume(result: tuple[list[np.ndarray], np.ndarray, int]) -> None:
        nonlocal n_bytes, n_tokens
        arrays, flags, size = result
        for arr, val in zip(arrays, flags):
            writers["val" if val else "train"].add(arr)
            n_tokens += len(arr)
        n_bytes += size
        bar.update(size)
        elapsed = max(time.time() - start, 1e-9)
        bar.set_postfix_str(f"{n_bytes / elapsed / 1e6:.2f} MB/s, {n_tokens / elapsed / 1e3:.0f}k tok/s", refresh=False)

    batches = _batches(source, batch_docs, batch_bytes=8 << 20)
    try:
        if workers <= 1:
            # One process; with workers=0 the tokenizer's own (Rust, GIL-free) thread pool spreads each batch
            # over every core, which beats worker processes on small machines: no pickling, no IPC.
            _init_worker(tok_json, threads=workers == 0)
            for batch in batches:
                consume(_encode(batch, val_fraction, dtype.str))
        else:
            ctx = mp.get_context("spawn")  # no fork: the parent may hold tokenizer threads
            with ctx.Pool(workers, initializer=_init_worker, initargs=(tok_json,)) as pool:
                # A bounded window of batches in flight keeps memory flat whatever the corpus size.
                pending: deque = deque()
                for batch in batches:
                    pending.append(pool.apply_async(_encode, (batch, val_fraction, dtype.str)))
                    if len(pending) >= 2 * workers:
                        consume(pending.popleft().get())
                while pending:
                    consume(pending.popleft().get())
        for w in writers.values():
            w.flush()
    except BaseException:
        bar.close()
        _clean_leftovers(out, keep)  # what this run wrote is unreferenced; the old manifest stays valid
        raise
    bar.close()
    if writers["train"].summary()["documents"] == 0 and writers["val"].summary()["documents"] == 0:
        _clean_leftovers(out, keep)
        raise UserError(f"source {source.spec!r} holds no documents")
    tok.save(out / "tokenizer")
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": settings,
        "source": source.describe(),
        "tokenizer": {
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "special_ids": {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "eot": tok.eot_id},
        },
        "dtype": dtype.name,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "splits": {s: w.summary() for s, w in writers.items()},
        "totals": {"tokens": n_tokens, "documents": source.stats["documents"], "text_bytes": n_bytes,
                   "replaced_documents": source.stats["replaced_documents"]},
    }
    write_json_atomic(out / MANIFEST, manifest)
    _clean_leftovers(out, {s["file"] for w in writers.values() for s in w.shards})
    elapsed = time.time() - start
    print(
        f"prepared {source.stats['documents']:,} documents, {n_tokens:,} tokens "
        f"(train {manifest['splits']['train']['tokens']:,}, val {manifest['splits']['val']['tokens']:,}) "
        f"in {elapsed:.1f}s: {n_bytes / elapsed / 1e6:.2f} MB/s"
        + (f"; {source.stats['replaced_documents']} document(s) had undecodable bytes replaced"
           if source.stats["replaced_documents"] else "")
    )
    return manifest


def verify(data_dir: str | os.PathLike, checksums: bool = True) -> dict[str, Any]:
    """Check every shard the manifest names: present, of the right size, and (optionally) its sha256."""
    out = Path(data_dir)
    manifest = read_manifest(out)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in manifest["splits"].values():
        for s in split["shards"]:
            f = out / s["file"]
            if not f.is_file():
                raise UserError(f"{f}: shard named in the manifest is missing")
            if f.stat().st_size != s["tokens"] * itemsize:
                raise UserError(f"{f}: size {f.stat().st_size} bytes, manifest says {s['tokens'] * itemsize}")
            if checksums:
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 24), b""):
                        h.update(chunk)
                if h.hexdigest() != s["sha256"]:
                    raise UserError(f"{f}: sha256 mismatch; the shard is corrupt")
    return manifest
