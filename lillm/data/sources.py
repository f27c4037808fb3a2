"""Text sources shared by every data command: the Hugging Face Hub, local files, and a built-in corpus.

A source spec is a string:
  pydoc                  the built-in offline corpus: Python's own documentation (pydoc topics and the
                         standard library's docstrings), about 2.3 MB of English prose
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
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lillm.errors import UserError

BUILTIN = "pydoc"
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
    stats: dict[str, int] = field(default_factory=lambda: {"documents": 0, "replaced_documents": 0})

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this source."""
        out: dict[str, Any] = {"spec": self.spec, "text_field": self.text_field}
        if self.spec.startswith("hf:"):
            out.update(hf_config=self.hf_config, split=self.split)
        return out

    def __iter__(self) -> Iterator[str]:
        if self.spec == BUILTIN:
            it = _builtin_corpus()
        elif self.spec.startswith("hf:"):
            it = self._iter_hf()
        else:
            it = self._iter_files()
        for text in it:
            self.stats["documents"] += 1
            yield text

    # -- Hugging Face datasets -------------------------------------------------------------------
    def _iter_hf(self) -> Iterator[str]:
        import datasets

        name = self.spec[3:]
        try:
            ds = datasets.load_dataset(name, self.hf_config, split=self.split, streaming=self.streaming)
        except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
            where = f"dataset {name!r} (config {self.hf_config}, split {self.split})"
            raise UserError(f"cannot load {where}: {e}") from None
        yield from self._iter_records(ds, name)

    def _iter_records(self, records, where: str) -> Iterator[str]:
        for i, rec in enumerate(records):
            yield self._field(rec, where, f"record {i}")

    def _field(self, rec: Any, where: str, what: str) -> str:
        if not isinstance(rec, dict) or self.text_field not in rec:
            keys = list(rec) if isinstance(rec, dict) else type(rec).__name__
            raise UserError(f"{where}: {what} has no text field {self.text_field!r} (has {keys})")
        text = rec[self.text_field]
        if not isinstance(text, str):
            raise UserError(f"{where}: {what}: field {self.text_field!r} is {type(text).__name__}, not text")
        return text

    # -- local files -----------------------------------------------------------------------------
    def files(self) -> list[Path]:
        """The files this spec names, sorted; a saved `datasets` folder is returned as itself."""
        p = Path(self.spec)
        if p.is_dir():
            if (p / "dataset_info.json").is_file() and (p / "state.json").is_file():
                return [p]
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not found:
                raise UserError(f"{p}: folder holds no {', '.join(TEXT_SUFFIXES)} files")
            return found
        if p.is_file():
            if p.suffix not in TEXT_SUFFIXES:
                raise UserError(f"{p}: unsupported file type {p.suffix!r}; expected {', '.join(TEXT_SUFFIXES)}")
            return [p]
        if glob.has_magic(self.spec):
            found = sorted(Path(f) for f in glob.glob(self.spec, recursive=True) if Path(f).suffix in TEXT_SUFFIXES)
            if not found:
                raise UserError(f"{self.spec}: the pattern matches no {', '.join(TEXT_SUFFIXES)} files")
            return found
        raise UserError(f"{self.spec}: no such file or directory (and not a known source such as '{BUILTIN}')")

    def _decode(self, data: bytes, where: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.errors == "strict":
                raise UserError(f"{where}: undecodable bytes at offset {e.start} (use errors='replace')") from None
            self.stats["replaced_documents"] += 1
            return data.decode("utf-8", errors="replace")

    def _iter_files(self) -> Iterator[str]:
        for f in self.files():
            if f.is_dir():
                yield from self._iter_saved(f)
            elif f.suffix == ".txt":
                text = self._decode(f.read_bytes(), str(f))
                if text:  # an empty file holds no document, as an empty .jsonl holds no record
                    yield text
            elif f.suffix == ".jsonl" or (f.suffix == ".json" and _looks_like_jsonl(f)):
                yield from self._iter_jsonl(f)
            elif f.suffix == ".json":
                try:
                    data = json.loads(self._decode(f.read_bytes(), str(f)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from None
                if not isinstance(data, list):
                    raise UserError(f"{f}: expected a JSON list of records or JSON lines")
                yield from self._iter_records(data, str(f))
            else:
                yield from self._iter_parquet(f)

    def _iter_jsonl(self, f: Path) -> Iterator[str]:
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                line = self._decode(raw, f"{f}:{lineno}")
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{f}:{lineno}: invalid JSON: {e.msg}") from None
                yield self._field(rec, str(f), f"line {lineno}")

    def _iter_parquet(self, f: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends
            raise UserError(f"{f}: not a readable parquet file ({e})") from None
        if self.text_field not in pf.schema_arrow.names:
            raise UserError(f"{f}: no column {self.text_field!r} (has {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
            for i, text in enumerate(batch.column(0).to_pylist()):
                if not isinstance(text, str):
                    raise UserError(f"{f}: row {i}: column {self.text_field!r} is not text")
                yield text

    def _iter_saved(self, folder: Path) -> Iterator[str]:
        import datasets

        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise UserError(f"{folder}: no split {self.split!r} (has {list(ds)})")
            ds = ds[self.split]
        if self.text_field not in ds.column_names:
            raise UserError(f"{folder}: no column {self.text_field!r} (has {ds.column_names})")
        for text in ds.select_columns([self.text_field]).iter(batch_size=1024):
            yield from text[self.text_field]


def _looks_like_jsonl(f: Path) -> bool:
    with open(f, "rb") as fh:
        head = fh.read(64).lstrip()
    return head.startswith(b"{")


def open_source(spec: str, **kwargs: Any) -> TextSource:
    """A TextSource for `spec`; checks up front that local paths exist."""
    src = TextSource(spec, **kwargs)
    if spec != BUILTIN and not spec.startswith("hf:"):
        src.files()
    return src


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

