"""Chat data: the loss mask, packing, over-long policies, bad records, the post-training loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from lillm.data.chat_loader import ChatLoader
from lillm.data.examples import IGNORE_INDEX, Example, chat_example, collate, fit, load_preferences, load_sft, pack
from lillm.data.records import ChatDataConfig, preference
from lillm.errors import UserError
from lillm.tokenizer import load_tokenizer
from lillm.train.loss import token_loss

from .conftest import REPO, tiny_model

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_exact_loss_mask_of_a_multi_turn_conversation(tok):
    ex = chat_example(tok, CONVERSATION)
    # Expected ids and mask, written out piece by piece from the format's definition.
    ids, learn = [tok.bos_id], [False]
    for m in CONVERSATION:
        header = [tok.start_header_id, *tok.encode(m["role"]), tok.end_header_id]
        body = [*tok.encode(m["content"]), tok.eot_id]
        ids += header + body
        learn += [False] * len(header) + [m["role"] == "assistant"] * len(body)
    assert ex.ids.tolist() == ids
    assert ex.learn.tolist() == learn
    learned = tok.decode(ex.ids[ex.learn].tolist(), skip_special_tokens=False)
    assert learned == "Hello!<|eot_id|>It is 4.<|eot_id|>"
    # The generation prompt is an exact token prefix: the mask starts where generation starts.
    prompt = tok.encode_chat(CONVERSATION[:-1], add_generation_prompt=True)
    assert ex.ids[: len(prompt)].tolist() == prompt and ex.learn[len(prompt)] and not ex.learn[len(prompt) - 1]

    batch = collate(pack([ex], np.arange(1), 10_000, False), tok.pad_id, packed=False)
    want = torch.tensor([i if m else IGNORE_INDEX for i, m in zip(ids[1:], learn[1:])])
    assert torch.equal(batch.targets[0], want) and torch.equal(batch.inputs[0], torch.tensor(ids[:-1]))


def test_chat_template_in_transformers_gives_the_same_ids_and_prefix(tok, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    odd = [{"role": "user", "content": "\n\nleading newlines"}, {"role": "assistant", "content": " spaced 🙂"}]
    for msgs in (CONVERSATION, odd):
        for gen in (False, True):
            out = hf.apply_chat_template(msgs[:-1] if gen else msgs, add_generation_prompt=gen, tokenize=True)
            out = out["input_ids"] if hasattr(out, "keys") else out
            assert list(out) == tok.encode_chat(msgs[:-1] if gen else msgs, add_generation_prompt=gen)


@pytest.mark.parametrize("attention", ["dense", "flex"])
def test_packing_leaks_nothing_between_conversations(tok, attention):
    model = tiny_model(vocab_size=tok.vocab_size)
    model.packed_attention = attention
    convs = [CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "Name a color."},
                                               {"role": "assistant", "content": "Blue."}]]
    examples = [chat_example(tok, c) for c in convs]
    packed = collate(pack(examples, np.arange(3), 10_000, True), tok.pad_id, packed=True)
    assert packed.inputs.shape[0] == 1
    assert packed.documents[0].tolist() == [d for d, e in enumerate(examples) for _ in e.ids][:-1]
    alone = [collate(pack([e], np.arange(1), 10_000, False), tok.pad_id, packed=False) for e in examples]
    # Eager flex attention: the math of the compiled kernel, without a minute of CPU compilation.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        assert isinstance(model.document_attention(packed.documents, torch.float32), BlockMask) == (attention == "flex")
        logits = model(packed.inputs, positions=packed.positions, documents=packed.documents)[0]
        offset, total = 0, 0.0
        for e, b in zip(examples, alone):
            n = len(e.ids)
            ref = model(b.inputs)[0]
            # Each conversation's logits are the ones it gets alone (same positions, no cross attention) ...
            assert (logits[offset : offset + n - 1] - ref).abs().max() < 1e-5
            # ... and its targets are its own; the step into the next conversation is never a target.
            assert torch.equal(packed.targets[0, offset : offset + n - 1], b.targets[0])
            if offset + n - 1 < packed.targets.shape[1]:
                assert packed.targets[0, offset + n - 1] == IGNORE_INDEX
            total += float(token_loss(ref[None], b.targets, 1.0))
            offset += n
        assert float(token_loss(logits[None], packed.targets, 1.0)) == pytest.approx(total, rel=1e-5)
    assert packed.positions[0, : len(examples[0].ids)].tolist() == list(range(len(examples[0].ids)))


def test_padding_is_masked_from_the_loss(tok):
    rows = pack([chat_example(tok, CONVERSATION), chat_example(tok, CONVERSATION[1:3])], np.arange(2), 10_000, False)
    batch = collate(rows, tok.pad_id, packed=False)
    short = len(rows[1].ids)
    assert (batch.inputs[1, short:] == tok.pad_id).all()
    assert (batch.targets[1, short - 1 :] == IGNORE_INDEX).all()
    assert batch.num_targets == int(rows[0].learn[1:].sum() + rows[1].learn[1:].sum())


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_overlong_policies_truncate_or_drop_and_count(tok, tmp_path):
    long_reply = " ".join(["word"] * 200)
    recs = [{"prompt": "Hi", "response": "Hello."}, {"prompt": "Tell me a story", "response": long_reply},
            {"prompt": " ".join(["long"] * 200), "response": "Short."}]
    src = _write(tmp_path / "d.jsonl", recs)
    data = load_sft(ChatDataConfig(source=str(src), val_fraction=0), tok, seq_len=64)
    # The story is cut (its reply still has tokens to learn); the long prompt leaves none: dropped.
    assert data.stats == {"records": 3, "truncated": 1, "dropped_overlong": 1}
    assert all(len(e.ids) <= 65 for e in data.train)
    data = load_sft(ChatDataConfig(source=str(src), val_fraction=0, overlong="drop"), tok, seq_len=64)
    assert data.stats == {"records": 3, "truncated": 0, "dropped_overlong": 2}
    assert fit(Example(np.arange(5), np.zeros(5, dtype=bool)), 10, "truncate") is None


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty assistant"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                   {"role": "assistant", "content": "a"}]}, "system message may only come first"),
    ({"text": "plain"}, "expected a 'messages' field"),
])
def test_bad_conversations_name_the_file_and_line(tok, tmp_path, record, message):
    src = _write(tmp_path / "bad.jsonl", [{"prompt": "Hi", "response": "Hello."}, record])
    with pytest.raises(UserError, match=message) as e:
        load_sft(ChatDataConfig(source=str(src)), tok, seq_len=64)
    assert f"{src}:2" in str(e.value)


def test_preference_records(tok, tmp_path):
    p, c, r = preference({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, "x")
    assert p == [{"role": "user", "content": "Hi"}] and (c, r) == ("Hello!", "Go away.")
    conv = [{"role": "user", "content": "Hi"}]
    p2, c2, r2 = preference({"prompt": "ignored", "chosen": [*conv, {"role": "assistant", "content": "Hello!"}],
                             "rejected": [*conv, {"role": "assistant", "content": "Go away."}]}, "x")
    assert (p2, c2, r2) == (p, c, r)
    with pytest.raises(UserError, match="identical"):
        preference({"prompt": "Hi", "chosen": "Same", "rejected": "Same"}, "x")
    with pytest.raises(UserError, match="differ before their last reply"):
        preference({"chosen": [*conv, {"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "b"}]}, "x")
    src = _write(tmp_path / "prefs.jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
    data = load_preferences(ChatDataConfig(source=str(src), val_fraction=0), tok, seq_len=64)
    chosen, rejected = data.train[0]
    # Only the compared reply is scored: the prompt's tokens are never learned.
    assert tok.decode(chosen.ids[chosen.learn].tolist(), skip_special_tokens=False) == "Hello!<|eot_id|>"
    assert tok.decode(rejected.ids[rejected.learn].tolist(), skip_special_tokens=False) == "Go away.<|eot_id|>"


def test_hub_code_path_reads_a_local_dataset_folder(tok, tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    _write(folder / "train.jsonl", [{"messages": CONVERSATION}, {"prompt": "Hi", "response": "Hello."}])
    data = load_sft(ChatDataConfig(source=f"hf:{folder}", val_fraction=0), tok, seq_len=128)
    assert data.stats["records"] == 2 and data.train[0].ids.tolist() == chat_example(tok, CONVERSATION).ids.tolist()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "Hi", "response": "Hello."}]), tmp_path / "d.parquet")
    assert load_sft(ChatDataConfig(source=str(tmp_path / "d.parquet"), val_fraction=0), tok, 64).stats["records"] == 1
    import datasets

    rows = {"prompt": ["Hi", "Bye", "Why?"], "response": ["Hello.", "Goodbye.", "Because."]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict({k: v[:1] for k, v in rows.items()})}).save_to_disk(
        str(tmp_path / "saved"))
    for split, n in (("train", 3), ("test", 1)):
        cfg = ChatDataConfig(source=str(tmp_path / "saved"), split=split, val_fraction=0)
        assert load_sft(cfg, tok, 64).stats["records"] == n


@pytest.mark.parametrize("packing", [False, True])
def test_loader_stream_is_the_same_at_any_world_size_and_resumes(tok, packing):
    examples = [chat_example(tok, [{"role": "user", "content": f"Question {i}?"},
                                  {"role": "assistant", "content": "Answer " * (1 + i % 5)}]) for i in range(23)]

    def loader(rank, world):
        return ChatLoader(examples, 2, rank, world, seed=5, seq_len=63, pad_id=tok.pad_id, packing=packing)

    one = loader(0, 1)
    it = iter(one)
    serial = [next(it).inputs for _ in range(12)]  # several epochs
    two = [iter(loader(r, 2)) for r in range(2)]
    interleaved = [next(two[q % 2]).inputs for q in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(serial, interleaved))
    # Resume on 2 ranks from a 1-rank state after 5 micro-batches: the stream goes on without gap or repeat.
    first = loader(0, 1)
    it = iter(first)
    for _ in range(5):
        next(it)
    resumed = [loader(r, 2) for r in range(2)]
    for lo in resumed:
        lo.load_state_dict(first.state_dict())
    its = [iter(lo) for lo in resumed]
    assert all(torch.equal(next(its[(q - 5) % 2]).inputs, serial[q]) for q in range(5, 12))
    with pytest.raises(UserError, match="cannot resume"):
        ChatLoader(examples[:-1], 2, 0, 1, 5, 63, tok.pad_id).load_state_dict(first.state_dict())


def test_builtin_pydoc_chat_set_serves_sft_and_dpo(tok):
    cfg = ChatDataConfig(source="pydoc-chat", val_fraction=0.1)
    sft, again = load_sft(cfg, tok, 256), load_sft(cfg, tok, 256)
    assert sft.stats["records"] > 100 and len(sft.val) > 0
    assert [e.ids.tolist() for e in sft.train] == [e.ids.tolist() for e in again.train]  # deterministic
    prefs = load_preferences(cfg, tok, 256)
    assert prefs.stats["records"] == sft.stats["records"]
    assert all(c.ids.tolist() != r.ids.tolist() for c, r in prefs.train)


def test_no_dpo_validation_question_is_in_sft_training_data(tok):
    # The README's post-training path: SFT on pydoc-chat, then DPO on it, both at the shipped val_fraction.
    import yaml

    from lillm.data.examples import split_key

    fractions = [yaml.safe_load((REPO / f"lillm/configs/{name}-debug.yaml").read_text())["data"]["val_fraction"]
                 for name in ("sft", "dpo")]
    assert fractions[1] <= fractions[0]
    sft = load_sft(ChatDataConfig(source="pydoc-chat", val_fraction=fractions[0]), tok, 256)
    prefs = load_preferences(ChatDataConfig(source="pydoc-chat", val_fraction=fractions[1]), tok, 256)
    assert len(prefs.val) > 0

    def prompt_of(example):  # the ids before the first learned token: the question (pydoc-chat is single-turn)
        return tuple(example.ids[: int(np.argmax(example.learn))].tolist())

    sft_train = {prompt_of(e) for e in sft.train}
    dpo_val = {prompt_of(chosen) for chosen, _ in prefs.val}
    assert not dpo_val & sft_train
    assert split_key([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == \
        split_key([{"role": "user", "content": "q"}])
