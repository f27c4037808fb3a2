"""`lillm chat`: talk to a model in the terminal, with the chat format the model was fine-tuned on.

Each turn re-encodes the whole conversation with `Tokenizer.encode_chat` (the same ids training saw and
transformers' chat template gives), streams the reply token by token, and keeps it in the history. When
the conversation outgrows the context, the oldest exchanges are dropped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TextIO

from lillm.errors import UserError
from lillm.generate import SamplingConfig, stream_generate
from lillm.model import LilLM
from lillm.tokenizer import Tokenizer

HELP = """commands:
  /reset              forget the conversation (the system message stays)
  /system TEXT        set the system message and start over (/system alone removes it)
  /set NAME VALUE     sampling: temperature, top_k, top_p, max_new_tokens, seed
  /history            show the conversation so far
  /help               this text
  /exit               leave (Ctrl-D too); Ctrl-C stops a reply midway"""


def text_deltas(decode: Callable[[list[int]], str], tokens: Iterable[int]) -> Iterator[str]:
    """New text as tokens arrive. The whole reply is decoded each time, since a multi-byte character can
    span tokens; text ending in a partial character is held back until it completes."""
    ids: list[int] = []
    printed = ""
    for t in tokens:
        ids.append(t)
        text = decode(ids)
        if text.startswith(printed) and not text.endswith("\ufffd"):
            yield text[len(printed) :]
            printed = text
    text = decode(ids)
    if text != printed:
        yield text[len(printed) :] if text.startswith(printed) else text


class ChatSession:
    """A conversation with one model: history, system message, sampling settings."""

    def __init__(self, model: LilLM, tokenizer: Tokenizer, sampling: SamplingConfig, system: str = "") -> None:
        self.model, self.tok, self.sampling, self.system = model, tokenizer, sampling, system
        self.history: list[dict[str, str]] = []
        self.turns = 0

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def prompt_ids(self) -> list[int] | None:
        """The conversation as a generation prompt, dropping the oldest exchanges until it leaves room for a
        reply; None when even the latest message alone does not fit."""
        room = self.model.config.max_seq_len - min(self.sampling.max_new_tokens, self.model.config.max_seq_len // 2)
        while True:
            ids = self.tok.encode_chat(self.messages(), add_generation_prompt=True)
            if len(ids) <= room:
                return ids
            if len(self.history) <= 1:
                return None
            self.history = self.history[2:] if len(self.history) > 2 else self.history[1:]

    def reply(self, user: str) -> Iterator[str]:
        """Stream the reply to `user` as text pieces; the reply joins the history (also when interrupted)."""
        self.history.append({"role": "user", "content": user})
        ids = self.prompt_ids()
        if ids is None:
            self.history.pop()
            raise UserError(f"the message is too long for the model's context ({self.model.config.max_seq_len} "
                             "tokens, with room for the reply)")
        stop = {self.tok.eot_id, self.tok.eos_id}
        sampling = replace(self.sampling, seed=self.sampling.seed + self.turns)
        self.turns += 1
        reply: list[int] = []

        def tokens() -> Iterator[int]:
            for step in stream_generate(self.model, [ids], sampling, stop_ids=stop, pad_id=self.tok.pad_id or 0):
                t = step[0]
                if t is None or t in stop:
                    return
                reply.append(t)
                yield t

        try:
            yield from text_deltas(self.tok.decode, tokens())
        finally:
            self.history.append({"role": "assistant", "content": self.tok.decode(reply)})

    def command(self, line: str) -> str | None:
        """Handle a /command; returns what to print, or None to exit."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("exit", "quit"):
            return None
        if name == "reset":
            self.history = []
            return "(conversation cleared)"
        if name == "system":
            self.system, self.history = arg, []
            return f"(system message {'set' if arg else 'removed'}; conversation cleared)"
        if name == "history":
            return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages()) or "(empty)"
        if name == "set":
            key, _, value = arg.partition(" ")
            kinds = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int, "seed": int}
            if key not in kinds:
                return f"unknown setting {key!r}; one of {', '.join(kinds)}"
            try:
                self.sampling = replace(self.sampling, **{key: kinds[key](value)})
            except (ValueError, UserError) as e:
                return f"invalid value: {e}"
            return f"({key} = {getattr(self.sampling, key)})"
        if name == "help":
            return HELP
        return f"unknown command /{name}; /help lists them"


def run_chat(session: ChatSession, out: TextIO = sys.stdout, read: Callable[[str], str] = input) -> None:
    """The interactive loop: read a line, stream the reply, until /exit or end of input (Ctrl-D)."""
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            print(file=out)
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, like a shell
            print(file=out)
            continue
        except UnicodeDecodeError:  # a stream that decodes strictly: the line is lost, the conversation is not
            print("(that line was not UTF-8 text and was skipped)", file=out, flush=True)
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes kept as surrogates (a terminal in another encoding)
            line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            print("(bytes that are not UTF-8 were replaced with \ufffd)", file=out, flush=True)
        if not line:
            continue
        if line.startswith("/"):
            msg = session.command(line)
            if msg is None:
                return
            print(msg, file=out, flush=True)
            continue
        print("assistant> ", end="", file=out, flush=True)
        try:
            for piece in session.reply(line):
                print(piece, end="", file=out, flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="", file=out)
        except UserError as e:
            print(f"({e})", end="", file=out)
        print(file=out, flush=True)
