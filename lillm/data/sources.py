"""Text sources shared by every data command: the Hugging Face Hub, local files, and a built-in corpus.

A source spec is a string:
  pydoc                  the built-in offline corpus: Python's own documentation (pydoc topics and the
                         standard library's docstrings), about 2.3 MB of English prose
  stdlib                 the built-in benchmark corpus: every .py file of the standard library, tests
                         included, one document each (about 31 MB of code, comments and docstrings on
                         Python 3.11), large enough that a learning benchmark reads no window twice
  hf:NAME                a `datasets` dataset by Hub name (or a local dataset folder), read with
                         `datasets.load_dataset(NAME, config, split=..., streaming=...)`
  PATH, DIR or GLOB      .txt (one document per file), .jsonl / .json (one document per record, the text
                         field), .parquet (the text column), or a folder saved by `Dataset.save_to_disk`

Undecodable bytes in .txt/.jsonl files follow `errors`: "replace" (U+FFFD, and the document is counted
in `stats["replaced_documents"]`) or "strict" (stop with the file and line).
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lillm.errors import UserError

BUILTIN = "pydoc"
BUILTIN_CODE = "stdlib"
BUILTINS = (BUILTIN, BUILTIN_CODE)
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass
class TextSource:
    """Where documents come from; iterate it for the texts, in a fixed order."""

    spec: str
    """Source spec: 'pydoc', 'hf:NAME', or a path, folder or glob (see the module docstring)."""
    text_field: str = "text"
    """Field (or column) holding the document text in JSON, parquet and `datasets` sources."""
    hf_config: str | None = None
    """Dataset configuration name for hf: sources."""
    split: str = "train"
    """Split to read from hf: sources and saved datasets."""
    streaming: bool = True
    """Stream hf: sources instead of downloading them whole."""
    errors: Literal["replace", "strict"] = "replace"
    """Undecodable bytes: replace them (and count the document) or stop with an error."""
    stats: dict[str, int] = field(default_factory=lambda: {"documents": 0, "replaced_documents": 0,
                                                           "empty_files": 0})
    dataset: Any = field(default=None, repr=False)
    """An in-memory `datasets.Dataset` or `IterableDataset` to read instead of `spec` (see `dataset_source`)."""

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this source."""
        out: dict[str, Any] = {"spec": self.spec, "text_field": self.text_field}
        if self.dataset is not None:
            out["fingerprint"] = getattr(self.dataset, "_fingerprint", None)
        if self.spec.startswith("hf:"):
            out.update(hf_config=self.hf_config, split=self.split)
        return out

    def __iter__(self) -> Iterator[str]:
        if self.dataset is not None:
            it = (self._field(rec, f"{self.spec}: record {i}") for i, rec in enumerate(self.dataset))
        elif self.spec == BUILTIN:
            it = _builtin_corpus()
        elif self.spec == BUILTIN_CODE:
            it = _stdlib_sources(self.errors, self.stats)
        elif self.spec.startswith("hf:"):
            it = self._iter_hf()
        else:
            it = self._iter_files()
        for text in it:
            self.stats["documents"] += 1
            yield text

    # -- Hugging Face datasets -------------------------------------------------------------------
    def _iter_hf(self) -> Iterator[str]:
        for where, rec in iter_hf_records(self.spec[3:], self.hf_config, self.split, self.streaming):
            yield self._field(rec, where)

    def _field(self, rec: Any, where: str) -> str:
        if not isinstance(rec, dict) or self.text_field not in rec:
            keys = list(rec) if isinstance(rec, dict) else type(rec).__name__
            raise UserError(f"{where}: no text field {self.text_field!r} (has {keys})")
        text = rec[self.text_field]
        if not isinstance(text, str):
            raise UserError(f"{where}: field {self.text_field!r} is {type(text).__name__}, not text")
        return text

    # -- local files -----------------------------------------------------------------------------
    def files(self) -> list[Path]:
        """The files this spec names, sorted; a saved `datasets` folder is returned as itself."""
        return find_files(self.spec, TEXT_SUFFIXES)

    def _iter_files(self) -> Iterator[str]:
        for f in self.files():
            if f.suffix == ".txt" and not f.is_dir():
                text = decode(f.read_bytes(), str(f), self.errors, self.stats)
                if text:  # an empty file holds no document, as an empty .jsonl holds no record
                    yield text
                else:
                    self.stats["empty_files"] += 1
                continue
            columns = None if f.suffix == ".json" or _is_jsonl(f) else [self.text_field]
            for where, rec in iter_file_records(f, self.split, self.errors, self.stats, columns):
                yield self._field(rec, where)


# -- records from files, shared by text sources and chat data -----------------------------------------
def find_files(spec: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The files a path, folder or glob names, sorted; a folder saved by `Dataset.save_to_disk` is returned
    as itself."""
    p = Path(spec)
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            return [p]
        found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        if not found:
            raise UserError(f"{p}: folder holds no {', '.join(suffixes)} files")
        return found
    if p.is_file():
        if p.suffix not in suffixes:
            raise UserError(f"{p}: unsupported file type {p.suffix!r}; expected {', '.join(suffixes)}")
        return [p]
    if glob.has_magic(spec):
        found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).suffix in suffixes)
        if not found:
            raise UserError(f"{spec}: the pattern matches no {', '.join(suffixes)} files")
        return found
    raise UserError(f"{spec}: no such file or directory (and not a built-in source: {', '.join(BUILTINS)})")


def decode(data: bytes, where: str, errors: str = "replace", stats: dict[str, int] | None = None) -> str:
    """UTF-8 text; undecodable bytes are replaced (and counted in stats["replaced_documents"]) or refused."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise UserError(f"{where}: undecodable bytes at offset {e.start} (use errors='replace')") from None
        if stats is not None:
            stats["replaced_documents"] += 1
        return data.decode("utf-8", errors="replace")


def iter_file_records(f: Path, split: str = "train", errors: str = "replace", stats: dict[str, int] | None = None,
                      columns: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    """(where, record) from one .jsonl / .json / .parquet file or saved dataset folder; `where` names the
    file and line, record or row for error messages. `columns` limits what parquet and saved datasets read."""
    if f.is_dir():
        yield from _iter_saved(f, split, columns)
    elif f.suffix == ".parquet":
        yield from _iter_parquet(f, columns)
    elif _is_jsonl(f):
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    yield f"{f}:{lineno}", json.loads(decode(raw, f"{f}:{lineno}", errors, stats))
                except json.JSONDecodeError as e:
                    raise UserError(f"{f}:{lineno}: invalid JSON: {e.msg}") from None
    else:
        try:
            data = json.loads(decode(f.read_bytes(), str(f), errors, stats))
        except json.JSONDecodeError as e:
            raise UserError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(data, list):
            raise UserError(f"{f}: expected a JSON list of records or JSON lines")
        for i, rec in enumerate(data):
            yield f"{f}: record {i}", rec


def iter_hf_records(name: str, hf_config: str | None, split: str, streaming: bool) -> Iterator[tuple[str, Any]]:
    """(where, record) from `datasets.load_dataset(name, hf_config, split=split)`: a Hub name or a local folder."""
    import datasets

    try:
        ds = datasets.load_dataset(name, hf_config, split=split, streaming=streaming)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"cannot load dataset {name!r} (config {hf_config}, split {split}): {e}") from None
    for i, rec in enumerate(ds):
        yield f"{name}[{split}]: record {i}", rec


def _is_jsonl(f: Path) -> bool:
    if f.suffix == ".jsonl":
        return True
    if f.suffix != ".json" or not f.is_file():
        return False
    with open(f, "rb") as fh:
        head = fh.read(64).lstrip()
    return head.startswith(b"{")


def _iter_parquet(f: Path, columns: list[str] | None) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise UserError(f"{f}: not a readable parquet file ({e})") from None
    missing = [c for c in columns or [] if c not in pf.schema_arrow.names]
    if missing:
        raise UserError(f"{f}: no column {missing[0]!r} (has {pf.schema_arrow.names})")
    i = 0
    for batch in pf.iter_batches(columns=columns, batch_size=1024):
        for rec in batch.to_pylist():
            yield f"{f}: row {i}", rec
            i += 1


def _iter_saved(folder: Path, split: str, columns: list[str] | None) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{folder}: not a readable saved dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{folder}: no split {split!r} (has {list(ds)})")
        ds = ds[split]
    missing = [c for c in columns or [] if c not in ds.column_names]
    if missing:
        raise UserError(f"{folder}: no column {missing[0]!r} (has {ds.column_names})")
    if columns:
        ds = ds.select_columns(columns)
    i = 0
    for batch in ds.iter(batch_size=1024):
        for rec in (dict(zip(batch, row)) for row in zip(*batch.values())):
            yield f"{folder}[{split}]: row {i}", rec
            i += 1


def in_validation(key: str, fraction: float) -> bool:
    """The one train/validation split: by a hash of the content, so the same document or record lands in the
    same split whatever the order, the worker count or the machine."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h < fraction * 2**64


def open_source(spec: str, **kwargs: Any) -> TextSource:
    """A TextSource for `spec`; checks up front that local paths exist."""
    src = TextSource(spec, **kwargs)
    if spec not in BUILTINS and not spec.startswith("hf:"):
        src.files()
    return src


def dataset_source(dataset: Any, text_field: str = "text") -> TextSource:
    """A TextSource over an in-memory `datasets.Dataset` or `IterableDataset` (one document per record), for
    `lillm.data.prepare.prepare` from Python:

        prepare(dataset_source(ds.filter(keep)), "data/tok", "data/shards")
    """
    import datasets

    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise UserError(f"expected a datasets.Dataset or IterableDataset, got {type(dataset).__name__} (for a "
                        "DatasetDict, pick a split: dataset['train'])")
    names = dataset.column_names
    if names is not None and text_field not in names:
        raise UserError(f"the dataset has no column {text_field!r} (has {names})")
    return TextSource(f"<in-memory {type(dataset).__name__}>", text_field=text_field, dataset=dataset)


def iter_texts(source: TextSource, limit: int | None = None, every: int = 1) -> Iterator[str]:
    """Documents of a source, every `every`-th one, at most `limit` of them."""
    n = 0
    for i, text in enumerate(source):
        if i % every:
            continue
        if limit is not None and n >= limit:
            return
        n += 1
        yield text


def _builtin_corpus() -> Iterator[str]:
    """Python's documentation: each pydoc topic, then each standard-library module's docstrings.

    Deterministic for a given Python version: topics in key order, modules in path order. Module
    sources are parsed, never imported.
    """
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib)
        if skip.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(f.read_bytes())
        except (SyntaxError, ValueError):
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    docs.append(doc)
        if docs:
            yield "\n\n".join(docs)



def _stdlib_sources(errors: str = "replace", stats: dict[str, int] | None = None) -> Iterator[str]:
    """Every .py file of the standard library (site-packages left out), one document each, in path order.

    Decoded as UTF-8 by `errors` (a handful of test files hold deliberately broken encodings). Deterministic
    for a given Python build; distributions that strip the `test` package give about a third of it.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(stdlib.rglob("*.py")):
        if "site-packages" in f.relative_to(stdlib).parts or not f.is_file():
            continue
        text = decode(f.read_bytes(), str(f), errors, stats)
        if text.strip():
            yield text
