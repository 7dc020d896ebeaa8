"""Tokenizers (SentencePiece for Mixtral/Mistral, HF tokenizer.json for Llama 3),
chat templates, and incremental detokenization that never splits a UTF-8 character."""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sluice.engine.errors import ConfigError


def default_sentencepiece_model() -> Path:
    """Mixtral 8x7B's tokenizer.model, as shipped in mistral-common."""
    import mistral_common

    return Path(os.path.dirname(mistral_common.__file__)) / "data" / "tokenizer.model.v1"


def _role_content(message: Any) -> tuple[str, str]:
    if isinstance(message, dict):
        return message["role"], message["content"]
    if isinstance(message, tuple):
        return message[0], message[1]
    return message.role, message.content


class Tokenizer(abc.ABC):
    bos_id: int | None
    eos_ids: tuple[int, ...]

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abc.abstractmethod
    def token_text(self, token_id: int) -> str:
        """How one token reads on its own (for logprobs)."""

    @abc.abstractmethod
    def apply_chat_template(self, messages: Iterable[Any]) -> list[int]:
        """Prompt ids for a conversation, ready for the assistant's turn."""


class SentencePieceTokenizer(Tokenizer):
    """Mixtral/Mistral: ``<s>[INST] user [/INST] answer</s>[INST] next [/INST]``."""

    def __init__(self, path: str | Path | None = None) -> None:
        import sentencepiece

        path = Path(path) if path else default_sentencepiece_model()
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"{path}: cannot load SentencePiece model ({exc})") from None
        self.bos_id, self.eos_ids = self.sp.bos_id(), (self.sp.eos_id(),)
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos_id] if add_bos else []) + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_text(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id).replace("\u2581", " ")

    def apply_chat_template(self, messages: Iterable[Any]) -> list[int]:
        turns = [_role_content(m) for m in messages]
        system = "\n\n".join(c for r, c in turns if r in ("system", "developer"))
        ids = [self.bos_id]
        for role, content in turns:
            if role in ("system", "developer"):
                continue
            if role == "assistant":
                ids += self.sp.encode(content) + [self.eos_ids[0]]
                continue
            if system:  # no system role: it leads the first user turn, then a blank line
                content, system = f"{system}\n\n{content}", ""
            ids += self.sp.encode(f"[INST] {content} [/INST]")
        return ids


class HFTokenizer(Tokenizer):
    """tokenizer.json via `tokenizers`; Llama 3 header chat format."""

    def __init__(self, path: str | Path, bos_id: int | None = None, eos_ids: tuple[int, ...] = ()) -> None:
        from tokenizers import Tokenizer as Tok

        try:
            self.tok = Tok.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ConfigError(f"{path}: cannot load tokenizer.json ({exc})") from None
        begin = self.tok.token_to_id("<|begin_of_text|>")
        self.bos_id = bos_id if bos_id is not None else begin
        eot = self.tok.token_to_id("<|eot_id|>")
        self.eos_ids = tuple(dict.fromkeys([*eos_ids, *([eot] if eot is not None else [])]))
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: Iterable[Any]) -> list[int]:
        text = "".join(
            f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
            for role, content in map(_role_content, messages)
        )
        return self.encode(text + "<|start_header_id|>assistant<|end_header_id|>\n\n")


def load_tokenizer(model_dir: str | Path | None, bos_id: int | None = None,
                   eos_ids: tuple[int, ...] = ()) -> Tokenizer:
    """tokenizer.json, else tokenizer.model, in the checkpoint; else Mixtral's default."""
    d = Path(model_dir) if model_dir else None
    if d and (d / "tokenizer.json").exists():
        return HFTokenizer(d / "tokenizer.json", bos_id, eos_ids)
    if d and (d / "tokenizer.model").exists():
        return SentencePieceTokenizer(d / "tokenizer.model")
    return SentencePieceTokenizer()


class IncrementalDetokenizer:
    """Turns a growing id list into text deltas; holds back an incomplete character.

    Decodes a short window [prefix_offset:] and diffs it against [prefix_offset:read_offset],
    so leading-space rules of the tokenizer see the same context both times."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.read_offset = len(prompt_ids)
        self.prefix_offset = max(len(prompt_ids) - 5, 0)

    def step(self, ids: list[int]) -> str:
        prefix = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or a character is still incomplete
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return full[len(prefix):]
