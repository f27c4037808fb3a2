"""LoRA (frozen base, merge, adapters off) and the preference losses, on tiny models without DeepSpeed."""

from __future__ import annotations

import math

import pytest
import torch

from lillm.errors import UserError
from lillm.lora import (
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    base_fingerprint,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
)
from lillm.train.loss import preference_loss, sequence_logps

from .conftest import tiny_model


def _train_a_little(model, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    torch.manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    model.train()
    for _ in range(steps):
        loss = model(x[:, :-1]).logsumexp(-1).mean() - model(x[:, :-1]).gather(-1, x[:, 1:, None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_lora_freezes_the_base_bit_for_bit_and_merges_exactly():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = base_fingerprint(model)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        ref = model(x)
    trainable = apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # B starts at zero: training starts at the base model
    _train_a_little(model)
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, before[k]), k  # every base weight bit-identical
    assert base_fingerprint(model) == fp
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - ref).abs().max() > 1e-4  # the adapter learned something
        with adapters_disabled(model):
            assert torch.equal(model(x), ref)  # DPO's reference: the base alone
        merged = merge_lora(model)(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (merged - adapted).abs().max() < 1e-5


def test_adapter_round_trip_and_mismatch():
    a, b = tiny_model(), tiny_model()
    apply_lora(a, LoRAConfig(rank=2))
    _train_a_little(a)
    apply_lora(b, LoRAConfig(rank=2))
    load_lora_state_dict(b, lora_state_dict(a), "adapter")
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    c = tiny_model()
    apply_lora(c, LoRAConfig(rank=2, targets=["wq", "wv"]))
    with pytest.raises(UserError, match="does not fit"):
        load_lora_state_dict(c, lora_state_dict(a), "adapter")
    assert base_fingerprint(tiny_model(seed=1)) != base_fingerprint(tiny_model(seed=0))
    with pytest.raises(ValueError, match="targets"):
        LoRAConfig(rank=2, targets=["q_proj"])


def test_preference_losses():
    zero = torch.zeros(3)
    loss, rc, rr = preference_loss(zero, zero, zero, zero, beta=0.1)
    assert torch.allclose(loss, torch.full((3,), math.log(2)))  # policy == reference: log 2
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    loss, rc, rr = preference_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * 2))))
    ipo, _, _ = preference_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx((2 - 1) ** 2)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[1, 2, -100, -100, -100], [3, 4, 5, 6, -100]])
    logps, counts = sequence_logps(logits, targets)
    want = logits.log_softmax(-1)[0, 0, 1] + logits.log_softmax(-1)[0, 1, 2]
    assert logps[0].item() == pytest.approx(want.item(), rel=1e-5) and counts.tolist() == [2, 4]


def test_dpo_steps_raise_the_margin_of_a_toy_set(tokenizer_dir):
    from lillm.data.examples import chat_example, collate, pack
    from lillm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    policy = tiny_model(vocab_size=tok.vocab_size)
    ref = tiny_model(vocab_size=tok.vocab_size)
    pairs = [("Name a color.", "Blue.", "Seven."), ("Say hi.", "Hi!", "No.")]
    rows = []
    for which in (1, 2):
        for p in pairs:
            conv = [{"role": "user", "content": p[0]}, {"role": "assistant", "content": p[which]}]
            rows += pack([chat_example(tok, conv, last_reply_only=True)], [0], 1000, False)
    batch = collate(rows, tok.pad_id, packed=False)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)

    def margin_and_loss():
        logps, _ = sequence_logps(policy(batch.inputs), batch.targets)
        with torch.no_grad():
            ref_logps, _ = sequence_logps(ref(batch.inputs), batch.targets)
        loss, rc, rr = preference_loss(logps[:2], logps[2:], ref_logps[:2], ref_logps[2:], beta=0.1)
        return (rc - rr).mean().item(), loss.mean()

    m0, _ = margin_and_loss()
    for _ in range(10):
        _, loss = margin_and_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m1, _ = margin_and_loss()
    assert m0 == pytest.approx(0.0, abs=1e-6) and m1 > 0.5
