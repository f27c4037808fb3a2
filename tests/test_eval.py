"""`lillm eval`: every task kind on tiny local data in the real datasets' layouts, checked against an
independent computation with transformers (one unpadded sequence at a time, the export's own tokenizer
encoding the strings), truncation, bits per byte, the built-in task, and the report files."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lillm import cli
from lillm.evals.harness import Scorer, encode_pair, loglikelihoods, prepare_task, run_task
from lillm.evals.tasks import Choice, continuation_items, iter_items, parse_task
from lillm.loading import load_model


def _words(texts: list[str]) -> list[str]:
    return " ".join(texts[:40]).split()


def _phrase(rng: random.Random, words: list[str], n: int) -> str:
    start = rng.randrange(len(words) - n)
    return " ".join(words[start:start + n])


@pytest.fixture(scope="module")
def task_files(tmp_path_factory, small_texts) -> dict[str, Path]:
    """Six items per task, written in each dataset's own field names (HellaSwag, ARC, PIQA, LAMBADA)."""
    rng, words = random.Random(0), _words(small_texts)
    root = tmp_path_factory.mktemp("eval_tasks")
    hs = [{"activity_label": "Python", "ctx_a": _phrase(rng, words, 12), "ctx_b": _phrase(rng, words, 3),
           "endings": [_phrase(rng, words, rng.randrange(3, 9)) + " [title] x" for _ in range(4)],
           "label": str(i % 4), "ind": i} for i in range(6)]
    arc = [{"id": f"q{i}", "question": _phrase(rng, words, 10) + "?", "answerKey": "ABCDE"[i % (3 + i % 3)],
            "choices": {"text": [_phrase(rng, words, rng.randrange(1, 5)) for _ in range(3 + i % 3)],
                        "label": list("ABCDE"[:3 + i % 3])}} for i in range(6)]
    piqa = [{"goal": _phrase(rng, words, 8), "sol1": _phrase(rng, words, 6), "sol2": _phrase(rng, words, 7),
             "label": i % 2} for i in range(6)]
    lam = [{"text": _phrase(rng, words, 12 if i else 400)} for i in range(6)]  # item 0 outgrows the context
    out = {}
    for name, rows in (("hellaswag", hs), ("arc", arc), ("piqa", piqa), ("lambada", lam)):
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["text"] = root / "text.jsonl"
    out["text"].write_text("".join(json.dumps({"text": t}) + "\n" for t in small_texts[:12]))
    return out


@pytest.fixture(scope="module")
def reference(chat_base):
    """transformers' Llama and tokenizer from the export: the independent scorer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(chat_base).eval(), AutoTokenizer.from_pretrained(chat_base)


def reference_loglikelihood(reference, context: str, continuation: str, max_len: int) -> tuple[float, bool]:
    """One request, unbatched, encoded by the export's tokenizer with its special tokens (which put the
    end-of-text token in front, as lm-eval's default encoding of an export does)."""
    hf, tok = reference
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tok(context)["input_ids"]
    cont = tok(context + continuation)["input_ids"][len(ctx):]
    ids = (ctx + cont)[-(max_len + 1):][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -len(cont):].float(), -1)
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_every_task_kind_agrees_with_transformers_one_item_at_a_time(chat_base, task_files, reference, tmp_path):
    specs = [f"bpb:{task_files['text']}", f"hellaswag:{task_files['hellaswag']}", f"arc_easy:{task_files['arc']}",
             f"piqa:{task_files['piqa']}", f"lambada:{task_files['lambada']}"]
    out = tmp_path / "report" / "eval.json"
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(chat_base), "--tasks", ",".join(specs), "--batch_size", "4", "--out", str(out)])
    assert e.value.code in (0, None)
    report = json.loads(out.read_text())
    assert "| task |" in out.with_suffix(".md").read_text()
    results = report["results"]
    model, tok = load_model(chat_base)
    max_len = model.config.max_seq_len
    for spec in specs[1:]:
        items = list(iter_items(parse_task(spec)))
        acc = acc_norm = gold_ll = 0.0
        for item in items:
            if isinstance(item, Choice):
                lls = [reference_loglikelihood(reference, item.context, " " + c, max_len)[0] for c in item.choices]
                norm = [ll / len(c) for ll, c in zip(lls, item.choices)]
                acc += max(range(len(lls)), key=lls.__getitem__) == item.gold
                acc_norm += max(range(len(norm)), key=norm.__getitem__) == item.gold
            else:
                ll, greedy = reference_loglikelihood(reference, item.context, item.target, max_len)
                acc += greedy
                gold_ll += ll
        r = results[spec]
        assert r["items"] == len(items) == 6, (spec, r)
        assert r["acc"] == pytest.approx(acc / len(items)), (spec, r)
        if "acc_norm" in r:
            assert r["acc_norm"] == pytest.approx(acc_norm / len(items)), (spec, r)
            assert 0.25 <= r["chance"] <= 0.5
        else:
            assert r["perplexity"] == pytest.approx(math.exp(-gold_ll / len(items)), rel=1e-4)
            assert r["truncated"] == 1  # the 400-word item keeps its last max_seq_len + 1 tokens
    assert results[specs[0]]["documents"] == 12 and 0 < results[specs[0]]["bpb"] < 20


def test_batched_and_padded_loglikelihoods_equal_transformers_per_request(chat_base, task_files, reference):
    model, tok = load_model(chat_base)
    items = list(iter_items(parse_task(f"hellaswag:{task_files['hellaswag']}")))
    pairs = [(it.context, " " + c) for it in items for c in it.choices]
    ours = loglikelihoods(model, [encode_pair(tok, c, x) for c, x in pairs], model.config.max_seq_len, 5,
                          torch.device("cpu"))
    for (c, x), (ll, greedy) in zip(pairs, ours):
        ref_ll, ref_greedy = reference_loglikelihood(reference, c, x, model.config.max_seq_len)
        assert abs(ll - ref_ll) < 1e-4 and greedy == ref_greedy


def test_bits_per_byte_scores_every_token_of_the_stream_once(chat_base, task_files):
    """The stream's windows overlap by one token, so the scored targets are every token after the first, and
    their bytes are exactly the UTF-8 bytes of the documents; on 1 and 2 'ranks' the sums are equal."""
    model, tok = load_model(chat_base)
    prepared = prepare_task(parse_task(f"bpb:{task_files['text']}"), tok, model.config.max_seq_len)
    texts = [json.loads(line)["text"] for line in task_files["text"].read_text().splitlines()]
    scorer = Scorer(model, tok, 64, model.config.vocab_size, batch_size=3)
    one = run_task(scorer, prepared)
    assert one["tokens"] == len(prepared.stream) - 1
    assert one["bytes"] == sum(len(tok.decode(tok.encode(t)).encode()) for t in texts)
    shares = [run_task(scorer, prepared, rank=r, world=2) for r in (0, 1)]
    for key in ("tokens", "bytes"):
        assert shares[0][key] + shares[1][key] == one[key]


def test_the_builtin_task_is_held_out_text_with_four_distinct_choices():
    items = list(continuation_items("pydoc"))
    assert len(items) >= 15
    assert all(len(set(i.choices)) == 4 and i.choices[i.gold] for i in items)
    assert {i.gold for i in items} == {0, 1, 2, 3}
    from lillm.data.sources import in_validation, open_source

    held_out = " ".join(" ".join(t.split()) for t in open_source("pydoc") if in_validation(t, 0.005))
    assert all(f"{i.context} {i.choices[i.gold]}" in held_out for i in items[:10])


def test_bits_per_byte_of_a_prepared_split_equals_its_text(tokenizer_dir, pretrain_shards, tmp_path):
    """bpb:DIR scores the val shards; the same documents as text give the same stream and the same figure."""
    from lillm.data.loader import ShardSet
    from lillm.tokenizer import load_tokenizer

    from .conftest import tiny_model

    tok = load_tokenizer(tokenizer_dir)
    model = tiny_model(vocab_size=tok.vocab_size, max_seq_len=64)
    shards = ShardSet(pretrain_shards, "val")
    ids = np.concatenate([np.asarray(m, dtype=np.int64) for m in shards.maps()])
    docs = [tok.decode(d) for d in np.split(ids, np.flatnonzero(ids == tok.eos_id) + 1) if len(d)]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    scorer = Scorer(model, tok, 64, tok.vocab_size, batch_size=4)
    a = prepare_task(parse_task(f"bpb:{pretrain_shards}"), tok, 64)
    b = prepare_task(parse_task(f"bpb:{tmp_path / 'val.jsonl'}"), tok, 64)
    assert a.documents == b.documents == len(docs)
    assert np.array_equal(a.stream, b.stream)
    assert run_task(scorer, a)["bpb"] == run_task(scorer, b)["bpb"]
    assert prepare_task(parse_task(f"bpb:{pretrain_shards}"), tok, 64, limit=2).documents == 2



def test_lm_evaluation_harness_agrees_on_the_export(chat_base, task_files, tmp_path):
    """lm-eval's own HF model over lillm's export with its default settings, a local task YAML in PIQA's
    layout (offline): the same request ids, per-choice log-likelihoods within 1e-4 and the same accuracies.
    Runs where lm-eval is installed (`pip install lm-eval`); lillm does not depend on it."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/lillm_piqa.yaml").write_text(
        "task: lillm_piqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {task_files['piqa']}\noutput_type: multiple_choice\nvalidation_split: validation\n"
        'doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: "{{[sol1, sol2]}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={chat_base},dtype=float32",
                                  tasks=["lillm_piqa"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                  log_samples=True, batch_size=4, device="cpu")
    samples = sorted(out["samples"]["lillm_piqa"], key=lambda s: s["doc_id"])
    model, tok = load_model(chat_base)
    prepared = prepare_task(parse_task(f"piqa:{task_files['piqa']}"), tok, model.config.max_seq_len)
    ours = loglikelihoods(model, [r for reqs in prepared.requests for r in reqs], model.config.max_seq_len, 4,
                          torch.device("cpu"))
    theirs = [float(resp[0][0]) for s in samples for resp in s["resps"]]
    assert len(theirs) == len(ours) == 12
    assert max(abs(a[0] - b) for a, b in zip(ours, theirs)) < 1e-4
    mine = run_task(Scorer(model, tok, model.config.max_seq_len, model.config.vocab_size), prepared)
    assert mine["acc"] == pytest.approx(out["results"]["lillm_piqa"]["acc,none"])
    assert mine["acc_norm"] == pytest.approx(out["results"]["lillm_piqa"]["acc_norm,none"])
