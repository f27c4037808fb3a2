"""The post-training loader: micro-batches of chat rows (SFT) or preference pairs (DPO) for one rank.

It follows the pretraining stream's rules (see `lillm.data.loader`): epoch e is a permutation of the rows
drawn from (seed, e); micro-batch q of the global stream goes to rank q % world_size; the state is one
global micro-batch counter, so a run resumes exactly, at any world size. With packing, several
conversations share a row; each keeps its own rotary positions and attends only to itself. Like the
pretraining loader it takes `seq_len`, the model's input length, and reads rows of seq_len + 1 tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from lillm.data.examples import Batch, collate, collate_pairs, make_row, pack
from lillm.errors import UserError


class ChatLoader:
    """Micro-batches of SFT rows (or DPO pairs) for one rank, from a global stream that resumes exactly.

    For DPO (`pairs=True`) a micro-batch of B pairs is one Batch of 2B rows: the B chosen rows, then the
    B rejected rows in the same order.
    """

    def __init__(self, examples: list[Any], micro_batch_size: int, rank: int, world_size: int, seed: int,
                 seq_len: int, pad_id: int, shuffle: bool = True, packing: bool = False, pairs: bool = False):
        self.examples, self.micro_batch_size = examples, micro_batch_size
        self.rank, self.world_size, self.seed, self.seq_len = rank, world_size, seed, seq_len
        self.pad_id, self.shuffle, self.packing, self.pairs = pad_id, shuffle, packing and not pairs, pairs
        self.position = 0  # global micro-batches consumed by all ranks together
        self._epoch_rows: tuple[int, list[Any]] = (-1, [])
        self._per_epoch: dict[int, int] = {}  # micro-batches per epoch (packing makes it vary a little)
        if self.batches_per_epoch == 0:
            raise UserError(f"{len(examples)} training records make fewer rows than one micro-batch "
                            f"({micro_batch_size}); lower train.micro_batch_size or add data")

    def _rows(self, epoch: int) -> list[Any]:
        if self._epoch_rows[0] != epoch:
            n = len(self.examples)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            if self.pairs:
                rows = [self.examples[i] for i in order]
            else:
                rows = pack(self.examples, order, self.seq_len + 1, self.packing)
            self._epoch_rows = (epoch, rows)
            self._per_epoch[epoch] = len(rows) // self.micro_batch_size
        return self._epoch_rows[1]

    def _count(self, epoch: int) -> int:
        if epoch not in self._per_epoch:
            self._rows(epoch)
        return self._per_epoch[epoch]

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches in epoch 0 (with packing, later epochs can differ slightly)."""
        return self._count(0)

    def micro_batch(self, q: int) -> Batch:
        """Global micro-batch q: epochs follow each other, each its own permutation; a short tail is dropped."""
        epoch = 0
        while q >= self._count(epoch):
            q -= self._count(epoch)
            epoch += 1
        rows = self._rows(epoch)[q * self.micro_batch_size : (q + 1) * self.micro_batch_size]
        if self.pairs:
            return collate_pairs(rows, self.pad_id)
        return collate(rows, self.pad_id, self.packing)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self.micro_batch(self.position + self.rank)
            self.position += self.world_size
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "rows": len(self.examples), "seq_len": self.seq_len,
                "packing": self.packing}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rows"] != len(self.examples) or state["seed"] != self.seed:
            raise UserError(f"cannot resume the data stream: the checkpoint saw {state['rows']} records with seed "
                            f"{state['seed']}, this run has {len(self.examples)} with seed {self.seed}")
        for key in ("seq_len", "packing"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(f"cannot resume the data stream: {key} was {state[key]!r} when saved, now "
                                f"{getattr(self, key)!r} (the rows would differ)")
        self.position = state["position"]


def chat_validation_batches(rows: list[Any], micro_batch_size: int, num_batches: int, rank: int, world_size: int,
                            pad_id: int, pairs: bool = False) -> Iterator[Batch]:
    """This rank's share of a fixed validation set: the first num_batches micro-batches of the rows, in order
    and unpacked, micro-batch q going to rank q % world_size (the same set at any world size)."""
    for q in range(rank, min(num_batches, -(-len(rows) // micro_batch_size)), world_size):
        chunk = rows[q * micro_batch_size : (q + 1) * micro_batch_size]
        if pairs:
            yield collate_pairs(chunk, pad_id)
        else:
            yield collate([make_row([e]) for e in chunk], pad_id, False)
