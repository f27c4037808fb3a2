import pytest
import torch

from lillm import LilLM, ModelConfig
from lillm.errors import UserError
from lillm.model import apply_rotary, rope_tables

from .conftest import tiny_model


def test_lil39m_parameter_count_is_exact():
    cfg = ModelConfig.from_preset("lil-39m")
    assert cfg.ffn_hidden_dim == 1408 and cfg.head_dim == 32
    with torch.device("meta"):
        model = LilLM(cfg)
    assert model.num_params() == cfg.num_params() == 39_596_544


def test_presets():
    assert LilLM(ModelConfig.from_preset("debug")).num_params() < 2_000_000
    big = ModelConfig.from_preset("lil-300m")
    assert big.d_model == 1024 and big.n_layers == 24 and 250e6 < big.num_params() < 350e6
    with pytest.raises(UserError, match="unknown model preset 'nope'"):
        ModelConfig.from_preset("nope")


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        ModelConfig(d_model=100, n_heads=3, n_kv_heads=2, vocab_size=0)
    msg = str(err.value)
    assert "vocab_size" in msg and "n_heads=3 does not divide d_model=100" in msg
    assert "n_kv_heads=2 does not divide n_heads=3" in msg
    with pytest.raises(ValueError, match="odd"):
        ModelConfig(d_model=48, n_heads=16, n_kv_heads=8)  # head_dim 3
    cfg = ModelConfig.from_preset("debug")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_shapes_and_tied_embeddings():
    model = tiny_model()
    logits = model(torch.randint(0, 512, (3, 17)))
    assert logits.shape == (3, 17, 512)
    assert model.output.weight is model.tok_embeddings.weight
    assert all("bias" not in n for n, _ in model.named_parameters())


def test_fan_in_init_with_depth_scaled_residual_writes():
    model = tiny_model(n_layers=8)  # d_model 128
    fan_in = 128**-0.5
    for w in (model.tok_embeddings.weight, model.layers[0].attention.wq.weight, model.layers[3].feed_forward.w1.weight):
        assert abs(w.std().item() - fan_in) < 3e-3
    residual = model.config.init_std / 4  # sqrt(2 * 8) = 4
    for w in (model.layers[0].attention.wo.weight, model.layers[7].feed_forward.w2.weight):
        assert abs(w.std().item() - residual) < 1e-3
    assert model.output.weight is model.tok_embeddings.weight


def test_causality():
    model = tiny_model()
    x = torch.randint(0, 512, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gqa_equals_repeated_kv_reference():
    model = tiny_model()
    attn = model.layers[0].attention
    x = torch.randn(2, 9, model.config.d_model)
    cos, sin = model.rope_cos[:9], model.rope_sin[:9]
    with torch.no_grad():
        out = attn(x, cos, sin)
        B, T, H, KV, D = 2, 9, attn.n_heads, attn.n_kv_heads, attn.head_dim
        q = apply_rotary(attn.wq(x).view(B, T, H, D), cos, sin).transpose(1, 2)
        k = apply_rotary(attn.wk(x).view(B, T, KV, D), cos, sin).transpose(1, 2).repeat_interleave(H // KV, 1)
        v = attn.wv(x).view(B, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1)
        scores = (q @ k.transpose(-1, -2)) / D**0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        ref = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rope_depends_only_on_relative_position():
    cos, sin = rope_tables(16, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        qm = apply_rotary(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rotary(k, cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))
    torch.testing.assert_close(score(0, 0), (q * k).sum())
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_activation_checkpointing_gives_same_gradients():
    model = tiny_model().train()
    x = torch.randint(0, 512, (2, 16))
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_meta_device_construction_then_init():
    with torch.device("meta"):
        model = LilLM(ModelConfig.from_preset("debug"))
    model = model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.randint(0, 100, (1, 5)))).all()
