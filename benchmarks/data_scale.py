"""Data at the real scale: can lillm's loader feed GPUs from shards that are not in the page cache?

    .venv/bin/python benchmarks/data_scale.py                  # 2e8 tokens (400 MB of shards)
    .venv/bin/python benchmarks/data_scale.py --tokens 2e9     # 4 GB: the largest size run on a CI machine
    .venv/bin/python benchmarks/data_scale.py --tokens 8e9     # 16 GB: the reference job's data, on a real node
    .venv/bin/python benchmarks/data_scale.py --smoke          # seconds: the test suite's path

It writes an N-token directory of random uint16 tokens with lillm's own `ShardWriter` and a manifest like
`lillm prepare`'s (shards of 2^26 tokens, as prepare writes them), then measures, in order:
- open: `ShardSet` + `PretrainLoader` on the directory, its files out of the page cache;
- verify: `lillm.data.prepare.verify` (every shard's sha256), out of the cache, in seconds and per GB;
- the raw random-read ceiling of the disk: 4 KB `pread`s at random offsets of the shards, one at a time
  (and, for scale, from 8 threads), read advice POSIX_FADV_RANDOM so that no readahead inflates them;
- the loader's read mechanisms against each other, uncached, 1 worker: the kernel's default readahead on a
  plain map (lillm before), MADV_RANDOM alone, MADV_RANDOM plus MADV_WILLNEED for the next micro-batch
  (lillm now), and `pread` into a reused buffer with POSIX_FADV_RANDOM;
- lillm's loader, tokens/s, cached and uncached, with 0, 1 and 2 DataLoader workers, at the shipped micro
  batch (lil-39m: 32 x 512) and shuffle; and tokens per CPU-second of the whole process tree;
- the first batch's time at the start and near the end of an epoch (uncached);
- `lillm prepare` tokens per CPU-second, on the built-in `pydoc` corpus (repeated to a few MB) with an
  8192-token BPE.
"Uncached" means every shard was dropped from the page cache first with posix_fadvise(POSIX_FADV_DONTNEED)
(no root needed), and the script checks with mincore that they left (the share still resident is reported).
An A100's demand is 550,000 tokens/s (lil-39m at 50% MFU: 2.8e8 FLOPs per token against 312 TFLOPS x 0.5).

Prints a markdown table and writes JSON (--out, default benchmarks/results/data_scale-<host>-<tokens>.json).
Everything it writes under --work (default: the system's temp directory) is deleted when it finishes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lillm.data.loader import PackedWindows, PretrainLoader, ShardSet  # noqa: E402
from lillm.data.prepare import FORMAT_VERSION, MANIFEST, ShardWriter, token_dtype, verify  # noqa: E402
from lillm.files import write_json_atomic  # noqa: E402

A100_TOKENS_PER_S = 550_000
SEQ, MICRO = 512, 32  # lil-39m-2xa100.yaml


# -- the directory ---------------------------------------------------------------------------------
def build(out: Path, tokens: int, shard_tokens: int, vocab: int = 8192, seed: int = 0) -> dict:
    """N random tokens as lillm's shards plus a manifest `ShardSet` accepts; val gets 1/1000 of them."""
    out.mkdir(parents=True)
    dtype = token_dtype(vocab)
    rng = np.random.default_rng(seed)
    writers = {s: ShardWriter(out, s, "5e1ec7ed", shard_tokens, dtype, eos_id=vocab - 1) for s in ("train", "val")}
    left, chunk = tokens, 1 << 24
    while left:
        n = min(chunk, left)
        block = rng.integers(0, vocab, size=n, dtype=dtype)
        cut = n // 1000
        writers["val"].add(block[:cut])
        writers["train"].add(block[cut:])
        left -= n
    for w in writers.values():
        w.flush()
    manifest = {
        "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"source": "synthetic", "shard_tokens": shard_tokens, "val_fraction": 0.001},
        "source": {"spec": "synthetic"},
        "tokenizer": {"fingerprint": "synthetic", "vocab_size": vocab, "special_ids": {"eos": vocab - 1}},
        "dtype": dtype.name, "shard_tokens": shard_tokens, "val_fraction": 0.001,
        "splits": {s: w.summary() for s, w in writers.items()},
        "totals": {"tokens": tokens, "documents": 0, "text_bytes": 0, "replaced_documents": 0},
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def shard_files(data: Path) -> list[Path]:
    return sorted(data.glob("*.bin"))


# -- the page cache --------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def resident_bytes(path: Path) -> int:
    """Bytes of the file in the page cache (mincore over a fresh map, which itself reads nothing)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        try:
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
        finally:
            _libc.munmap(addr, size)
        return int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1)) * mmap.PAGESIZE
    finally:
        os.close(fd)


def drop(files: list[Path]) -> float:
    """Drop the files from the page cache; returns the share of their bytes still resident afterwards."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    total = sum(f.stat().st_size for f in files)
    return sum(resident_bytes(f) for f in files) / max(total, 1)


def warm(files: list[Path]) -> float:
    """Read the files into the page cache; returns the share resident afterwards."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    total = sum(f.stat().st_size for f in files)
    return sum(resident_bytes(f) for f in files) / max(total, 1)


def disk_read_bytes(path: Path) -> int | None:
    """Bytes read so far from the block device holding `path` (/proc/diskstats), or None where it is not a
    listed device (a network or overlay filesystem): with it, what a mechanism pulls from the disk per window."""
    dev = os.stat(path).st_dev
    try:
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if int(f[0]) == os.major(dev) and int(f[1]) == os.minor(dev):
                return int(f[5]) * 512
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_seconds() -> float:
    """User + system CPU of this process and of its children that have ended (DataLoader workers are joined at
    the loader's shutdown, so they are counted once it is closed)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# -- read mechanisms (the alternatives lillm's reader is measured against) ---------------------------
class _RandomOnly(ShardSet):
    """MADV_RANDOM on the maps, but nothing asked for ahead: one page fault at a time."""

    def will_need(self, spans):
        pass


class _PreadShard:
    """A shard read with pread into a reused buffer: what `PackedWindows.read` slices out of a map."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.dtype = dtype
        self.buf = bytearray(1 << 16)

    def __getitem__(self, sl: slice) -> np.ndarray:
        item = self.dtype.itemsize
        want = (sl.stop - sl.start) * item
        if len(self.buf) < want:
            self.buf = bytearray(want)
        got = os.preadv(self.fd, [memoryview(self.buf)[:want]], sl.start * item)
        return np.frombuffer(self.buf, dtype=self.dtype, count=got // item)


class _Pread(ShardSet):
    def maps(self):
        if self._maps is None:
            self._maps = [_PreadShard(f, self.dtype) for f in self.files]
        return self._maps

    def will_need(self, spans):
        pass


MECHANISMS = {
    "plain map, the kernel's readahead (lillm before)": lambda d: ShardSet(d, prefetch=False),
    "map + MADV_RANDOM": lambda d: _RandomOnly(d),
    "map + MADV_RANDOM + WILLNEED next micro-batch (lillm)": lambda d: ShardSet(d),
    "pread into a reused buffer + FADV_RANDOM": lambda d: _Pread(d),
}


# -- measurements ----------------------------------------------------------------------------------
def loader_rate(shards: ShardSet, workers: int, seconds: float, max_batches: int, seed: int = 0,
                position: int = 0) -> dict:
    """Read micro-batches from a fresh `PretrainLoader` for `seconds` (at most `max_batches`): tokens/s after
    the first batch, the first batch's time, and tokens per CPU-second of the process and its workers."""
    loader = PretrainLoader(shards, SEQ, MICRO, seed=seed, num_workers=workers)
    loader.position = position
    disk0 = disk_read_bytes(shards.data_dir)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    while n < max_batches and time.perf_counter() - t1 < seconds:
        next(it)
        n += 1
    elapsed = time.perf_counter() - t1
    it.close()
    cpu = cpu_seconds() - cpu0
    disk1 = disk_read_bytes(shards.data_dir)
    tokens = n * MICRO * SEQ
    return {"workers": workers, "batches": n, "tokens_per_s": tokens / max(elapsed, 1e-9), "first_batch_s": first,
            "tokens_per_cpu_s": (n + 1) * MICRO * SEQ / max(cpu, 1e-9),
            "disk_kb_per_window": None if disk0 is None or disk1 is None else
            (disk1 - disk0) / 1024 / ((n + 1) * MICRO)}  # per window served; the workers' prefetch adds a little


def random_read_ceiling(files: list[Path], seconds: float, threads: int = 1, seed: int = 0) -> dict:
    """4 KB preads at random page-aligned offsets of the shards (weighted by size) for `seconds`."""
    fds = [os.open(f, os.O_RDONLY) for f in files]
    for fd in fds:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    sizes = np.array([f.stat().st_size for f in files], dtype=np.int64)
    cum = np.cumsum(sizes)
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def reader(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        while time.perf_counter() < stop:
            at = rng.randrange(int(cum[-1]))
            i = int(np.searchsorted(cum, at, side="right"))
            off = (at - int(cum[i] - sizes[i])) // 4096 * 4096
            os.pread(fds[i], 4096, off)
            counts[k] += 1

    t0 = time.perf_counter()
    pool = [threading.Thread(target=reader, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    for fd in fds:
        os.close(fd)
    iops = sum(counts) / elapsed
    # Each window costs at least one such read, so a reader bound by them makes IOPS x SEQ tokens/s.
    return {"threads": threads, "reads": sum(counts), "iops": iops, "mb_per_s": iops * 4096 / 1e6,
            "tokens_per_s": iops * SEQ}


def prepare_rate(work: Path, copies: int, vocab: int) -> dict:
    """`lillm prepare` (its default: one process, the tokenizer's thread pool) on the pydoc corpus repeated
    `copies` times, in tokens per second and per CPU-second."""
    from lillm.data.prepare import prepare
    from lillm.data.sources import iter_texts, open_source
    from lillm.tokenizer import train_tokenizer

    texts = list(iter_texts(open_source("pydoc")))
    train_tokenizer(texts, vocab_size=vocab, progress=False).save(work / "tok")
    src = work / "corpus.jsonl"
    with open(src, "w") as fh:
        for _ in range(copies):
            for t in texts:
                fh.write(json.dumps({"text": t}) + "\n")
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    m = prepare(open_source(str(src)), work / "tok", work / "prepared", progress=False)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    tokens = m["totals"]["tokens"]
    return {"tokens": tokens, "text_mb": src.stat().st_size / 1e6, "wall_s": wall, "cpu_s": cpu,
            "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "cores": os.cpu_count()}


def run(args: argparse.Namespace) -> dict:
    tokens = int(float(args.tokens))
    work = Path(tempfile.mkdtemp(prefix="lillm-data-scale-", dir=args.work))
    result: dict = {"tokens": tokens, "host": platform.node(), "cores": os.cpu_count(),
                    "load_at_start": os.getloadavg()[0], "a100_tokens_per_s": A100_TOKENS_PER_S,
                    "micro_batch": [MICRO, SEQ], "work": str(work)}
    try:
        data = work / "data"
        t = time.perf_counter()
        build(data, tokens, args.shard_tokens)
        files = shard_files(data)
        size = sum(f.stat().st_size for f in files)
        result.update(write_s=time.perf_counter() - t, bytes=size, shards=len(files))
        log(f"wrote {tokens:,} tokens ({size / 1e9:.2f} GB, {len(files)} shards) in {result['write_s']:.1f}s")

        result["resident_after_drop"] = drop(files)
        t = time.perf_counter()
        shards = ShardSet(data)
        PretrainLoader(shards, SEQ, MICRO)
        result["open_s"] = time.perf_counter() - t

        drop(files)
        t = time.perf_counter()
        verify(data, checksums=True)
        v = time.perf_counter() - t
        result["verify"] = {"seconds": v, "s_per_gb": v / (size / 1e9), "gb_per_s": size / 1e9 / v}
        log(f"open {result['open_s']:.2f}s; verify {v:.1f}s ({v / (size / 1e9):.1f} s per GB)")

        drop(files)
        result["ceiling"] = [random_read_ceiling(files, args.seconds, threads) for threads in (1, 8)]
        log(f"raw 4 KB random reads: {result['ceiling'][0]['iops']:,.0f}/s one at a time, "
            f"{result['ceiling'][1]['iops']:,.0f}/s from 8 threads")

        result["mechanisms"] = {}
        for seed, (name, make) in enumerate(MECHANISMS.items(), start=1):
            result["mechanisms"][name] = r = {"resident_before": drop(files),
                                               **loader_rate(make(data), 1, args.seconds, args.max_batches, seed)}
            log(f"{name}: {r['tokens_per_s']:,.0f} tokens/s uncached (1 worker), "
                f"{r['disk_kb_per_window'] or 0:,.1f} KB from disk per window")

        result["loader"] = []
        cache_fits = size < 0.5 * _mem_available()
        for workers in (0, 1, 2):
            for cached in ((False, True) if cache_fits else (False,)):
                before = warm(files) if cached else drop(files)
                r = {"cached": cached, "resident_before": before,
                     **loader_rate(ShardSet(data), workers, args.seconds, args.max_batches, seed=100 + workers)}
                result["loader"].append(r)
                log(f"lillm loader, {workers} worker(s), {'cached' if cached else 'uncached'}: "
                    f"{r['tokens_per_s']:,.0f} tokens/s, {r['tokens_per_cpu_s']:,.0f} per CPU-second")

        shards = ShardSet(data)
        windows = PackedWindows(shards, SEQ, MICRO).num_windows
        result["first_batch"] = {}
        for where, position in (("epoch start", 0), ("epoch end", windows - 4 * MICRO)):
            drop(files)
            result["first_batch"][where] = loader_rate(shards, 1, 0, 0, seed=7, position=position)["first_batch_s"]
        log(f"first batch: {result['first_batch']}")

        if args.prepare_copies:
            result["prepare"] = prepare_rate(work, args.prepare_copies, args.prepare_vocab)
            p = result["prepare"]
            log(f"prepare: {p['tokens_per_s']:,.0f} tokens/s, {p['tokens_per_cpu_s']:,.0f} per CPU-second")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_at_end"] = os.getloadavg()[0]
    return result


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def markdown(r: dict) -> str:
    a100 = A100_TOKENS_PER_S
    out = [f"### {r['tokens']:.1e} tokens ({r['bytes'] / 1e9:.2f} GB, {r['shards']} shards), {r['cores']} cores, "
           f"load {r['load_at_start']:.1f} -> {r['load_at_end']:.1f}",
           "", f"- open (uncached): {r['open_s']:.2f} s; verify (uncached sha256): {r['verify']['seconds']:.1f} s, "
           f"{r['verify']['s_per_gb']:.1f} s per GB",
           f"- raw 4 KB random reads: {r['ceiling'][0]['iops']:,.0f}/s one at a time "
           f"({r['ceiling'][0]['tokens_per_s']:,.0f} tokens/s at one read per window), "
           f"{r['ceiling'][1]['iops']:,.0f}/s from 8 threads",
           f"- first batch (uncached, 1 worker): {r['first_batch']['epoch start']:.3f} s at the start of an epoch, "
           f"{r['first_batch']['epoch end']:.3f} s near its end"]
    if "prepare" in r:
        p = r["prepare"]
        out.append(f"- prepare: {p['tokens_per_s']:,.0f} tokens/s on {p['cores']} cores, "
                   f"{p['tokens_per_cpu_s']:,.0f} tokens per CPU-second")
    out += ["", "| read mechanism (uncached, 1 worker) | tokens/s | x A100 | KB read from disk per window | "
            "first batch s |", "|---|---|---|---|---|"]
    for name, m in r["mechanisms"].items():
        kb = "n/a" if m["disk_kb_per_window"] is None else f"{m['disk_kb_per_window']:,.1f}"
        out.append(f"| {name} | {m['tokens_per_s']:,.0f} | {m['tokens_per_s'] / a100:.1f} | {kb} | "
                   f"{m['first_batch_s']:.3f} |")
    out += ["", "| lillm loader | workers | tokens/s | x A100 | tokens per CPU-second | resident before |",
            "|---|---|---|---|---|---|"]
    for x in r["loader"]:
        out.append(f"| {'cached' if x['cached'] else 'uncached'} | {x['workers']} | {x['tokens_per_s']:,.0f} | "
                   f"{x['tokens_per_s'] / a100:.1f} | {x['tokens_per_cpu_s']:,.0f} | {x['resident_before']:.0%} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="2e8", help="tokens in the synthetic directory (2e8, 2e9, 8e9 ...)")
    ap.add_argument("--shard_tokens", type=int, default=1 << 26, help="tokens per shard (prepare's default)")
    ap.add_argument("--seconds", type=float, default=10.0, help="time per loader or random-read measurement")
    ap.add_argument("--max_batches", type=int, default=100_000, help="micro-batches per loader measurement, at most")
    ap.add_argument("--prepare_copies", type=int, default=8, help="copies of the pydoc corpus for the prepare rate "
                    "(0: skip it)")
    ap.add_argument("--prepare_vocab", type=int, default=8192, help="vocabulary of the prepare rate's tokenizer")
    ap.add_argument("--work", default=None, help="where the directory is written (default: the system's temp)")
    ap.add_argument("--out", default=None, help="JSON to write (default benchmarks/results/data_scale-<host>-<N>"
                    ".json)")
    ap.add_argument("--smoke", action="store_true", help="seconds: 2e6 tokens in small shards, short measurements")
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.shard_tokens, args.seconds, args.max_batches = "2e6", 1 << 18, 0.5, 20
        args.prepare_copies, args.prepare_vocab = 1, 512
    result = run(args)
    out = Path(args.out or REPO / f"benchmarks/results/data_scale-{platform.node()}-{float(args.tokens):.0e}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
