"""The `lillm` command. Each subcommand is a typed function; jsonargparse turns signature and docstring
into options and help text, and gives every subcommand `--config file.yaml` and `--print_config`."""

from __future__ import annotations

import sys
from typing import Literal

from lillm.errors import UserError


def generate(
    model: str,
    prompt: str | list[str],
    tokenizer: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    device: str = "auto",
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    stream: bool = True,
) -> None:
    """Generate text continuing one or more prompts.

    Args:
        model: An exported transformers directory, a training run directory or a checkpoint directory.
        prompt: Prompt text, or a JSON list of prompts for a batch (e.g. '["Once", "The"]').
        tokenizer: Tokenizer directory; default: the one stored with the model.
        max_new_tokens: Most tokens to generate per prompt.
        temperature: Softmax temperature; 0 decodes greedily.
        top_k: Sample among the k most likely tokens; 0 disables.
        top_p: Nucleus sampling threshold; 1 disables.
        seed: Seed of the sampler.
        device: 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.
        dtype: Compute dtype of the weights and the KV cache.
        stream: Print tokens as they come (single prompt only; batches print at the end).
    """
    from lillm.generate import SamplingConfig, stream_generate
    from lillm.loading import DTYPES, load_model, resolve_device
    from lillm.tokenizer import load_tokenizer

    prompt = [prompt] if isinstance(prompt, str) else prompt
    sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed)
    dev = resolve_device(device)
    net, tok = load_model(model)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    if tok is None:
        raise UserError(f"{model}: no tokenizer stored with the model; pass --tokenizer DIR")
    if tok.vocab_size > net.config.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model only {net.config.vocab_size}")
    net = net.to(dev, DTYPES[dtype])
    ids = [tok.prompt_ids(p) for p in prompt]
    stop = [i for i in (tok.eos_id, tok.eot_id) if i is not None]
    outs: list[list[int]] = [[] for _ in ids]
    printed = ""
    for step in stream_generate(net, ids, sampling, stop_ids=stop, pad_id=tok.pad_id or 0):
        for out, t in zip(outs, step):
            if t is not None:
                out.append(t)
        if stream and len(prompt) == 1:
            text = tok.decode(outs[0])
            if not printed:
                print(prompt[0], end="", flush=True)
            # Decode the whole continuation each time: a multi-byte character can span tokens.
            if text.startswith(printed) and not text.endswith("\ufffd"):
                print(text[len(printed) :], end="", flush=True)
                printed = text
    if stream and len(prompt) == 1:
        print(tok.decode(outs[0])[len(printed) :])
        return
    for p, out in zip(prompt, outs):
        print(f"--- {p!r}\n{p}{tok.decode(out)}")


COMMANDS = {"generate": generate}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lillm` console script."""
    from jsonargparse import CLI

    try:
        CLI(COMMANDS, args=argv, prog="lillm", description="lillm: train and use small Llama-3-style models.")
    except UserError as e:
        print(f"lillm: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("lillm: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
