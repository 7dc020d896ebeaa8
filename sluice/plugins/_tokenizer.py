"""Mixtral's SentencePiece tokenizer (v1, shipped in mistral-common) for the plugins.

Two jobs: the Mixtral instruct prompt format for counting prompt tokens, and a
byte table that turns token ids back into text one token at a time without ever
splitting a UTF-8 character.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path

import mistral_common
import sentencepiece

from sluice.gateway.backends.contract import ChatMessage, GenerationRequest

TOKENIZER_PATH = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
BOS_ID = 1
EOS_ID = 2
_DUMMY_PREFIX = b" "  # SentencePiece's "▁" at the very start of a text


class MixtralTokenizer:
    """One loaded SentencePiece model; create one per backend instance and keep it."""

    def __init__(self, path: Path = TOKENIZER_PATH) -> None:
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self._encode = self._sp.encode  # a bound method: skips an attribute lookup per call

    @cached_property
    def _bytes(self) -> list[bytes]:
        """Each token's UTF-8 bytes; built on first decode (~50 ms), counting never needs it."""
        return [self._piece_bytes(i) for i in range(self._sp.vocab_size())]

    def _piece_bytes(self, token_id: int) -> bytes:
        sp = self._sp
        if sp.is_control(token_id) or sp.is_unknown(token_id):
            return b""
        piece = sp.id_to_piece(token_id)
        if sp.is_byte(token_id):  # "<0xF0>": one raw byte of a UTF-8 sequence
            return bytes((int(piece[3:5], 16),))
        return piece.replace("\u2581", " ").encode()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS (empty text: no tokens)."""
        return self._encode(text) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._sp.decode(list(ids)))

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt exactly as Mixtral sees it: instruct format (chat) or BOS + text."""
        if request.messages is None:
            return [BOS_ID, *self.encode(request.prompt or "")]
        ids = [BOS_ID]
        for role, content in _turns(request.messages):
            if role == "user":
                ids += self._encode(f"[INST] {content} [/INST]")
            else:
                ids += self.encode(content)
                ids.append(EOS_ID)
        return ids

    def count_prompt(self, request: GenerationRequest) -> int:
        return len(self.prompt_ids(request))

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def stream_text(self, ids: Sequence[int]) -> Iterator[tuple[str, int]]:
        """Yield ``(text, n_tokens)`` pieces whose concatenation is ``decode(ids)``.

        A piece holds one token, or several when byte-fallback tokens only
        complete a UTF-8 character together (an emoji can be four tokens).
        Bytes left incomplete at the end become one U+FFFD each, as in
        SentencePiece's own decode.
        """
        decoder = codecs.getincrementaldecoder("utf-8")()
        table = self._bytes
        pending = 0
        for i, token_id in enumerate(ids):
            raw = table[token_id]
            if i == 0 and raw.startswith(_DUMMY_PREFIX):
                raw = raw[1:]
            text = decoder.decode(raw)
            pending += 1
            if text:
                yield text, pending
                pending = 0
        leftover, _ = decoder.getstate()
        if pending:
            yield "\ufffd" * len(leftover), pending


def _turns(messages: Sequence[ChatMessage]) -> list[tuple[str, str]]:
    """Fold a chat into alternating user/assistant turns.

    System (and developer) text goes before the first user message, separated
    by a blank line; tool results count as user text; consecutive messages of
    the same side are joined by a blank line.
    """
    system = [m.content for m in messages if m.role in ("system", "developer")]
    turns: list[tuple[str, str]] = []
    for m in messages:
        if m.role in ("system", "developer"):
            continue
        role = "assistant" if m.role == "assistant" else "user"
        if turns and turns[-1][0] == role:
            turns[-1] = (role, f"{turns[-1][1]}\n\n{m.content}")
        else:
            turns.append((role, m.content))
    if system:
        prefix = "\n\n".join(system)
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first_user is None:
            turns.insert(0, ("user", prefix))
        else:
            turns[first_user] = ("user", f"{prefix}\n\n{turns[first_user][1]}")
    return turns
