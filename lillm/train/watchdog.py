"""A watchdog for hung ranks: a run whose ranks stop making progress ends, with one line naming the rank and
the step, instead of waiting forever in a collective (gloo on CPU has no useful timeout; NCCL's is long).

Each rank's main loop calls `beat(step, phase)` as it trains, evaluates and saves. A thread per rank:
- publishes the rank's (step, phase) with a counter to the rendezvous store every PUBLISH_S seconds, over a
  connection of its own with short timeouts (so a stopped store host cannot hang it), so that every rank sees
  which ranks still answer;
- ends the job when its own rank has made no progress for longer than the bound: train.watchdog_s, or
  FACTOR times the longest gap between beats measured so far (the first step, a warm-up, left out), whichever
  is larger. The lowest rank that still answers says which rank stopped answering, or which lags behind, and
  exits with status 2; DeepSpeed's launcher then stops the others.
Started when the loop starts (setup, which may build ops or convert checkpoints, is not watched) and stopped
when it ends.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time
from typing import Any

FACTOR = 20.0
PUBLISH_S = 2.0
SILENT_AFTER_S = 4 * PUBLISH_S  # a rank whose counter has not moved for this long no longer answers


class Watchdog:
    """One rank's watchdog; see the module docstring. `bound_s` 0 disables it."""

    def __init__(self, rank: int, world: int, bound_s: float, clock: Any = time.monotonic) -> None:
        self.rank, self.world, self.min_bound = rank, world, bound_s
        self.clock = clock
        self.step, self.phase = 0, "starting"
        self.longest = 0.0  # the longest gap between beats so far, warm-up left out
        self._last = clock()
        self._first_step: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Any = None
        self._store_stuck = False  # a call to the rendezvous store (hosted by rank 0) has not returned
        self._seen: dict[int, tuple[int, float, dict[str, Any]]] = {}  # rank -> (counter, when it moved, status)

    @property
    def bound(self) -> float:
        return max(self.min_bound, FACTOR * self.longest)

    def beat(self, step: int, phase: str) -> None:
        """Progress on this rank (cheap: called per micro-batch and per evaluation batch)."""
        now = self.clock()
        if self._first_step is None:
            self._first_step = step
        elif step >= self._first_step + 2:  # the first two steps hold the warm-up (allocation, compilation)
            self.longest = max(self.longest, now - self._last)
        self._last, self.step, self.phase = now, step, phase

    def start(self) -> Watchdog:
        if self.min_bound > 0 and self._thread is None:
            self._last = self.clock()
            self._thread = threading.Thread(target=self._watch, name="lillm-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        counter, publisher = 0, None
        while not self._stop.wait(PUBLISH_S):
            counter += 1
            if publisher is None or not publisher.is_alive():
                # In a thread of its own: a store whose host is stopped can hold a call forever, timeout or not.
                publisher = threading.Thread(target=self._publish, args=(counter,), daemon=True)
                publisher.start()
                publisher.join(PUBLISH_S)
            self._store_stuck = publisher.is_alive()
            stalled = self.clock() - self._last
            if stalled > self.bound and not self._stop.is_set():
                self._end(stalled)

    def _connect(self) -> Any:
        if self._store is None and self.world > 1 and "MASTER_ADDR" in os.environ:
            import torch.distributed as dist

            self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                        timeout=datetime.timedelta(seconds=PUBLISH_S * 2))
        return self._store

    def _publish(self, counter: int) -> None:
        status = {"n": counter, "step": self.step, "phase": self.phase}
        try:
            store = self._connect()
            if store is None:
                return
            store.set(f"lillm/watchdog/{self.rank}", json.dumps(status))
            for r in range(self.world):
                if r != self.rank and store.check([f"lillm/watchdog/{r}"]):
                    seen = json.loads(store.get(f"lillm/watchdog/{r}"))
                    was = self._seen.get(r)
                    if was is None or was[0] != seen["n"]:
                        self._seen[r] = (seen["n"], self.clock(), seen)
        except Exception:  # a store that does not answer: its host (rank 0's machine) is what stopped
            self._store = None

    def diagnosis(self) -> tuple[str, bool]:
        """(what stopped, whether this rank is the one to say so: the lowest rank that still answers)."""
        now = self.clock()
        silent = sorted(r for r in range(self.world) if r != self.rank
                        and (now - self._seen.get(r, (0, -1e18, {}))[1] > SILENT_AFTER_S
                             or (r == 0 and self._store_stuck)))
        answering = [r for r in range(self.world) if r not in silent]
        if silent:
            parts = []
            for r in silent:
                if r in self._seen:
                    _, when, s = self._seen[r]
                    parts.append(f"rank {r} stopped answering {now - when:.0f} s ago, at step {s['step']} "
                                 f"({s['phase']})")
                else:
                    parts.append(f"rank {r} never answered")
            return "; ".join(parts), self.rank == min(answering)
        if self._seen:
            lowest = min(s["step"] for _, _, s in self._seen.values())
            if lowest < self.step:
                behind = [f"rank {r} at step {s['step']} ({s['phase']})" for r, (_, _, s) in sorted(self._seen.items())
                          if s["step"] == lowest]
                return "behind: " + ", ".join(behind), self.rank == min(answering)
        return f"every rank answers; rank {self.rank} waits at step {self.step} ({self.phase})", self.rank == 0

    def _end(self, stalled: float) -> None:
        what, mine = self.diagnosis()
        if not mine:
            return  # the lowest answering rank speaks; the launcher stops this one after it
        print(f"\nlillm: watchdog: no progress for {stalled:.0f} s (bound {self.bound:.0f} s: train.watchdog_s, or "
              f"{FACTOR:.0f}x the slowest step, evaluation or save so far); {what}; ending the job",
              file=sys.stderr, flush=True)
        os._exit(2)
