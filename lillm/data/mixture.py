"""Which source each position of a mixed stream reads, and how many earlier positions read the same source.

A mixture is a list of segments of the global window stream: segment j starts at position `starts[j]` and
reads its sources in proportion to `weights[j]` (one weight per source), until the next segment starts.
Stages of a run are segments; so is a mixture changed on resume (`Schedule.resumed`).

Inside a segment the order is periodic. The normalised weights are made integers m_i with sum D (exactly,
for weights such as 0.8/0.2 -> 4/1, D = 5; else rounded with D = 10,000). One period of D positions is laid
out once by earliest-deadline-first among the sources still within their quota (Tijdeman's chairman
assignment): at the n-th position a source may be picked only if it would not get ahead of n * m_i / D by a
whole position, and of those, the one whose next pick is due first (smallest (c_i + 1) / m_i) is. So after
any n positions of a segment, each source has read within one position of n * m_i / D (tested), and a whole
period reads exactly m_i.

A source's count before position p is therefore O(1) per segment: whole periods times m_i, plus a prefix
table of one period, plus the counts at the segment's start (summed over the earlier segments, once). Resume
needs no replay, and the stream state stays the one global position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce
from typing import Any

import numpy as np

from lillm.errors import UserError

EXACT_PERIOD = 10_000  # the longest period for weights that are exact small fractions
ROUNDED_PERIOD = 10_000  # the period of other weights: shares rounded to 1/10,000


def integer_weights(weights: list[float]) -> np.ndarray:
    """Normalised weights as integers with a small sum: exact where the shares are fractions with a small
    common denominator (0.8/0.2 -> [4, 1]), else rounded to ROUNDED_PERIOD parts (largest remainder)."""
    top = max(weights)
    weights = [w / top for w in weights]  # relative to the largest, so the sum stays finite
    total = math.fsum(weights)
    shares = [Fraction(w / total).limit_denominator(1000) for w in weights]
    if all(abs(float(s) - w / total) < 1e-9 for s, w in zip(shares, weights)):
        period = reduce(math.lcm, (s.denominator for s in shares), 1)
        if period <= EXACT_PERIOD:
            return np.array([int(s * period) for s in shares], dtype=np.int64)
    raw = np.array(weights, dtype=np.float64) / total * ROUNDED_PERIOD
    m = np.floor(raw).astype(np.int64)
    short = ROUNDED_PERIOD - int(m.sum())
    for i in np.argsort(-(raw - m), kind="stable")[:short]:
        m[i] += 1
    return m


def lay_out(m: np.ndarray) -> np.ndarray:
    """One period of the interleave for integer weights m: the source read at each of sum(m) positions
    (earliest deadline first among the sources within their quota, ties to the lower index)."""
    period, k = int(m.sum()), len(m)
    counts = np.zeros(k, dtype=np.int64)
    order = np.empty(period, dtype=np.int64)
    with np.errstate(divide="ignore"):
        for n in range(1, period + 1):
            eligible = (counts + 1) * period - n * m < period  # picking i keeps c_i - n m_i / D below 1
            due = np.where(eligible & (m > 0), (counts + 1) / m, np.inf)
            i = int(np.argmin(due))
            order[n - 1] = i
            counts[i] += 1
    return order


@dataclass(frozen=True)
class Segment:
    start: int
    """The first global position of the segment."""
    weights: tuple[float, ...]
    """One weight per source (the schedule's order), as configured; normalised when used."""


class Schedule:
    """Segments over the sources `names` (sorted, so a config's key order changes nothing); see the module
    docstring. `assign` maps global positions to (source, that source's own position)."""

    def __init__(self, names: list[str], segments: list[Segment]) -> None:
        if not segments or segments[0].start != 0:
            raise ValueError("a schedule starts at position 0")
        if any(b.start <= a.start for a, b in zip(segments, segments[1:])):
            raise ValueError("segment starts must increase")
        self.names, self.segments = list(names), list(segments)
        self.starts = np.array([s.start for s in segments], dtype=np.int64)
        self._m = [integer_weights(list(s.weights)) for s in segments]
        self._periods = [int(m.sum()) for m in self._m]
        self._tables = []  # per segment: (source at each offset of a period, counts before each offset)
        for m in self._m:
            order = lay_out(m)
            before = np.zeros((len(order) + 1, len(m)), dtype=np.int64)
            np.add.at(before[1:], (np.arange(len(order)), order), 1)
            self._tables.append((order, np.cumsum(before, axis=0)))
        self._base = np.zeros((len(segments), len(names)), dtype=np.int64)  # counts at each segment's start
        for j in range(1, len(segments)):
            self._base[j] = self._base[j - 1] + self._within(j - 1, segments[j].start - segments[j - 1].start)

    @classmethod
    def single(cls, name: str) -> Schedule:
        """One source: position p reads that source's position p."""
        return cls([name], [Segment(0, (1.0,))])

    def _within(self, j: int, n: int) -> np.ndarray:
        """Counts of each source over the first n positions of segment j."""
        period = self._periods[j]
        return (n // period) * self._m[j] + self._tables[j][1][n % period]

    def counts(self, position: int) -> np.ndarray:
        """Windows read from each source before global `position`."""
        j = int(np.searchsorted(self.starts, position, side="right") - 1)
        return self._base[j] + self._within(j, position - int(self.starts[j]))

    def assign(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions -> (source index, the source's own position) for each."""
        positions = np.asarray(positions, dtype=np.int64)
        source = np.empty_like(positions)
        own = np.empty_like(positions)
        seg = np.searchsorted(self.starts, positions, side="right") - 1
        for j in np.unique(seg):
            sel = seg == j
            n = positions[sel] - self.starts[j]
            order, before = self._tables[j]
            period = self._periods[j]
            s = order[n % period]
            source[sel] = s
            own[sel] = self._base[j][s] + (n // period) * self._m[j][s] + before[n % period, s]
        return source, own

    def shares(self, position: int) -> dict[str, float]:
        """The shares in effect at `position`, as used (after making the weights integers)."""
        j = int(np.searchsorted(self.starts, position, side="right") - 1)
        return {name: int(m) / self._periods[j] for name, m in zip(self.names, self._m[j])}

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "segments": [[s.start, list(s.weights)] for s in self.segments]}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Schedule:
        return cls(list(saved["names"]), [Segment(int(start), tuple(float(w) for w in weights))
                                          for start, weights in saved["segments"]])

    def resumed(self, position: int, future: Schedule) -> tuple[Schedule, bool]:
        """This schedule up to `position`, then `future`'s (another config's) from there on, each source
        keeping its place: the segment under way continues where its weights are unchanged, else a new
        segment starts at `position` from the counts reached. Returns the schedule and whether the stream
        from `position` on differs from this schedule's. Every source of this schedule must be in `future`'s
        (one added now had weight 0 so far)."""
        missing = [n for n in self.names if n not in future.names]
        if missing:
            raise UserError(f"cannot resume the data stream: source {missing[0]!r} was in the mixture the checkpoint "
                            f"was trained on and is not in data.sources now ({', '.join(future.names)})")
        where = [self.names.index(n) if n in self.names else -1 for n in future.names]
        past = [Segment(s.start, tuple(s.weights[i] if i >= 0 else 0.0 for i in where)) for s in self.segments]
        merged = [s for s in past if s.start <= position]
        now = merged_at(future.segments, position)
        if _layout(now.weights) != _layout(merged[-1].weights):
            if merged[-1].start == position:
                merged.pop()
            if not merged or _layout(merged[-1].weights) != _layout(now.weights):
                merged.append(Segment(position, now.weights))
        for seg in future.segments:
            if seg.start > position and _layout(seg.weights) != _layout(merged[-1].weights):
                merged.append(seg)

        def ahead(segments: list[Segment]) -> list[tuple[int, tuple[int, ...]]]:
            current = merged_at(segments, position)
            return [(s.start, _layout(s.weights)) for s in segments if s is current or s.start > position]

        return Schedule(future.names, merged), ahead(merged) != ahead(past)


def merged_at(segments: list[Segment], position: int) -> Segment:
    """The segment of `segments` in effect at `position`."""
    return [s for s in segments if s.start <= position][-1]


def _layout(weights: tuple[float, ...]) -> tuple[int, ...]:
    """What a segment's order depends on: its weights as integers (so 0.3/0.3 and 1/1 are the same mixture)."""
    return tuple(integer_weights(list(weights)).tolist())


def stage_schedule(names: list[str], stages: list[tuple[int, dict[str, float]]], step: int = 0,
                   position: int = 0, windows_per_step: int = 1) -> Schedule:
    """The schedule of a run's stages, each (end step, weights by source name), seen from `step` at global
    `position`: a stage ending at step S > `step` ends at position + (S - step) x windows_per_step. The stage
    under way at `step` covers everything before (the resumed schedule keeps the real past, see `resumed`);
    after the last stage, its mixture goes on."""
    order = sorted(names)
    under_way = next((k for k, (end, _) in enumerate(stages) if end > step), len(stages) - 1)

    def weights(k: int) -> tuple[float, ...]:
        return tuple(float(stages[k][1].get(n, 0.0)) for n in order)

    segments = [Segment(0, weights(under_way))]
    for k in range(under_way, len(stages) - 1):
        if _layout(weights(k + 1)) != _layout(segments[-1].weights):  # an unchanged mixture goes on unbroken
            segments.append(Segment(position + (stages[k][0] - step) * windows_per_step, weights(k + 1)))
    return Schedule(order, segments)
