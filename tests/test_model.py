import logging

import pytest
import torch
import torch.nn.attention.flex_attention as flex

from lillm import LilLM, ModelConfig
from lillm import model as model_module
from lillm.errors import UserError
from lillm.model import apply_rotary, document_block_mask, document_mask, rope_tables

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


def packed_rows(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, positions and document ids (each (2, 300)) of two packed rows: two documents, the first filling whole
    128-token tiles; three documents, then 30 tokens of padding (document -1)."""
    lengths = [[260, 40], [100, 150, 20, 30]]
    documents = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths])
    documents[1, -30:] = -1
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return torch.randint(0, vocab_size, (2, 300), generator=torch.Generator().manual_seed(0)), positions, documents


def logits_and_grads(model: LilLM, **inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(**inputs)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(logits.device)
    ((logits * weights).sum() / logits.shape[:2].numel()).backward()  # a per-token mean; padding counts too
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_flex_block_mask_gives_the_dense_masks_logits_and_gradients(monkeypatch, n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads, max_seq_len=512).train()
    tokens, positions, documents = packed_rows(model.config.vocab_size)
    dense = logits_and_grads(model, tokens=tokens, positions=positions, mask=document_mask(documents))
    # On CPU, compiled flex attention has no backward and torch refuses the eager one up front; eager, it runs
    # the reference math through the same BlockMask, which is what this test checks against the dense mask
    # (test_compiled_flex_attention_on_cuda runs the compiled kernels).
    monkeypatch.setattr(flex, "_validate_device", lambda *args: None)
    with torch.compiler.set_stance("force_eager"):
        block_mask = document_block_mask(documents)
        assert block_mask.full_kv_num_blocks.sum() > 0  # whole tiles skip the mask, partial ones apply it
        fx = logits_and_grads(model, tokens=tokens, positions=positions, mask=block_mask)
    assert torch.isfinite(fx[0]).all()
    torch.testing.assert_close(fx[0], dense[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(fx[1], dense[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled flex attention trains on CUDA only")
@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_compiled_flex_attention_on_cuda(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads, max_seq_len=512).train().cuda()
    tokens, positions, documents = (t.cuda() for t in packed_rows(model.config.vocab_size))
    out = {}
    for mode in ("dense", "flex"):
        model.packed_attention = mode
        assert isinstance(model.document_attention(documents, torch.float32), flex.BlockMask) == (mode == "flex")
        out[mode] = logits_and_grads(model, tokens=tokens, positions=positions, documents=documents)
    torch.testing.assert_close(out["flex"][0], out["dense"][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(out["flex"][1], out["dense"][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_attention_choice_and_fallback(monkeypatch, caplog):
    model = tiny_model()
    documents = torch.tensor([[0, 0, 1, 1, 1, -1]])
    monkeypatch.setattr(model_module, "flex_unavailable", lambda *args: None)
    for mode, kind in (("auto", torch.Tensor), ("dense", torch.Tensor), ("flex", flex.BlockMask)):  # auto: CPU
        model.packed_attention = mode
        with torch.compiler.set_stance("force_eager"):
            assert isinstance(model.document_attention(documents, torch.float32), kind)
    monkeypatch.setattr(model_module, "flex_unavailable", lambda *args: "no kernel")
    assert torch.equal(model.document_attention(documents, torch.float32), document_mask(documents))

    # A failing compilation or kernel is one warning line, once per kind (an unusual one, so never cached before).
    monkeypatch.undo()
    monkeypatch.setattr(model_module, "flex_attention", lambda *args, **kwargs: 1 / 0)
    with caplog.at_level(logging.WARNING, "lillm"), torch.compiler.set_stance("force_eager"):
        for _ in range(2):
            assert model_module.flex_unavailable("cpu", torch.float64, 3, 1, 8, False) == (
                "ZeroDivisionError: division by zero")
    assert [r.getMessage() for r in caplog.records] == [
        "flex attention unavailable (ZeroDivisionError: division by zero); packed rows use a dense mask"]
