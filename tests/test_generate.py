import pytest
import torch

from lillm.errors import UserError
from lillm.generate import SamplingConfig, generate, sample_next, stream_generate
from lillm.model import KVCache

from .conftest import tiny_model


def test_kv_cache_decode_equals_full_recompute():
    model = tiny_model()
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, 2, torch.float32, "cpu")
        steps = [model(x[:, :10], 0, cache)]
        for t in range(10, 24):
            steps.append(model(x[:, t : t + 1], t, cache))
        chunked = model(x[:, :16], 0, KVCache(model.config, 2, torch.float32, "cpu"))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, full[:, :16], atol=1e-5, rtol=1e-5)


def test_each_decode_step_feeds_one_token():
    model = tiny_model()
    seen = []
    handle = model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    generate(model, [[1, 2, 3, 4, 5]], SamplingConfig(max_new_tokens=6, temperature=0))
    handle.remove()
    assert seen == [5, 1, 1, 1, 1, 1]


def test_batched_prompts_of_different_lengths_match_single_runs():
    model = tiny_model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300]]
    cfg = SamplingConfig(max_new_tokens=8, temperature=0)
    batched = generate(model, prompts, cfg)
    singles = [generate(model, [p], cfg)[0] for p in prompts]
    assert batched == singles


def test_stop_token_and_streaming():
    model = tiny_model()
    cfg = SamplingConfig(max_new_tokens=10, temperature=0)
    first = generate(model, [[1, 2, 3]], cfg)[0]
    stop = first[2]
    out = generate(model, [[1, 2, 3]], cfg, stop_ids=[stop])[0]
    assert out == first[: first.index(stop) + 1]
    steps = list(stream_generate(model, [[1, 2, 3], [9]], cfg, stop_ids=[stop]))
    assert [s[0] for s in steps][: len(out)] == out
    assert all(s[0] is None for s in steps[len(out) :])


def test_sampling_is_seeded_and_filters():
    model = tiny_model()
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a = generate(model, [[1, 2, 3]], cfg)
    assert a == generate(model, [[1, 2, 3]], cfg)
    assert a != generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=12, temperature=1.0, seed=8))
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), g)) for _ in range(50)} == {1, 2}
    picks = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.5), g)) for _ in range(50)}
    assert picks == {1}


def test_generation_stops_at_max_seq_len():
    model = tiny_model(max_seq_len=16)
    out = generate(model, [[1] * 12], SamplingConfig(max_new_tokens=50, temperature=0))[0]
    assert len(out) == 16 - 12 + 1  # the last sampled token needs no cache slot


def test_bad_prompts():
    model = tiny_model()
    cfg = SamplingConfig(max_new_tokens=2)
    with pytest.raises(UserError, match="longer than max_seq_len=256"):
        generate(model, [[1] * 300], cfg)
    with pytest.raises(UserError, match="exceed the model's max_batch_size=16"):
        generate(model, [[1]] * 17, cfg)
    with pytest.raises(UserError, match="outside the vocabulary"):
        generate(model, [[1, 9999]], cfg)
    with pytest.raises(UserError, match="top_p"):
        SamplingConfig(top_p=0)
