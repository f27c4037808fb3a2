"""The pretraining loader: memory-mapped shards -> packed windows, a global stream that resumes at any
world size.

The global stream. Each split's shards are cut into windows of seq_len + 1 tokens (stride seq_len, so the
last token of one window is the first target-free token of the next); N windows make an epoch. Global
position p names window `perm_{p // N}(p % N)`: a keyed, O(1)-memory permutation of the epoch (a Feistel
network with cycle walking), drawn from (seed, epoch), or the identity when not shuffling. Epochs follow
each other with fresh permutations, forever.

Who reads what. Consecutive runs of `batch_size` positions form micro-batches; micro-batch q goes to rank
q % world_size, and within a rank, local micro-batch m goes to DataLoader worker m % num_workers (which is
the order in which a DataLoader collects batches from its workers). Every window of an epoch therefore
reaches exactly one rank, once. This is also exactly how `accelerate` shards an iterable dataset
(`IterableDatasetShard`: process r takes the r-th slice of batch_size samples out of every
batch_size * num_processes), so a `PackedWindows` built with rank=0, world_size=1 and passed through
`Accelerator.prepare` (dispatch_batches=False, split_batches=False) reads the same windows per rank as the
native path. With dispatch_batches=True (accelerate's default for iterable datasets), rank 0 would read
every batch and scatter it: correct, but it makes one process the data bottleneck, so lillm turns it off.

Mixtures. With several sources (`data.sources`), position p first picks a source and that source's own
position k: a deterministic interleave in proportion to the weights, whose counts are O(1) to compute
(`lillm.data.mixture`); then window `perm_{k // N_s}(k % N_s)` of that source, in its own keyed order. The
mixture may change at steps (`data.stages`) and on resume, each source continuing from its place. Everything
below holds for mixtures as for one source: the position is still the whole state.

The state. All ranks consume micro-batches in lockstep, so after k local micro-batches the global
position is start + k * batch_size * world_size. That number (plus seed and the data's shape) is the whole
state: it does not depend on the world size, so a run resumed on more or fewer ranks continues the same
stream with no gap and no duplicate.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import mmap
import os
import signal
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lillm.data.mixture import Schedule, stage_schedule
from lillm.data.prepare import verify
from lillm.errors import UserError
from lillm.files import read_json, sampled_sha256, write_json_atomic
from lillm.tokenizer import Tokenizer

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit avalanche hash (splitmix64 finaliser) of x ^ key, elementwise."""
    with np.errstate(over="ignore"):
        z = (x ^ key) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(idx: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """A bijection of [0, n) evaluated at idx: a 4-round Feistel network with cycle walking."""
    half = max(1, ((max(n - 1, 1)).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.random.SeedSequence([seed, epoch]).generate_state(4, dtype=np.uint64)
    x = idx.astype(np.uint64)
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        y = x[todo]
        left, right = y >> np.uint64(half), y & mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        y = (left << np.uint64(half)) | right
        x[todo] = y
        todo[todo] = y >= np.uint64(n)  # outside the domain: walk the cycle until inside
    return x.astype(np.int64)


class ShardSet:
    """The shards of one split, memory-mapped lazily (so each DataLoader worker maps its own)."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", check_checksums: bool = False,
                 tokenizer: Tokenizer | None = None, prefetch: bool = True) -> None:
        self.data_dir = Path(data_dir)
        manifest = verify(self.data_dir, checksums=check_checksums)  # sizes always, sha256 on request
        if split not in manifest["splits"]:
            raise UserError(f"{data_dir}: manifest has no split {split!r}")
        if tokenizer is not None:
            t = manifest["tokenizer"]
            if t["fingerprint"] != tokenizer.fingerprint or t["vocab_size"] != tokenizer.vocab_size:
                raise UserError(
                    f"{data_dir}: shards were made with another tokenizer (vocab {t['vocab_size']}, "
                    f"fingerprint {t['fingerprint'][:12]}) than the one in use (vocab {tokenizer.vocab_size}, "
                    f"fingerprint {tokenizer.fingerprint[:12]})"
                )
        self.manifest = manifest
        self.split = split
        self.dtype = np.dtype(manifest["dtype"])
        self.files = [self.data_dir / s["file"] for s in manifest["splits"][split]["shards"]]
        self.tokens = np.array([s["tokens"] for s in manifest["splits"][split]["shards"]], dtype=np.int64)
        self.vocab_size = int(manifest["tokenizer"]["vocab_size"])
        self.prefetch = prefetch  # read advice on the maps (see `maps`); False: the kernel's default readahead
        self._maps: list[np.ndarray] | None = None
        self._mmaps: list[mmap.mmap | None] = []

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    def identity(self) -> dict[str, Any]:
        """What the split's bytes are, cheaply, for a resume to check that they did not change: a digest of
        the manifest's shard list (names, token counts, sha256 from `prepare`) and, per shard, a sampled sha256
        (its size and SHARD_SAMPLES blocks of SHARD_SAMPLE_BYTES). Rewritten shards, and same-size
        damage to bytes that are sampled, show; a full check is `lillm shards DIR --verify true`. A few
        reads per shard: milliseconds for an 8B-token directory of 120 shards."""
        shards = self.manifest["splits"][self.split]["shards"]
        listed = hashlib.sha256(json.dumps([[s["file"], s["tokens"], s["sha256"]] for s in shards]).encode())
        return {"manifest": listed.hexdigest()[:32],
                "samples": {s["file"]: sampled_sha256(f, SHARD_SAMPLES, SHARD_SAMPLE_BYTES)
                            for s, f in zip(shards, self.files)}}

    def check_identity(self, saved: dict[str, Any], now: dict[str, Any]) -> None:
        """Refuse, in one line, a split whose identity `now` differs from `saved` (each an `identity()`)."""
        if saved.get("manifest") != now["manifest"]:
            raise UserError(f"the {self.split} shards listed in {self.data_dir / 'manifest.json'} are not those "
                            "the checkpoint was trained on (prepared again, or another directory)")
        for name, digest in now["samples"].items():
            if saved.get("samples", {}).get(name) != digest:
                raise UserError(f"{self.data_dir / name}: its bytes differ from when the checkpoint was saved "
                                "(changed in place, or damaged)")

    def maps(self) -> list[np.ndarray]:
        """Each shard as a read-only token array over a memory map, opened on first use in each process.

        With `prefetch`, a map is advised MADV_RANDOM: the windows of a shuffled stream are scattered, and the
        kernel's default readahead on a page fault (8 MB on some disks) turns each 1 KB window into megabytes
        read from disk, most never used. The reader then asks for the pages it is about to read itself
        (`will_need`), so those reads are in flight together instead of one fault at a time."""
        if self._maps is None:
            self._maps, self._mmaps = [], []
            for f in self.files:
                if f.stat().st_size == 0:
                    self._maps.append(np.empty(0, dtype=self.dtype))
                    self._mmaps.append(None)
                    continue
                with open(f, "rb") as fh:
                    m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                if self.prefetch and _MADV_RANDOM is not None:
                    m.madvise(_MADV_RANDOM)
                self._maps.append(np.frombuffer(m, dtype=self.dtype))
                self._mmaps.append(m)
        return self._maps

    def will_need(self, spans: list[tuple[int, int, int]]) -> None:
        """Start reading (shard, first token, end token) spans in the background (MADV_WILLNEED): the kernel
        queues them all at once, so a batch's scattered windows cost about one disk latency, not one each.
        Pages already in memory cost a lookup. A no-op without `prefetch` or where madvise has no WILLNEED."""
        if not self.prefetch or _MADV_WILLNEED is None:
            return
        self.maps()
        item = self.dtype.itemsize
        for s, start, end in spans:
            m = self._mmaps[s]
            if m is None:
                continue
            lo = start * item // mmap.PAGESIZE * mmap.PAGESIZE
            m.madvise(_MADV_WILLNEED, lo, min(end * item, len(m)) - lo)

    def __getstate__(self) -> dict[str, Any]:  # maps are reopened in worker processes
        return {**self.__dict__, "_maps": None, "_mmaps": []}


_MADV_RANDOM = getattr(mmap, "MADV_RANDOM", None)
_MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)
SHARD_SAMPLES, SHARD_SAMPLE_BYTES = 5, 4096  # a shard's identity reads 20 KB of it, at 0, 1/4, 1/2, 3/4 and the end


class SourceWindows:
    """One source's windows: its shards cut into (seq_len + 1)-token windows, in its own keyed order per epoch."""

    def __init__(self, shards: ShardSet, seq_len: int, seed: int = 0, shuffle: bool = True) -> None:
        self.shards, self.seq_len, self.seed, self.shuffle = shards, seq_len, seed, shuffle
        per_shard = np.maximum((shards.tokens - 1) // seq_len, 0)
        self.cum = np.concatenate([[0], np.cumsum(per_shard)])
        self.num_windows = int(self.cum[-1])
        if self.num_windows == 0:
            raise UserError(
                f"{shards.data_dir}: the {shards.split} split has {int(shards.tokens.sum()):,} tokens, "
                f"not enough for one window of seq_len + 1 = {seq_len + 1} tokens"
            )

    def window_ids(self, positions: np.ndarray) -> np.ndarray:
        """The source's own stream positions -> window indices (epoch after epoch, each freshly permuted)."""
        epoch, idx = positions // self.num_windows, positions % self.num_windows
        if not self.shuffle:
            return idx
        out = np.empty_like(idx)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = permute(idx[sel], self.num_windows, self.seed, int(e))
        return out

    def locate(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, offset of the first token) of each window."""
        s = np.searchsorted(self.cum, windows, side="right") - 1
        return s, (windows - self.cum[s]) * self.seq_len

    def will_need(self, windows: np.ndarray) -> None:
        """Ask for the windows' pages ahead of reading them (`ShardSet.will_need`)."""
        s, off = self.locate(windows)
        self.shards.will_need([(int(a), int(b), int(b) + self.seq_len + 1) for a, b in zip(s, off)])

    def read(self, window: int) -> np.ndarray:
        """A window's tokens; an id outside the data's vocabulary (a damaged shard) is refused naming the shard
        and the token's offset, instead of an index error deep in the model."""
        shard, start = self.locate(np.array([window]))
        s, off = int(shard[0]), int(start[0])
        tokens = self.shards.maps()[s][off : off + self.seq_len + 1]
        if int(tokens.max()) >= self.shards.vocab_size:
            at = off + int(np.argmax(tokens >= self.shards.vocab_size))
            raise UserError(f"{self.shards.files[s]}: token {int(tokens[at - off])} at offset {at:,} is "
                            f"outside the vocabulary of {self.shards.vocab_size}: the shard is damaged (check it "
                            f"with `lillm shards {self.shards.data_dir} --verify true`)")
        return tokens


def source_seed(seed: int, name: str) -> int:
    """The seed of a named source's window order in a mixture: its own, so that adding or reweighting another
    source leaves each source's order alone."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


class PackedWindows(IterableDataset):
    """Infinite stream of (seq_len + 1)-token windows for one rank; see the module docstring.

    `shards` is one split (a single source: position p is its window stream's p-th) or {name: split}, a
    mixture whose `schedule` (lillm.data.mixture) says which source each global position reads and at which
    of that source's own positions; each named source has its own keyed order (`source_seed`)."""

    def __init__(self, shards: ShardSet | dict[str, ShardSet], seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, start: int = 0,
                 schedule: Schedule | None = None) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle, self.start = rank, world_size, seed, shuffle, start
        if isinstance(shards, ShardSet):
            self.schedule = Schedule.single("")
            self.sources = [SourceWindows(shards, seq_len, seed, shuffle)]
        else:
            if schedule is None:
                raise ValueError("a mixture of sources needs a schedule")
            self.schedule = schedule
            self.sources = [SourceWindows(shards[n], seq_len, source_seed(seed, n), shuffle) for n in schedule.names]
        self.num_windows = sum(s.num_windows for s in self.sources)  # one epoch of every source

    def locate(self, positions: np.ndarray) -> list[tuple[int, int]]:
        """Global stream positions -> (source index, window of that source) for each."""
        source, own = self.schedule.assign(positions)
        windows = np.empty_like(own)
        for i in np.unique(source):
            sel = source == i
            windows[sel] = self.sources[i].window_ids(own[sel])
        return list(zip(source.tolist(), windows.tolist()))

    def will_need(self, located: list[tuple[int, int]]) -> None:
        for i, src in enumerate(self.sources):
            mine = np.array([w for s, w in located if s == i], dtype=np.int64)
            if len(mine):
                src.will_need(mine)

    def tokens(self, positions: np.ndarray) -> np.ndarray:
        """The windows at global positions, stacked: (len(positions), seq_len + 1)."""
        return np.stack([self.sources[s].read(w) for s, w in self.locate(positions)])

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        m = wid
        located = self._micro_batch(m)
        self.will_need(located)
        while True:
            upcoming = self._micro_batch(m + nworkers)  # this reader's next micro-batch: requested before
            self.will_need(upcoming)                     # this one is read, so its reads overlap this one's
            for s, w in located:
                yield torch.from_numpy(self.sources[s].read(w).astype(np.int64))
            located, m = upcoming, m + nworkers

    def _micro_batch(self, m: int) -> list[tuple[int, int]]:
        """(source, window) of each row of this rank's local micro-batch m."""
        q = m * self.world_size + self.rank  # global micro-batch index
        return self.locate(self.start + q * self.batch_size + np.arange(self.batch_size, dtype=np.int64))


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT/SIGHUP to the training process, which finishes its step and saves; a worker
    killed by a Ctrl-C, a closed terminal or a scheduler's signal to the whole process group would abort the
    run instead."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


_open_iterators: weakref.WeakSet = weakref.WeakSet()
_exit_hook_registered = False


def _close_open_iterators() -> None:
    for batches in list(_open_iterators):
        batches.close()


def _track_open(batches: Iterator[torch.Tensor]) -> None:
    """Close `batches` at interpreter exit if nobody has. Without this, a process that leaves an iterator open
    (an exception mid-training, or a script that simply ends) hangs at exit: multiprocessing's exit handler
    sends its daemon workers SIGTERM, which they ignore (see `_ignore_stop_signals`), then joins them forever.
    Registered after the DataLoader machinery is imported, so it runs before multiprocessing's handler
    (atexit runs last-registered first)."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_close_open_iterators)
        _exit_hook_registered = True
    _open_iterators.add(batches)


class PretrainLoader:
    """Batches (B, seq_len + 1) for one rank, with a world-size-independent `state_dict`.

    `shards` is one split, or {name: split} for a mixture: then `stages` lists (end step, {name: weight}) (one
    stage with any end step for a fixed mixture; after the last stage its mixture goes on) and
    `windows_per_step` (micro-batch x accumulation x world size) turns their steps into stream positions."""

    def __init__(self, shards: ShardSet | dict[str, ShardSet], seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, num_workers: int = 1,
                 pin_memory: bool = False, allow_changed: bool = False,
                 stages: list[tuple[int, dict[str, float]]] | None = None, windows_per_step: int = 0,
                 say: Callable[[str], None] | None = None) -> None:
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.allow_changed = allow_changed  # resume on data whose bytes differ from the checkpoint's
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.say = say or (lambda line: None)
        self.position = 0  # global windows consumed before the current iterator started
        self.served = 0  # micro-batches handed out by the current iterator
        self.mixed = not isinstance(shards, ShardSet)
        if self.mixed:
            if not stages:
                raise ValueError("a mixture of sources needs its stages")
            self.stages = stages
            self.windows_per_step = windows_per_step or batch_size * world_size
            self.schedule: Schedule | None = stage_schedule(list(shards), stages,
                                                            windows_per_step=self.windows_per_step)
            self.anchor = (0, 0)  # (step, global position) from which steps are counted
            self.data_identity: dict[str, Any] = {name: s.identity() for name, s in shards.items()}
        else:
            self.schedule = None
            self.data_identity = shards.identity()
        ds = self._dataset()
        self.num_windows = ds.num_windows
        self.source_windows = {name: src.num_windows for name, src in zip(ds.schedule.names, ds.sources)}

    def _dataset(self) -> PackedWindows:
        return PackedWindows(self.shards, self.seq_len, self.batch_size, self.rank, self.world_size, self.seed,
                             self.shuffle, self.position, self.schedule)

    @property
    def global_position(self) -> int:
        return self.position + self.served * self.batch_size * self.world_size

    @property
    def fingerprint(self) -> str:
        shards = self.shards if isinstance(self.shards, ShardSet) else next(iter(self.shards.values()))
        return shards.fingerprint

    @property
    def epoch(self) -> float:
        return self.global_position / self.num_windows

    @property
    def step(self) -> tuple[int, int]:
        """(the optimizer step the stream is in, the global position at which that step started): a mixture's
        stages are in steps."""
        done = (self.global_position - self.anchor[1]) // self.windows_per_step
        return self.anchor[0] + done, self.anchor[1] + done * self.windows_per_step

    def source_progress(self) -> dict[str, tuple[int, float]]:
        """A mixture's sources: name -> (windows read so far, epochs of that source read)."""
        if self.schedule is None:
            return {}
        counts = self.schedule.counts(self.global_position)
        return {name: (int(c), int(c) / self.source_windows[name]) for name, c in zip(self.schedule.names, counts)}

    def __iter__(self) -> Iterator[torch.Tensor]:
        batches = self._batches()
        _track_open(batches)
        return batches

    def _batches(self) -> Iterator[torch.Tensor]:
        self.position, self.served = self.global_position, 0
        loader = iter(DataLoader(
            self._dataset(), batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=4 if self.num_workers else None, persistent_workers=False,
            worker_init_fn=_ignore_stop_signals,
        ))
        try:
            while True:
                refusal = ""
                try:
                    batch = next(loader)
                except StopIteration:
                    return
                except UserError as e:  # from a worker: the DataLoader puts the worker's traceback in the message
                    refusal = str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]
                if refusal:  # raised out here, so that no exception chain keeps the DataLoader and its workers
                    raise UserError(refusal)
                self.served += 1
                yield batch
        finally:
            # The DataLoader's own shutdown (a done event, then a join) now, while the workers can still see it,
            # instead of whenever the iterator happens to be collected: after a worker's exception the iterator
            # sits in a reference cycle (the re-raised exception's frames), and workers that leave stop signals
            # to their rank would then hold the process at exit forever.
            shutdown = getattr(loader, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del loader

    def state_dict(self) -> dict[str, Any]:
        state = {"position": self.global_position, "seed": self.seed, "shuffle": self.shuffle,
                 "seq_len": self.seq_len, "num_windows": self.num_windows, "fingerprint": self.fingerprint,
                 "data": self.data_identity}
        if self.schedule is not None:
            step, step_position = self.step
            state.update(step=step, step_position=step_position, schedule=self.schedule.to_dict(),
                         sources={name: {"dir": str(s.data_dir), "num_windows": self.source_windows[name]}
                                  for name, s in self.shards.items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_mixed = "schedule" in state
        if saved_mixed != self.mixed:
            raise UserError("cannot resume the data stream: the checkpoint was trained on "
                            + (f"a mixture of data.sources ({', '.join(state['schedule']['names'])}), and this run "
                               "reads one data.dir" if saved_mixed else
                               "one data.dir, and this run reads a mixture of data.sources"))
        keys = ("seq_len", "shuffle", "fingerprint") + (() if self.mixed else ("num_windows",))
        for key in keys:
            if state.get(key) != getattr(self, key):
                raise UserError(
                    f"cannot resume the data stream: {key} was {state.get(key)!r} when saved, now "
                    f"{getattr(self, key)!r} (the data or seq_len changed)"
                )
        if self.mixed:
            self._check_sources(state)
        elif "data" in state and not self.allow_changed:  # checkpoints from before the record are not checked
            self._check_identity(self.shards, state["data"], self.data_identity)
        self.seed = state["seed"]
        self.position, self.served = int(state["position"]), 0
        if self.mixed:
            self._resume_schedule(Schedule.from_dict(state["schedule"]), int(state["step"]),
                                  int(state["step_position"]))

    def _check_identity(self, shards: ShardSet, saved: dict[str, Any], now: dict[str, Any]) -> None:
        try:
            shards.check_identity(saved, now)
        except UserError as e:
            raise UserError(f"cannot resume the data stream: {e}; to resume on this data anyway, at the same "
                            "position in it, set --data.allow_changed true") from None

    def _check_sources(self, state: dict[str, Any]) -> None:
        """Every source of the checkpoint is still here, with as many windows and (unless allow_changed) the
        same bytes; a source added since is welcome."""
        for name, saved in state["sources"].items():
            if name not in self.shards:
                raise UserError(f"cannot resume the data stream: source {name!r} ({saved['dir']}) was in the mixture "
                                f"the checkpoint was trained on and is not in data.sources now "
                                f"({', '.join(self.shards)}); a source's weight can be 0 in a stage instead")
            if saved["num_windows"] != self.source_windows[name]:
                raise UserError(f"cannot resume the data stream: source {name!r} ({self.shards[name].data_dir}) has "
                                f"{self.source_windows[name]:,} windows, {saved['num_windows']:,} when saved (its "
                                "data or seq_len changed)")
            if not self.allow_changed:
                self._check_identity(self.shards[name], state["data"][name], self.data_identity[name])

    def _resume_schedule(self, saved: Schedule, step: int, step_position: int) -> None:
        """Continue the saved schedule under this run's stages from the saved position (see
        `Schedule.resumed`), and say so in one line when the mixture changed. The stages' later steps are
        counted from `step`, which started at global position `step_position`."""
        position = self.position
        future = stage_schedule(list(self.shards), self.stages, step, step_position, self.windows_per_step)
        self.schedule, changed = saved.resumed(position, future)
        self.anchor = (step, step_position)
        if changed:
            before = ", ".join(f"{n} {s:.3g}" for n, s in saved.shares(position).items())
            now = ", ".join(f"{n} {s:.3g}" for n, s in self.schedule.shares(position).items())
            places = ", ".join(f"{n} at window {c:,}" for n, c in zip(self.schedule.names,
                                                                       self.schedule.counts(position)))
            self.say(f"data mixture changed on resume at step {step}: shares were {before}, now {now} (and the "
                     f"stages from here as configured); each source continues from its place ({places})")


def validation_windows(shards: ShardSet, seq_len: int, batch_size: int, num_batches: int, rank: int = 0,
                       world_size: int = 1) -> Iterator[torch.Tensor]:
    """This rank's share of a fixed validation set: the first num_batches micro-batches of the split, read
    in order, micro-batch q going to rank q % world_size. The set is the same on every call, every run and
    at every world size."""
    src = SourceWindows(shards, seq_len, shuffle=False)
    for q in range(rank, num_batches, world_size):
        ids = src.window_ids(np.arange(q * batch_size, (q + 1) * batch_size, dtype=np.int64))
        yield torch.from_numpy(np.stack([src.read(int(w)) for w in ids]).astype(np.int64))


def _shard_stats(data_dir: Path) -> dict[str, Any]:
    """What a verification is reused against: the manifest's bytes, and every shard's size and mtime (any
    write to a shard moves its mtime)."""
    manifest = data_dir / "manifest.json"
    files = sorted(f["file"] for split in read_json(manifest, f"{manifest}: missing")["splits"].values()
                   for f in split["shards"])
    return {"data_dir": str(data_dir.resolve()), "manifest": hashlib.sha256(manifest.read_bytes()).hexdigest(),
            "shards": {name: [(data_dir / name).stat().st_size, (data_dir / name).stat().st_mtime_ns]
                       for name in files}}


def verify_once(data_dir: str | os.PathLike, record: str | os.PathLike, rank: int, world: int,
                gather: Callable[[str], list[str]]) -> str:
    """Check every shard's sha256 against the manifest once per run, shared by the ranks; returns a line to log.

    Rank r hashes every world-th shard from the r-th, so the ranks make one pass over the data between them,
    not one each; `gather` (a collective: this rank's finding -> every rank's) lets every rank refuse the same
    damaged shard. Rank 0 then writes `record` (the run directory's `data-verified.json`), and a later start
    of the same run (a resume) whose manifest and shards' sizes and mtimes match it skips the pass."""
    data_dir, record = Path(data_dir), Path(record)
    now = _shard_stats(data_dir)
    try:
        saved = json.loads(record.read_text()) if record.is_file() else None
    except (OSError, ValueError):  # a damaged record only costs a new pass
        saved = None
    if isinstance(saved, dict) and {k: saved.get(k) for k in now} == now:
        return f"data verified at {saved.get('verified_at', '?')} (recorded in {record}); shards unchanged since"
    start = time.perf_counter()
    try:
        verify(data_dir, checksums=True, part=(rank, world))
        problem = ""
    except UserError as e:
        problem = str(e)
    problems = [p for p in gather(problem) if p]
    if problems:
        raise UserError(problems[0])
    seconds = time.perf_counter() - start
    total = sum(size for size, _ in now["shards"].values())
    if rank == 0:
        write_json_atomic(record, {**now, "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "seconds": round(seconds, 2), "ranks": world})
    return (f"data verified: sha256 of {len(now['shards'])} shards ({total / 1e9:.2f} GB) in {seconds:.1f}s, "
            f"split over {world} rank(s); recorded in {record}")
