"""Byte-level BPE tokenizer: training, special tokens, the chat format, and a transformers-loadable save.

Document policy: pretraining documents are stored as `tokens(doc) + [<|end_of_text|>]`, no BOS. The
end-of-text token therefore also marks the start of the next document, and `prompt_ids` puts one in front
of a generation prompt so the model sees a prompt the way it saw a document start in training.
`<|begin_of_text|>` opens chat conversations (the Llama-3 format) and is not used in pretraining.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lillm.errors import UserError
from lillm.files import staged_dir

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, START_HEADER, END_HEADER, EOT]
CHAT_ROLES = ("system", "user", "assistant")

# The chat format, defined here once: bos, then per message
#   <|start_header_id|>ROLE<|end_header_id|>CONTENT<|eot_id|>
# and, to ask for a reply, <|start_header_id|>assistant<|end_header_id|>. Llama 3 puts "\n\n" after the
# header; lillm does not, on purpose. Byte-level BPE encodes "\n\n" alone as one merged token but
# "\n\nHello" as "\n", "\n", "Hello", so a generation prompt ending in "\n\n" would not be a token prefix
# of the conversations the model was trained on. With the content right after a special token, the prompt
# is an exact prefix of every training conversation, and every piece is tokenized on its own.
#
# The Jinja rendering below, for transformers' apply_chat_template: tokenizing the rendered string splits
# at the special tokens, so the ids equal `Tokenizer.encode_chat` exactly (tested).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>' }}{% endif %}"
)


class Tokenizer:
    """lillm's handle on a `tokenizers.Tokenizer`: special ids, encoding, decoding, chat format, save."""

    def __init__(self, tok: HFTokenizer, source: str = "<memory>") -> None:
        self.tok = tok
        ids = {}
        for name, token in (("bos", BOS), ("eos", EOS), ("pad", PAD), ("start_header", START_HEADER),
                            ("end_header", END_HEADER), ("eot", EOT)):
            ids[name] = tok.token_to_id(token)
        missing = [t for t, i in zip(SPECIAL_TOKENS, ids.values()) if i is None]
        if missing and ids["eos"] is None:
            raise UserError(f"{source}: tokenizer lacks lillm's special token {EOS}")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.start_header_id, self.end_header_id, self.eot_id = ids["start_header"], ids["end_header"], ids["eot"]
        self.has_chat_tokens = not missing

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer: equal fingerprints encode identically."""
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()

    @property
    def encoding_fingerprint(self) -> str:
        """sha256 of everything but the post-processor (which only adds special tokens lillm never asks for):
        a run's tokenizer and its export's (which prepends <|end_of_text|>) share it."""
        data = json.loads(self.tok.to_str())
        data.pop("post_processor", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def token_bytes(self, size: int | None = None) -> list[int]:
        """UTF-8 bytes each token id stands for, by id (`size` entries, default the vocabulary): the
        denominator of bits per byte. Byte-level BPE (every lillm tokenizer) spells every token in a
        256-character alphabet, one character per byte, so a token's byte count is its length; special tokens
        and ids past the vocabulary decode to no text and count 0."""
        counts = [0] * (size or self.vocab_size)
        added = self.tok.get_added_tokens_decoder()
        byte_level = json.loads(self.tok.to_str()).get("decoder", {}).get("type") == "ByteLevel"
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            if i >= len(counts) or (i in added and added[i].special):
                continue
            if i in added:  # a plain added token is its own text
                counts[i] = len(added[i].content.encode())
            else:  # another tokenizer's vocabulary: what the id decodes to alone
                counts[i] = len(token) if byte_level else len(self.tok.decode([i]).encode())
        return counts

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The _fast variant skips character offsets: the same ids, about 1.6x the speed per core.
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def prompt_ids(self, text: str) -> list[int]:
        """A pretraining-style prompt: documents start after an end-of-text token (see module docstring)."""
        return [self.eos_id, *self.encode(text)]

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """Chat ids: bos, then per message header(role) + content + eot (see CHAT_TEMPLATE)."""
        if not self.has_chat_tokens:
            raise UserError("this tokenizer lacks the chat special tokens; train one with `lillm train-tokenizer`")
        ids = [self.bos_id]
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if role not in CHAT_ROLES:
                raise UserError(f"message {i}: unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
            if not isinstance(content, str):
                raise UserError(f"message {i}: content must be a string, got {type(content).__name__}")
            ids += [self.start_header_id, *self.encode(role), self.end_header_id, *self.encode(content), self.eot_id]
        if add_generation_prompt:
            ids += [self.start_header_id, *self.encode("assistant"), self.end_header_id]
        return ids

    def assistant_spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """[start, end) of every assistant reply in chat ids: its content and its end-of-turn token.

        Found from the token ids alone (header tokens and the role's ids), never from string offsets, so
        the training loss mask is exactly the tokens the model must produce after a generation prompt.
        A reply cut off by truncation runs to the end of `ids`.
        """
        assistant = self.encode("assistant")
        spans, i, n = [], 0, len(ids)
        while i < n:
            if ids[i] != self.start_header_id:
                i += 1
                continue
            try:
                j = ids.index(self.end_header_id, i + 1)
            except ValueError:
                break  # a header cut off by truncation: no content follows
            try:
                k = ids.index(self.eot_id, j + 1) + 1
            except ValueError:
                k = n
            if list(ids[i + 1 : j]) == assistant:
                spans.append((j + 1, k))
            i = k
        return spans

    def save(self, out_dir: str | os.PathLike, prompt_prefix: bool = False) -> Path:
        """Write tokenizer.json and the files `transformers.AutoTokenizer.from_pretrained` reads.

        prompt_prefix (for exports): transformers' `tokenizer(text)` then puts <|end_of_text|> in front of a
        text, as `prompt_ids` does, so a prompt gets the same ids, and the same continuation, in both. lillm
        itself never adds special tokens when encoding, so this changes nothing for lillm.
        """
        out = Path(out_dir)
        with staged_dir(out) as staged:  # written whole or not at all (a full disk leaves no truncated file)
            self.write_files(staged, prompt_prefix)
        return out

    def write_files(self, out: Path, prompt_prefix: bool = False) -> None:
        """`save`'s files, written straight into the existing directory `out` (one being staged already)."""
        data = json.loads(self.tok.to_str())
        if prompt_prefix:
            prefix = processors.TemplateProcessing(single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B:1",
                                                   special_tokens=[(EOS, self.eos_id)])
            steps = [data["post_processor"]] if data.get("post_processor") else []
            if steps and steps[0].get("type") == "Sequence":  # an export's own: keep what is under its prefix
                steps = [p for p in steps[0]["processors"] if p.get("type") != "TemplateProcessing"]
            data["post_processor"] = {"type": "Sequence", "processors": [*steps, json.loads(prefix.__getstate__())]}
        (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            "chat_template": CHAT_TEMPLATE,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a directory holding tokenizer.json (or the file itself)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no tokenizer.json found")
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
        raise UserError(f"{file}: not a valid tokenizer file ({e})") from None
    return Tokenizer(tok, str(file))


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2, progress: bool = True,
    length: int | None = None,
) -> Tokenizer:
    """Train byte-level BPE on `texts`. The same texts in the same order give the same tokenizer."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise UserError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 263")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return Tokenizer(tok)
