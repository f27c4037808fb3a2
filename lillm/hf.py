"""Export to and import from transformers' Llama format (config.json + model.safetensors).

The mapping is a rename: lillm keeps Meta's names and transformers' rotary layout (see `lillm.model`).
transformers itself is not needed to export or import; it is only used by tests and by users.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lillm.config import ModelConfig
from lillm.errors import UserError
from lillm.files import read_json, save_safetensors, staged_dir
from lillm.model import LilLM
from lillm.tokenizer import Tokenizer, load_tokenizer

_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def to_hf_key(name: str) -> str:
    """lillm parameter name -> transformers LlamaForCausalLM name."""
    if name in _TOP_KEYS:
        return _TOP_KEYS[name]
    _, idx, rest = name.split(".", 2)  # layers.{i}.rest
    return f"model.layers.{idx}.{_LAYER_KEYS[rest]}"


def from_hf_key(name: str) -> str:
    """transformers LlamaForCausalLM name -> lillm parameter name."""
    for ours, theirs in _TOP_KEYS.items():
        if name == theirs:
            return ours
    _, _, idx, rest = name.split(".", 3)  # model.layers.{i}.rest
    for ours, theirs in _LAYER_KEYS.items():
        if rest == theirs:
            return f"layers.{idx}.{ours}"
    raise KeyError(name)


def hf_config(config: ModelConfig, special_ids: dict[str, int | None] | None = None,
              dtype: torch.dtype = torch.float32) -> dict:
    """A transformers LlamaConfig as a dict."""
    ids = special_ids or {}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # Older transformers read rope_theta; 5.x reads rope_parameters. Both say the same thing.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("pad"),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        # Fields transformers has no place for, so an import gives back the exact ModelConfig.
        "lillm": {"max_batch_size": config.max_batch_size, "multiple_of": config.multiple_of},
    }


def export_hf(
    model: LilLM,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | Tokenizer | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a directory that `AutoModelForCausalLM.from_pretrained` loads as `LlamaForCausalLM`.

    With a tokenizer (or its directory), its files are saved alongside and its special ids recorded.
    """
    out = Path(out_dir)
    with staged_dir(out) as staged:  # a full disk or an interrupt leaves no partial export
        _write_hf(model, staged, tokenizer_dir, dtype)
    return out


def _write_hf(model: LilLM, out: Path, tokenizer_dir: str | os.PathLike | Tokenizer | None,
              dtype: torch.dtype) -> None:
    special_ids = None
    if tokenizer_dir is not None:
        tok = tokenizer_dir if isinstance(tokenizer_dir, Tokenizer) else load_tokenizer(tokenizer_dir)
        special_ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "eot": tok.eot_id}
        tok.write_files(out, prompt_prefix=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "output.weight" and model.config.tie_embeddings:
            continue  # transformers re-ties lm_head to the embeddings
        tensors[to_hf_key(name)] = tensor.detach().to("cpu", dtype).contiguous()
    save_safetensors(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf_config(model.config, special_ids, dtype), indent=2) + "\n")
    # No max_length: transformers warns on every call that also passes max_new_tokens; the context length is
    # config.json's max_position_embeddings.
    gen = {"_from_model_config": True, "do_sample": False}
    if special_ids:
        # Generation ends at the end of a document or of an assistant turn, as in `lillm chat`.
        eos = [i for i in (special_ids["eos"], special_ids["eot"]) if i is not None]
        gen.update(bos_token_id=special_ids["bos"], eos_token_id=eos if len(eos) > 1 else eos[0],
                   pad_token_id=special_ids["pad"])
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def config_from_hf(cfg: dict, source: str = "config.json") -> ModelConfig:
    """A ModelConfig from a transformers Llama config dict; refuses features lillm does not implement."""
    if cfg.get("model_type") != "llama":
        raise UserError(f"{source}: model_type is {cfg.get('model_type')!r}, lillm reads only 'llama' models")
    unsupported = []
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        unsupported.append("biases")
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={cfg['hidden_act']}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        unsupported.append(f"rope type {rope.get('rope_type', rope.get('type'))}")
    if unsupported:
        raise UserError(f"{source}: unsupported Llama features: {', '.join(unsupported)}")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads):
        raise UserError(f"{source}: head_dim={cfg['head_dim']} differs from hidden_size/num_attention_heads")
    try:
        return ModelConfig(
            vocab_size=cfg["vocab_size"],
            d_model=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads,
            ffn_hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            init_std=cfg.get("initializer_range", 0.02),
            **cfg.get("lillm", {}),
        )
    except KeyError as e:
        raise UserError(f"{source}: missing field {e.args[0]!r}") from None
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None


def import_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, **runtime: Any) -> LilLM:
    """Load a transformers Llama directory (config.json + safetensors) as a LilLM (`runtime`: its constructor's
    activation_checkpointing and packed_attention)."""
    path = Path(path)
    cfg_file = path / "config.json"
    cfg = read_json(cfg_file, f"{path}: no config.json, not a transformers model directory")
    config = config_from_hf(cfg, str(cfg_file))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no *.safetensors weights")
    hf_state: dict[str, torch.Tensor] = {}
    for f in files:
        hf_state.update(load_file(f))
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        try:
            state[from_hf_key(name)] = tensor.to(dtype)
        except KeyError:
            raise UserError(f"{path}: unexpected weight {name!r}") from None
    with torch.device("meta"):
        model = LilLM(config, **runtime)
    model = model.to_empty(device="cpu").to(dtype)
    model.tie_weights()
    if config.tie_embeddings:
        state.pop("output.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "output.weight" and config.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.reset_rope()
    return model

