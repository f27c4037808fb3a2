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

import contextlib
import hashlib
import multiprocessing as mp
import os
import re
import shutil
import sys
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
SHARD_RE = re.compile(r"^(train|val)-[0-9a-f]{8}-\d{5,}\.bin(\.tmp)?$")


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


PIECE_CHARS = 1 << 20
"""Documents longer than this are encoded in pieces: the Rust tokenizer needs about 100 bytes of memory per
character of one text, so a 50 MB single-line document would take over 5 GB in one call."""


def _pieces(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """Cut a long text before a space that has non-space on both sides, within `limit` characters a piece.

    Such a space starts a pre-token in GPT-2 and Llama-3 style byte-level pre-tokenizers (" word"), and no
    pre-token spans it, so the pieces encode to exactly the ids of the whole. A stretch of `limit // 2`
    characters without such a space (rare outside binary junk) is cut where the piece ends.
    """
    out, start = [], 0
    while len(text) - start > limit:
        end = start + limit
        cut = text.rfind(" ", start + limit // 2, end)
        while cut > 0 and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + limit // 2, cut)
        end = cut if cut > 0 else end
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return out


def _encode(texts: list[str], val_fraction: float, dtype: str) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Encode a batch; returns per-document token arrays (end-of-text appended), val flags, text bytes."""
    tok = _WORKER_TOK
    assert tok is not None
    eos = np.array([tok.eos_id], dtype=dtype)
    if max(map(len, texts), default=0) <= PIECE_CHARS:
        arrays = [np.array([*doc, tok.eos_id], dtype=dtype) for doc in tok.encode_batch(texts)]
    else:  # a huge document in the batch: every document on its own, 8 pieces at a time (as a batch's 8 MB)
        arrays = []
        for text in texts:
            pieces = _pieces(text)
            parts = [np.array(ids, dtype=dtype) for i in range(0, len(pieces), 8)
                     for ids in tok.encode_batch(pieces[i : i + 8])]
            arrays.append(np.concatenate([*parts, eos]))
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
        try:
            with open(tmp, "wb") as fh:
                fh.write(data.tobytes())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.out_dir / name)
        except OSError as e:  # a full disk: the error names the shard (prepare then removes this run's files)
            raise OSError(e.errno, e.strerror or str(e), str(self.out_dir / name)) from None
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
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise UserError(f"{path}: format_version {version!r}, expected {FORMAT_VERSION}")
    if problem := _manifest_problem(manifest):
        raise UserError(f"{path}: {problem}; the manifest is damaged (rerun `lillm prepare` with --overwrite)")
    return manifest


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's fields that readers rely on, or None."""

    def count(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    tok = m.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("fingerprint"), str) or not count(tok.get("vocab_size")):
        return "'tokenizer' needs a 'fingerprint' string and a 'vocab_size' count"
    if m.get("dtype") not in ("uint16", "uint32"):
        return f"'dtype' is {m.get('dtype')!r}, expected 'uint16' or 'uint32'"
    if m["dtype"] != token_dtype(tok["vocab_size"]).name:
        return f"'dtype' {m['dtype']} cannot hold the ids of a {tok['vocab_size']:,}-token vocabulary"
    splits = m.get("splits")
    if not isinstance(splits, dict) or "train" not in splits or not set(splits) <= {"train", "val"}:
        return "'splits' must hold 'train' (and may hold 'val')"
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list):
            return f"split {name!r} has no 'shards' list"
        for i, s in enumerate(shards):
            file = s.get("file") if isinstance(s, dict) else None
            if not isinstance(file, str) or not SHARD_RE.match(file) or file.endswith(".tmp"):
                return f"shard {i} of split {name!r} names {file!r}, not a shard file of this directory"
            if not count(s.get("tokens")) or not count(s.get("documents")) or not isinstance(s.get("sha256"), str):
                return f"shard {file} needs 'tokens' and 'documents' counts and a 'sha256' string"
    return None


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
    column) into shards under `out_dir`; returns the manifest.

    In steps: check the options; decide what an existing directory means (already done, to be replaced, or
    refused); encode into new shard files; write the manifest, which is what makes them count. A failure
    before the manifest removes this run's files and leaves an earlier manifest valid."""
    if not isinstance(source, TextSource):
        source = dataset_source(source)
    _check_options(shard_tokens, num_workers, val_fraction)
    tok = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tok.vocab_size)
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"source": source.describe(), "tokenizer_fingerprint": tok.fingerprint, "shard_tokens": shard_tokens,
                "val_fraction": val_fraction}
    done, keep = _existing(out, settings, overwrite)
    if done is not None:
        return done
    if removed := _clean_leftovers(out, keep):
        print(f"removed {removed} leftover shard file(s) of an interrupted run")
    run_id = hashlib.sha256(f"{time.time_ns()}{os.getpid()}".encode()).hexdigest()[:8]
    writers = {s: ShardWriter(out, s, run_id, shard_tokens, dtype, tok.eos_id) for s in ("train", "val")}
    counter = _Counter(progress)
    try:
        _encode_all(_batches(source, batch_docs, batch_bytes=8 << 20), writers, counter, num_workers, tok.tok.to_str(),
                    val_fraction, dtype)
        if all(w.summary()["documents"] == 0 for w in writers.values()):
            raise UserError(f"source {source.spec!r} holds no documents")
    except BaseException:
        counter.close()
        _clean_leftovers(out, keep)  # what this run wrote is unreferenced; the old manifest stays valid
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    counter.close()
    tok.save(out / "tokenizer")
    manifest = _manifest(settings, source, tok, dtype, writers, counter)
    write_json_atomic(out / MANIFEST, manifest)
    _clean_leftovers(out, {s["file"] for w in writers.values() for s in w.shards})
    print(_done_line(source.stats, manifest, counter))
    return manifest


def _done_line(stats: dict[str, int], manifest: dict[str, Any], counter: _Counter) -> str:
    """prepare's last line: what it made, how fast, and what the source left out or changed."""
    elapsed = time.time() - counter.start
    return (f"prepared {stats['documents']:,} documents, {counter.tokens:,} tokens "
            f"(train {manifest['splits']['train']['tokens']:,}, val {manifest['splits']['val']['tokens']:,}) "
            f"in {elapsed:.1f}s: {counter.bytes / elapsed / 1e6:.2f} MB/s"
            + (f"; {stats['replaced_documents']} document(s) had undecodable bytes replaced"
               if stats["replaced_documents"] else "")
            + (f"; {stats['empty_files']} empty file(s) skipped" if stats.get("empty_files") else ""))


def _check_options(shard_tokens: int, num_workers: int, val_fraction: float) -> None:
    if shard_tokens < 1024:
        raise UserError(f"shard_tokens={shard_tokens} is too small (at least 1024)")
    if num_workers < 0:
        raise UserError(f"num_workers must be >= 0, got {num_workers}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _existing(out: Path, settings: dict[str, Any], overwrite: bool) -> tuple[dict[str, Any] | None, set[str]]:
    """What `out` already holds: (its manifest, when it was prepared with these settings and nothing is to be
    overwritten; else None) and the shard files an existing manifest names (kept until the new one exists).
    Refuses shards of other settings without `overwrite`."""
    if not (out / MANIFEST).is_file():
        return None, set()
    try:
        old = read_manifest(out)
    except UserError:
        if not overwrite:
            raise
        old = {"settings": None, "splits": {}}  # a damaged manifest names nothing worth keeping
    if old.get("settings") == settings and not overwrite:
        train_tokens = sum(s["tokens"] for s in old["splits"]["train"]["shards"])
        print(f"{out}: already prepared with these settings ({train_tokens:,} train tokens)")
        return old, set()
    if not overwrite:
        raise UserError(f"{out} already holds shards made with other settings; pass --overwrite to replace them")
    return None, {s["file"] for split in old["splits"].values() for s in split["shards"]}


class _Counter:
    """Bytes and tokens encoded so far, and the progress bar (opened with the first batch, so a source that
    holds nothing prints only its error)."""

    def __init__(self, progress: bool) -> None:
        self.progress, self.bar = progress, None
        self.start, self.bytes, self.tokens = time.time(), 0, 0

    def add(self, size: int, tokens: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=None, unit="B", unit_scale=True, desc="prepare", smoothing=0.1,
                            disable=None if self.progress else True)  # None: on a terminal only
        self.bytes += size
        self.tokens += tokens
        self.bar.update(size)
        elapsed = max(time.time() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.bytes / elapsed / 1e6:.2f} MB/s, {self.tokens / elapsed / 1e3:.0f}k tok/s",
                                 refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """Start spawned workers without running the caller's main script in them.

    A spawned process normally imports the parent's `__main__` first (by its file, or its module name under
    `python -m`), so that functions defined there can be unpickled. The encode workers need only this module's
    functions and lists of strings, and importing a script that calls `prepare` at its top level, with no
    `if __name__ == "__main__":` guard, would call `prepare` again inside every worker: Python then refuses
    to start processes from a bootstrapping child, the worker dies, and the pool waits for it forever. Without
    a file or module name on `__main__` while the workers start, they skip that step, so `prepare` with
    workers works from any script, guarded or not, and from a notebook."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _encode_all(batches: Any, writers: dict[str, ShardWriter], counter: _Counter, workers: int, tok_json: str,
                val_fraction: float, dtype: np.dtype) -> None:
    """Encode every batch into the writers (in source order) and flush them."""

    def consume(result: tuple[list[np.ndarray], np.ndarray, int]) -> None:
        arrays, flags, size = result
        for arr, val in zip(arrays, flags):
            writers["val" if val else "train"].add(arr)
        counter.add(size, sum(len(arr) for arr in arrays))

    if workers <= 1:
        # One process; with workers=0 the tokenizer's own (Rust, GIL-free) thread pool spreads each batch
        # over every core, which beats worker processes on small machines: no pickling, no IPC.
        _init_worker(tok_json, threads=workers == 0)
        for batch in batches:
            consume(_encode(batch, val_fraction, dtype.str))
    else:
        ctx = mp.get_context("spawn")  # no fork: the parent may hold tokenizer threads
        with _main_not_rerun():
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok_json,))
        with pool:
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


def _manifest(settings: dict[str, Any], source: TextSource, tok: Any, dtype: np.dtype,
              writers: dict[str, ShardWriter], counter: _Counter) -> dict[str, Any]:
    return {
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
        "shard_tokens": settings["shard_tokens"],
        "val_fraction": settings["val_fraction"],
        "splits": {s: w.summary() for s, w in writers.items()},
        "totals": {"tokens": counter.tokens, "documents": source.stats["documents"], "text_bytes": counter.bytes,
                   "replaced_documents": source.stats["replaced_documents"]},
    }


def verify(data_dir: str | os.PathLike, checksums: bool = True, part: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Check every shard the manifest names: present and of the right size; with `checksums`, also its sha256.
    `part=(i, n)` hashes only every n-th shard from the i-th (over both splits), so that n processes share one
    pass over the data (`lillm.train.pretrain` splits it over the ranks); sizes are checked for all."""
    out = Path(data_dir)
    manifest = read_manifest(out)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    for k, s in enumerate(shards):
        f = out / s["file"]
        if not f.is_file():
            raise UserError(f"{f}: shard named in the manifest is missing")
        if f.stat().st_size != s["tokens"] * itemsize:
            raise UserError(f"{f}: size {f.stat().st_size} bytes, manifest says {s['tokens'] * itemsize}")
        if checksums and k % part[1] == part[0] and file_sha256(f) != s["sha256"]:
            raise UserError(f"{f}: sha256 mismatch; the shard is corrupt")
    return manifest


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
