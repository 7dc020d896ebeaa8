"""Mixtral's SentencePiece tokenizer (v1, shipped in mistral-common) for the plugins.

Two jobs: prompt ids for counting, by the one chat encoding the engine uses too
(mistral-common's request encoder, through :mod:`sluice.engine.tokenizer`), and a
byte table that turns token ids back into text one token at a time without ever
splitting a UTF-8 character. :func:`chat_messages` / :func:`chat_tools` turn the
contract's request into the OpenAI-shaped dicts every chat encoding takes.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import mistral_common
import sentencepiece

from sluice.engine.tokenizer import ChatEncodingError, SentencePieceTokenizer
from sluice.gateway.backends.contract import ChatMessage, GenerationRequest

TOKENIZER_PATH = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
BOS_ID = 1
EOS_ID = 2
_DUMMY_PREFIX = b" "  # SentencePiece's "▁" at the very start of a text
# Conversations counted through the cache: at most this many, each at most this many
# characters of content (so the cache holds at most ~16 M characters).
COUNT_CACHE_ENTRIES = 2048
COUNT_CACHE_MAX_CHARS = 8192


class MixtralTokenizer:
    """One loaded SentencePiece model; create one per backend instance and keep it."""

    def __init__(self, path: Path = TOKENIZER_PATH) -> None:
        self._chat = SentencePieceTokenizer(path)
        self._sp: sentencepiece.SentencePieceProcessor = self._chat.sp
        self._encode = self._sp.encode  # a bound method: skips an attribute lookup per call
        # Prompt counts by conversation: a chat is counted twice per request (admission,
        # then the backend), and clients resend the same system prompts and conversations.
        # The key holds every field the encoding reads, and the count is computed from the
        # key alone, so a hit is the count mistral-common gives for that conversation.
        self._count_key = lru_cache(maxsize=COUNT_CACHE_ENTRIES)(self._count_conversation)

    @cached_property
    def _bytes(self) -> list[bytes]:
        """Each token's UTF-8 bytes; built on first decode (~50 ms), counting never needs it."""
        return self._chat.token_bytes()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS (empty text: no tokens)."""
        return self._encode(text) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._sp.decode(list(ids)))

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt exactly as Mixtral sees it: mistral-common's chat encoding, or BOS + text.
        Raises engine.tokenizer.ChatEncodingError for a chat the format cannot encode."""
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        if request.messages is None:
            return [BOS_ID, *self.encode(request.prompt or "")]
        return self._chat.apply_chat_template(chat_messages(request.messages), chat_tools(request))

    def count_prompt(self, request: GenerationRequest) -> int:
        """Prompt tokens by the chat encoding; a conversation Mistral's format refuses (an
        upstream may well accept it: assistant first, system after assistant) is estimated
        as BOS plus each message's text, since a count must never fail a request."""
        messages = request.messages
        if messages is not None and not request.tools \
                and sum(len(m.content) for m in messages) <= COUNT_CACHE_MAX_CHARS:
            return self._count_key(tuple(
                (m.role, m.content, m.name, tuple((c.id, c.name, c.arguments) for c in m.tool_calls),
                 m.tool_call_id) for m in messages))
        try:
            return len(self.prompt_ids(request))
        except ChatEncodingError:
            return 1 + sum(len(self.encode(m.content)) for m in messages or ())

    def _count_conversation(self, key: tuple[tuple[Any, ...], ...]) -> int:
        """count_prompt of a tool-less chat from its cache key (the fields chat_messages reads)."""
        out: list[dict[str, Any]] = []
        for role, content, name, calls, call_id in key:
            d: dict[str, Any] = {"role": role, "content": content}
            if name is not None:
                d["name"] = name
            if calls:
                d["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                                   for i, n, a in calls]
            if call_id is not None:
                d["tool_call_id"] = call_id
            out.append(d)
        try:
            return len(self._chat.apply_chat_template(out, None))
        except ChatEncodingError:
            return 1 + sum(len(self.encode(content)) for _, content, *_ in key)

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


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI-shaped message dicts (text content, tool calls, tool results) for a chat encoding."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def chat_tools(request: GenerationRequest) -> list[dict[str, Any]] | None:
    """The request's function tools as OpenAI sends them (None: no tools)."""
    if not request.tools:
        return None
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": dict(t.parameters or {"type": "object", "properties": {}})}}
            for t in request.tools if t.type == "function"]
