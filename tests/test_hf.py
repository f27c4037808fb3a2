import json
import warnings

import pytest
import torch

from lillm import LilLM, ModelConfig
from lillm.errors import UserError
from lillm.generate import SamplingConfig, generate
from lillm.hf import export_hf, import_hf

from .conftest import tiny_model

transformers = pytest.importorskip("transformers")


def _hf_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    return model.eval()


@pytest.mark.parametrize("preset", ["debug", "lil-39m"])
def test_logits_equal_transformers_llama(tmp_path, preset):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    model = LilLM(cfg)
    model.init_weights()
    with torch.no_grad():  # perturb norms so their weights are exercised too
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    export_hf(model.eval(), tmp_path)
    hf = _hf_model(tmp_path)
    x = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_exported_files_are_readable_as_the_umask_says(tmp_path):
    """safetensors writes 0600; an export is handed to others, so it gets the mode of any file the user
    writes."""
    import os

    umask = os.umask(0o022)
    try:
        export_hf(tiny_model(), tmp_path)
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_greedy_generation_equals_transformers_generate(tmp_path):
    model = tiny_model()
    export_hf(model, tmp_path)
    hf = _hf_model(tmp_path)
    prompts = [[7, 8, 9, 10, 11, 12], [40, 41, 42]]
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=12, temperature=0))
    for p, o in zip(prompts, ours):
        out = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert out[0, len(p) :].tolist() == o
    # The batch, left-padded, decodes the same as transformers' left-padded batch.
    ids = torch.tensor([[7, 8, 9, 10, 11, 12], [0, 0, 0, 40, 41, 42]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out[:, 6:].tolist() == ours


def test_import_round_trip(tmp_path):
    model = tiny_model(tie_embeddings=False)
    export_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    back = import_hf(tmp_path)
    assert back.config == model.config
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randint(0, 512, (1, 10))
    torch.testing.assert_close(back(x), model(x))


def test_import_refuses_foreign_directories(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type is 'gpt2'"):
        import_hf(tmp_path)


def test_a_prompt_gets_the_same_ids_and_continuation_in_transformers(tmp_path, tokenizer_dir):
    """One convention: a prompt starts after <|end_of_text|>, in `lillm generate` and in the exported tokenizer."""
    from lillm.tokenizer import load_tokenizer

    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(tokenizer_dir)
    model = tiny_model(vocab_size=tok.vocab_size)
    export_hf(model, tmp_path, tokenizer_dir=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt = "The module provides"
    assert hf_tok(prompt).input_ids == tok.prompt_ids(prompt)
    again = tmp_path / "again"  # an export of a model whose tokenizer came from an export: one prefix, not two
    export_hf(model, again, tokenizer_dir=tmp_path)
    assert transformers.AutoTokenizer.from_pretrained(again)(prompt).input_ids == tok.prompt_ids(prompt)
    assert hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"] == tok.encode_chat(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ours = generate(model, [tok.prompt_ids(prompt)], SamplingConfig(max_new_tokens=12, temperature=0))[0]
    pipe = transformers.pipeline("text-generation", model=str(tmp_path), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. max_length and max_new_tokens both set
        got = pipe(prompt, max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert got == tok.decode(ours)
