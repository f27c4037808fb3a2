"""Bits per byte: the scorer against a hand computation, and validation's sums at any world size."""

from __future__ import annotations

import math

import numpy as np
import torch

from lillm.scoring import Score, bits_per_byte, byte_table, score_windows
from lillm.tokenizer import load_tokenizer

from .conftest import tiny_model


def test_bits_per_byte_by_hand(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    texts = ["The module provides functions.", "Return the value of x; raise ValueError otherwise.",
             "naïve café ✓ — UTF-8 of several bytes"]
    ids = []
    for text in texts:
        ids += tok.encode(text) + [tok.eos_id]  # the pretraining layout: documents separated by end-of-text
    model = tiny_model(vocab_size=tok.vocab_size)
    windows = torch.tensor([ids[:25], ids[24:49]])  # (2, 25): consecutive windows sharing one token
    got = score_windows(model, windows, byte_table(tok.token_bytes()))

    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for w in windows.tolist():
            logp = torch.log_softmax(model(torch.tensor([w[:-1]]))[0].double(), -1)
            nats -= sum(float(logp[i, t]) for i, t in enumerate(w[1:]))
            # The UTF-8 bytes of the targets' text, each special token contributing none.
            pieces = [i for i in w[1:] if i != tok.eos_id]
            n_bytes += len(tok.decode(pieces).encode())
    assert got.tokens == 48 and got.bytes == n_bytes
    assert math.isclose(got.nats, nats, rel_tol=1e-5)
    assert math.isclose(got.bits_per_byte, nats / (math.log(2) * n_bytes), rel_tol=1e-5)
    assert math.isnan(bits_per_byte(1.0, 0))


def test_token_bytes_add_up_to_the_text(tokenizer_dir, small_texts):
    tok = load_tokenizer(tokenizer_dir)
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size and table[tok.eos_id] == table[tok.bos_id] == 0
    assert tok.token_bytes(tok.vocab_size + 10)[-10:] == [0] * 10  # a model's vocabulary may be larger
    for text in small_texts[:30]:
        assert sum(table[i] for i in tok.encode(text)) == len(text.encode())


def test_validation_sums_are_the_same_at_any_world_size(pretrain_shards):
    from lillm.data.loader import ShardSet, validation_windows

    shards = ShardSet(pretrain_shards, "val")
    tok = load_tokenizer(pretrain_shards / "tokenizer")
    model, table = tiny_model(vocab_size=tok.vocab_size), byte_table(tok.token_bytes())

    def total(rank: int, world: int) -> Score:
        score = Score()
        for batch in validation_windows(shards, 32, 2, 6, rank, world):
            score += score_windows(model, batch, table)
        return score

    one, two = total(0, 1), total(0, 2) + total(1, 2)
    assert (one.tokens, one.bytes) == (two.tokens, two.bytes) and one.bytes > 0
    assert np.isclose(one.nats, two.nats, rtol=1e-9) and np.isclose(one.bits_per_byte, two.bits_per_byte, rtol=1e-9)
