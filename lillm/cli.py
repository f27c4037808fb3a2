"""The `lillm` command. Most subcommands are typed functions: jsonargparse turns signature and docstring into
options and help text, and gives each `--config file.yaml` and `--print_config`. pretrain, sft and dpo are
the training entry points' own parsers, registered as subcommands (`build_parser`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from lillm.errors import UserError, run_command


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
    force_tokenizer: bool = False,
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
        force_tokenizer: Use --tokenizer even when it is not the tokenizer the model was trained with.
    """
    from lillm.chat import text_deltas
    from lillm.generate import SamplingConfig, stream_generate

    prompt = [prompt] if isinstance(prompt, str) else prompt
    sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed)
    net, tok = _load_for_inference(model, tokenizer, device, dtype, force_tokenizer)
    ids = [tok.prompt_ids(p) for p in prompt]
    stop = [i for i in (tok.eos_id, tok.eot_id) if i is not None]
    steps = stream_generate(net, ids, sampling, stop_ids=stop, pad_id=tok.pad_id or 0)
    if stream and len(prompt) == 1:
        print(prompt[0], end="", flush=True)
        for piece in text_deltas(tok.decode, (s[0] for s in steps if s[0] is not None)):
            print(piece, end="", flush=True)
        print()
        return
    outs: list[list[int]] = [[] for _ in ids]
    for step in steps:
        for out, t in zip(outs, step):
            if t is not None:
                out.append(t)
    for p, out in zip(prompt, outs):
        print(f"--- {p!r}\n{p}{tok.decode(out)}")


def _load_for_inference(model: str, tokenizer: str | None, device: str, dtype: str, force_tokenizer: bool):
    from lillm.loading import DTYPES, load_model, resolve_device, stored_tokenizer, trained_tokenizer_fingerprint
    from lillm.tokenizer import load_tokenizer

    dev = resolve_device(device)
    given = load_tokenizer(tokenizer) if tokenizer is not None else None
    if given is not None and not force_tokenizer:  # checked before the weights are read
        own = stored_tokenizer(model)
        if own is not None:
            same = given.encoding_fingerprint == own.encoding_fingerprint
        else:  # a run without its tokenizer directory: its checkpoint still names the fingerprint
            same = trained_tokenizer_fingerprint(model) in (None, given.fingerprint)
        if not same:
            raise UserError(f"{tokenizer}: not the tokenizer {model} was trained with (its token ids would "
                            "mean other text); pass --force_tokenizer true to use it anyway")
    net, tok = load_model(model)
    tok = given if given is not None else tok
    if tok is None:
        raise UserError(f"{model}: no tokenizer stored with the model; pass --tokenizer DIR")
    if tok.vocab_size > net.config.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model only {net.config.vocab_size}")
    return net.to(dev, DTYPES[dtype]).eval(), tok


def chat(
    model: str,
    system: str = "",
    tokenizer: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int = 0,
    device: str = "auto",
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    force_tokenizer: bool = False,
) -> None:
    """Chat with a fine-tuned model in the terminal (type /help for commands, Ctrl-D to leave).

    Args:
        model: An exported transformers directory, a training run directory or a checkpoint directory.
        system: System message that opens the conversation (change it with /system).
        tokenizer: Tokenizer directory; default: the one stored with the model.
        max_new_tokens: Most tokens per reply.
        temperature: Softmax temperature; 0 answers greedily.
        top_k: Sample among the k most likely tokens; 0 disables.
        top_p: Nucleus sampling threshold; 1 disables.
        seed: Seed of the sampler (turn n uses seed + n).
        device: 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.
        dtype: Compute dtype of the weights and the KV cache.
        force_tokenizer: Use --tokenizer even when it is not the tokenizer the model was trained with.
    """
    from lillm.chat import ChatSession, run_chat
    from lillm.generate import SamplingConfig

    sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed)
    net, tok = _load_for_inference(model, tokenizer, device, dtype, force_tokenizer)
    if not tok.has_chat_tokens:
        raise UserError(f"{model}: the tokenizer lacks the chat tokens; this is not a chat model")
    print(f"lillm chat with {model} ({net.num_params():,} parameters). /help for commands, Ctrl-D to leave.",
          flush=True)
    run_chat(ChatSession(net, tok, sampling, system))


def train_tokenizer(
    source: str,
    out: str,
    vocab_size: int = 8192,
    sample_every: int = 1,
    max_documents: int | None = None,
    min_frequency: int = 2,
    text_field: str = "text",
    hf_config: str | None = None,
    split: str = "train",
    errors: Literal["replace", "strict"] = "replace",
) -> None:
    """Train a byte-level BPE tokenizer with lillm's special tokens and chat template.

    Args:
        source: 'pydoc' or 'stdlib' (built-in corpora), 'hf:NAME' (a Hugging Face dataset), or a file, folder or glob.
        out: Directory to write (tokenizer.json and the files transformers' AutoTokenizer reads).
        vocab_size: Vocabulary size, special tokens included.
        sample_every: Train on every n-th document only (the reference used 0.1% of OpenWebText: 1000).
        max_documents: Stop after this many (sampled) documents.
        min_frequency: Merge only pairs seen at least this often.
        text_field: Field or column holding the text (JSON, parquet, datasets).
        hf_config: Dataset configuration for hf: sources.
        split: Split for hf: sources and saved datasets.
        errors: Undecodable bytes: 'replace' and count, or 'strict' to stop.
    """
    from tqdm import tqdm

    from lillm.data.sources import iter_texts, open_source
    from lillm.tokenizer import train_tokenizer as train

    if sample_every < 1:
        raise UserError(f"sample_every must be >= 1, got {sample_every}")
    if min_frequency < 1:
        raise UserError(f"min_frequency must be >= 1, got {min_frequency}")
    if os.path.exists(out) and not os.path.isdir(out):  # refused before minutes of reading, not after
        raise UserError(f"{out}: exists and is not a directory (out names the tokenizer's folder)")
    src = open_source(source, text_field=text_field, hf_config=hf_config, split=split, errors=errors)
    texts = tqdm(iter_texts(src, limit=max_documents, every=sample_every), desc="train-tokenizer: reading",
                 unit=" docs", total=max_documents, file=sys.stderr, mininterval=1.0, disable=None)
    counted = _Counted(texts, source)
    tok = train(counted, vocab_size=vocab_size, min_frequency=min_frequency, progress=False)
    texts.close()
    tok.save(out)
    n, read = counted.n, src.stats["documents"]
    print(f"saved a {tok.vocab_size}-token tokenizer to {out} (fingerprint {tok.fingerprint[:12]}, "
          f"{n:,} documents" + (f" of {read:,} read" if read != n else "") + f"{_skipped(src.stats)})")


def _skipped(stats: dict[str, int]) -> str:
    """What a source left out or changed, for a command's last line ("" when nothing)."""
    notes = [f"{stats['empty_files']} empty file(s) skipped" if stats.get("empty_files") else "",
             f"{stats['replaced_documents']} document(s) with undecodable bytes replaced"
             if stats.get("replaced_documents") else ""]
    return "".join(f"; {n}" for n in notes if n)


class _Counted:
    """The documents a tokenizer trains on, counted (a bar on a terminal counts too, but only there); none at
    all is refused naming the source."""

    def __init__(self, texts, source: str) -> None:
        self.texts, self.source, self.n = texts, source, 0

    def __iter__(self):
        for t in self.texts:
            self.n += 1
            yield t
        if self.n == 0:
            raise UserError(f"source {self.source!r} holds no documents")


def prepare(
    source: str,
    tokenizer: str,
    out: str,
    shard_tokens: int = 1 << 26,
    val_fraction: float = 0.005,
    num_workers: int = 0,
    overwrite: bool = False,
    text_field: str = "text",
    hf_config: str | None = None,
    split: str = "train",
    streaming: bool = True,
    errors: Literal["replace", "strict"] = "replace",
) -> None:
    """Tokenize a text source into binary token shards with a manifest, in parallel.

    Args:
        source: 'pydoc' or 'stdlib' (built-in corpora), 'hf:NAME' (a Hugging Face dataset), or a file, folder or glob.
        tokenizer: Tokenizer directory (from `lillm train-tokenizer`).
        out: Output directory for the shards, manifest.json and a copy of the tokenizer.
        shard_tokens: Tokens per shard file (the last one of each split is shorter).
        val_fraction: Fraction of documents (chosen by a hash of their text) for the validation split.
        num_workers: 0: one process, the tokenizer's thread pool on every core (fastest on small machines);
            N >= 2: N worker processes (when Python-side work is the bottleneck on many cores); 1: serial.
        overwrite: Replace shards made with other settings (the old ones stay valid until the new manifest).
        text_field: Field or column holding the text (JSON, parquet, datasets).
        hf_config: Dataset configuration for hf: sources.
        split: Split for hf: sources and saved datasets.
        streaming: Stream hf: sources instead of downloading them first.
        errors: Undecodable bytes: 'replace' and count, or 'strict' to stop.
    """
    from lillm.data.prepare import prepare as run
    from lillm.data.sources import open_source

    src = open_source(source, text_field=text_field, hf_config=hf_config, split=split, streaming=streaming,
                      errors=errors)
    run(src, tokenizer, out, shard_tokens=shard_tokens, val_fraction=val_fraction, num_workers=num_workers,
        overwrite=overwrite)


def shards(data: str, verify: bool = False) -> None:
    """Summarize a prepared data directory; with --verify, check every shard's size and sha256.

    Args:
        data: A directory written by `lillm prepare`.
        verify: Recompute each shard's sha256 and compare with the manifest.
    """
    from lillm.data.prepare import verify as check

    m = check(data, checksums=verify)
    for name, split in m["splits"].items():
        tokens = sum(s["tokens"] for s in split["shards"])
        docs = sum(s["documents"] for s in split["shards"])
        print(f"{name}: {len(split['shards'])} shard(s), {tokens:,} tokens, {docs:,} documents")
    source = m.get("source") if isinstance(m.get("source"), dict) else {}
    print(f"dtype {m['dtype']}, vocab {m['tokenizer']['vocab_size']}, source {source.get('spec', 'unknown')}")
    if verify:
        print("all shards verified")


def export(
    checkpoint: str,
    out: str,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
) -> None:
    """Consolidate a ZeRO checkpoint into a transformers (Llama) directory with the tokenizer.

    Args:
        checkpoint: A training run directory (its latest checkpoint), a checkpoints directory or a tag directory.
        out: Directory to write config.json, model.safetensors, generation_config.json and the tokenizer.
        dtype: Dtype of the written weights (consolidation itself is in fp32).
    """
    from lillm.hf import export_hf
    from lillm.loading import DTYPES, load_model_from_checkpoint
    from lillm.runs import resolve_checkpoint

    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"{out}: File exists (and is not a directory)")
    tag_dir = resolve_checkpoint(checkpoint)
    if tag_dir is None:
        raise UserError(f"{checkpoint}: no checkpoint found")
    model, tok = load_model_from_checkpoint(tag_dir)
    if tok is None:
        raise UserError(f"{checkpoint}: the run directory holds no tokenizer/")
    export_hf(model, Path(out), tokenizer_dir=tok, dtype=DTYPES[dtype])
    print(f"exported {tag_dir} ({model.num_params():,} parameters) to {out}")


def checkpoint(path: str, convert_universal: bool = False) -> None:
    """Inspect a training checkpoint; optionally convert it to DeepSpeed's universal format.

    Args:
        path: A run directory, a checkpoints directory or a tag directory.
        convert_universal: Write TAG_universal next to it, loadable at any world size.
    """
    import json

    from lillm.runs import TAG_RE, check_checkpoint, read_meta, resolve_checkpoint
    from lillm.train.checkpoint import convert_to_universal

    tag_dir = resolve_checkpoint(path)
    if tag_dir is None:
        raise UserError(f"{path}: no checkpoint found")
    check_checkpoint(tag_dir)
    meta = read_meta(tag_dir)
    tags = sorted(d.name for d in tag_dir.parent.iterdir() if d.is_dir() and TAG_RE.match(d.name))
    print(f"checkpoint {tag_dir}\n  step {meta['step']}, saved by {meta['world_size']} rank(s)")
    print(f"  tokenizer fingerprint {meta['tokenizer_fingerprint'][:12]}")
    print(f"  model {json.dumps(meta['model_config'])}")
    print(f"  tags in {tag_dir.parent}: {', '.join(tags)}")
    if convert_universal:
        print(f"  universal: {convert_to_universal(tag_dir)}")


def evaluate(
    model: str,
    tasks: str = "bpb:pydoc,pydoc-continuation",
    limit: int | None = None,
    batch_size: int = 16,
    split: str | None = None,
    hf_config: str | None = None,
    out: str | None = None,
    tokenizer: str | None = None,
    device: str = "auto",
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    force_tokenizer: bool = False,
) -> None:
    """Score a model: bits per byte on text and accuracy on multiple-choice and cloze tasks.

    Tasks (comma-separated, each KIND or KIND:SOURCE; SOURCE a local .jsonl/.json/.parquet file or folder,
    or hf:NAME): bpb:SOURCE (bits per byte; SOURCE may be pydoc or stdlib); hellaswag, arc_easy,
    arc_challenge, piqa (multiple choice: acc and acc_norm as lm-evaluation-harness reports them); lambada
    (last-word accuracy and perplexity); pydoc-continuation, stdlib-continuation (built in, offline: a
    held-out passage's true continuation among 4). Without a SOURCE a downstream task reads its Hub dataset.

    Args:
        model: An exported transformers directory, a training run directory or a checkpoint directory.
        tasks: Comma-separated task specs (see above).
        limit: Score at most this many items per task (documents for bpb).
        batch_size: Sequences per forward pass.
        split: Split to read (default: each task's usual split; train for local files).
        hf_config: Dataset configuration for hf: sources (default: each task's usual one).
        out: Write the results as JSON to this file and as a markdown table next to it (.md).
        tokenizer: Tokenizer directory; default: the one stored with the model.
        device: 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.
        dtype: Compute dtype of the weights.
        force_tokenizer: Use --tokenizer even when it is not the tokenizer the model was trained with.
    """
    from lillm.evals.harness import Scorer, prepare_task
    from lillm.evals.report import evaluate as run
    from lillm.evals.report import markdown, write_report
    from lillm.evals.tasks import parse_task

    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if out is not None and Path(out).is_dir():
        raise UserError(f"{out}: is a directory (--out names the JSON file to write)")
    specs = [parse_task(t.strip(), split, hf_config) for t in tasks.split(",") if t.strip()]
    if not specs:
        raise UserError("no tasks given (--tasks)")
    net, tok = _load_for_inference(model, tokenizer, device, dtype, force_tokenizer)
    max_len = net.config.max_seq_len
    prepared = [prepare_task(t, tok, max_len, limit) for t in specs]
    scorer = Scorer(net, tok, max_len, net.config.vocab_size, batch_size, next(net.parameters()).device)
    results = run(scorer, prepared, show_progress=True)
    print(markdown(results))
    if out is not None:
        about = {"model": str(model), "parameters": net.num_params(), "dtype": dtype, "limit": limit}
        print("wrote " + " and ".join(str(p) for p in write_report(results, out, about)))


COMMANDS = {"generate": generate, "chat": chat, "train-tokenizer": train_tokenizer, "prepare": prepare,
            "shards": shards, "export": export, "checkpoint": checkpoint, "eval": evaluate}
TRAINING = ("pretrain", "sft", "dpo")
"""Subcommands whose parsers are the training entry points' own (`lillm.train.pretrain.build_parser`,
`lillm.train.posttrain.build_parser`): the same options as launch/pretrain.py, sft.py and dpo.py."""


def build_parser():
    """`lillm`'s parser: a subcommand per function in COMMANDS (options from its signature, help from its
    docstring, and `--config file.yaml` / `--print_config`) and the training parsers as pretrain, sft, dpo."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lillm.files import use_strict_yaml

    use_strict_yaml()
    parser = ArgumentParser(prog="lillm", description="lillm: train and use small Llama-3-style models.",
                            exit_on_error=False)
    subcommands = parser.add_subcommands(required=True)
    for name, function in COMMANDS.items():
        summary = function.__doc__.strip().splitlines()[0]
        sub = ArgumentParser(description=summary, exit_on_error=False)
        sub.add_argument("--config", action=ActionConfigFile, help="Path to a configuration file.")
        sub.add_function_arguments(function, as_group=False, as_positional=True, fail_untyped=True,
                                   sub_configs=True)
        subcommands.add_subcommand(name, sub, help=summary)
    for name in TRAINING:
        sub = training_parser(name)
        subcommands.add_subcommand(name, sub, help=sub.description)
    return parser


def training_parser(name: str):
    from lillm.train import posttrain, pretrain

    return pretrain.build_parser() if name == "pretrain" else posttrain.build_parser(name)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lillm` console script: parse, then run the subcommand through
    `lillm.errors.run_command` (training ones tear their process group down on the way out)."""
    from lillm.train.dist import run_training
    from lillm.train.ops import name_cpu_accelerator

    name_cpu_accelerator()

    args = sys.argv[1:] if argv is None else list(argv)
    command = args[0] if args and (args[0] in COMMANDS or args[0] in TRAINING) else None
    if command in TRAINING:
        run_training("lillm " + command, lambda: _run_training(command, args))
    run_command("lillm", lambda: _run(args, command))


def _parse(parser, args: list[str], command: str | None):
    """Parse `args`; a parse error becomes one line and where to look, not the whole usage."""
    from jsonargparse import ArgumentError

    from lillm.train.config import resolve_shipped

    try:
        return parser.parse_args(resolve_shipped(args, shipped=command in TRAINING))
    except ArgumentError as e:
        raise UserError(f"{' '.join(str(e).split())} (see lillm {command + ' ' if command else ''}--help)") from None


def _run(args: list[str], command: str | None) -> None:
    parser = build_parser()
    ns = _parse(parser, args, command)
    init = parser.instantiate_classes(ns)
    name = init.subcommand
    kwargs = {k: v for k, v in init[name].items() if k != "config"}
    COMMANDS[name](**kwargs)


def _run_training(command: str, args: list[str]) -> None:
    """Parse with the whole `lillm` parser (so `lillm --help` and errors agree), then build and fit the run from
    the training parser's part of the namespace, as the entry point's own main does."""
    from lillm.train import posttrain, pretrain
    from lillm.train.config import instantiate

    parser = build_parser()
    ns = _parse(parser, args, command)
    parsed = instantiate(training_parser(command), ns[command])
    if command == "pretrain":
        pretrain.build(*pretrain.run_config(*parsed)).fit()
    else:
        posttrain.build(*posttrain.run_config(command, *parsed), command).fit()


if __name__ == "__main__":
    main()
