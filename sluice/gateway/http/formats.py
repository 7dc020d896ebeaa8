"""Response bodies of /v1/chat/completions and /v1/completions, full and streamed.

Everything a backend's events carry reaches the client in OpenAI's shape: text,
``tool_calls`` (streamed as index/id/name/argument fragments, or whole in a message),
``refusal``, ``reasoning_content``, logprobs, ``system_fingerprint``, the backend's own
``finish_reason`` and usage with its details. :class:`MessageParts` gathers a choice's
events for the non-streamed answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sluice.gateway.backends.contract import GenerationEvent, TokenLogprob, Usage


def usage_dict(usage: Usage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.prompt_tokens_details is not None:
        out["prompt_tokens_details"] = dict(usage.prompt_tokens_details)
    if usage.completion_tokens_details is not None:
        out["completion_tokens_details"] = dict(usage.completion_tokens_details)
    return out


def merge_details(usages: Iterable[Usage]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Sum the token details of several calls (``n`` fanned out), key by key."""
    merged: list[dict[str, Any] | None] = [None, None]
    for usage in usages:
        for i, details in enumerate((usage.prompt_tokens_details,
                                     usage.completion_tokens_details)):
            if details is None:
                continue
            into = merged[i] = merged[i] or {}
            for key, value in details.items():
                if isinstance(value, int) and isinstance(into.get(key, 0), int):
                    into[key] = into.get(key, 0) + value
                else:
                    into.setdefault(key, value)
    return merged[0], merged[1]


def _chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in lp.top
                ],
            }
            for lp in items
        ],
        "refusal": None,
    }


def _text_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [dict(lp.top) for lp in items],
    }


def _choice(index: int, field: str, value: Any, logprobs: list[TokenLogprob] | None,
            render: Callable[[list[TokenLogprob]], dict[str, Any]],
            finish: str | None) -> dict[str, Any]:
    """One choice of a response or chunk: ``field`` is message, delta or text."""
    return {"index": index, field: value,
            "logprobs": render(logprobs) if logprobs is not None else None,
            "finish_reason": finish}


class MessageParts:
    """What a chat choice's events add up to besides its text: tool calls assembled from
    their fragments, refusal and reasoning text, extra message fields, the fingerprint."""

    __slots__ = ("tool_calls", "refusal", "reasoning", "extra", "system_fingerprint",
                 "response_extra")

    def __init__(self) -> None:
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.refusal: list[str] = []
        self.reasoning: list[str] = []
        self.extra: dict[str, Any] = {}
        self.system_fingerprint: str | None = None
        self.response_extra: dict[str, Any] = {}

    def add(self, event: GenerationEvent) -> None:
        for piece in event.tool_calls:
            call = self.tool_calls.get(piece.index)
            if call is None:
                call = self.tool_calls[piece.index] = {
                    "id": piece.id, "type": piece.type or "function",
                    "function": {"name": piece.name or "", "arguments": ""},
                }
            else:
                if piece.id and not call["id"]:
                    call["id"] = piece.id
                if piece.name and not call["function"]["name"]:
                    call["function"]["name"] = piece.name
            call["function"]["arguments"] += piece.arguments
        if event.refusal:
            self.refusal.append(event.refusal)
        if event.reasoning:
            self.reasoning.append(event.reasoning)
        if event.extra:
            self.extra.update(event.extra)
        if event.system_fingerprint:
            self.system_fingerprint = event.system_fingerprint
        if event.response_extra:
            self.response_extra.update(event.response_extra)


def response_fields(parts: Iterable[MessageParts]) -> dict[str, Any]:
    """The answer's top-level fields besides id/object/created/model/choices/usage."""
    fields: dict[str, Any] = {"system_fingerprint": None}
    for p in parts:
        fields.update(p.response_extra)
        fields["system_fingerprint"] = fields["system_fingerprint"] or p.system_fingerprint
    return fields


class ChatFormat:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(
        self, index: int, text: str, finish: str | None, logprobs: list[TokenLogprob] | None,
        parts: MessageParts | None = None,
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if parts is not None:
            if parts.refusal:
                message["refusal"] = "".join(parts.refusal)
            if parts.tool_calls:
                message["tool_calls"] = [parts.tool_calls[i] for i in sorted(parts.tool_calls)]
                if not text:
                    message["content"] = None
            elif parts.refusal and not text:
                message["content"] = None
            if parts.reasoning:
                message["reasoning_content"] = "".join(parts.reasoning)
            for key, value in parts.extra.items():
                message.setdefault(key, value)
        return _choice(index, "message", message, logprobs, _chat_logprobs, finish)

    def delta(self, index: int, text: str | None, finish: str | None,
              logprobs: list[TokenLogprob] | None, first: bool,
              event: GenerationEvent | None = None) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if event is not None:
            if event.tool_calls:
                delta["tool_calls"] = [_tool_call_delta(piece) for piece in event.tool_calls]
            if event.refusal:
                delta["refusal"] = event.refusal
            if event.reasoning:
                delta["reasoning_content"] = event.reasoning
            if event.extra:
                for key, value in event.extra.items():
                    delta.setdefault(key, value)
        return _choice(index, "delta", delta, logprobs, _chat_logprobs, finish)


def _tool_call_delta(piece: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"index": piece.index}
    if piece.id is not None:
        out["id"] = piece.id
        out["type"] = piece.type or "function"
    function: dict[str, Any] = {}
    if piece.name is not None:
        function["name"] = piece.name
    function["arguments"] = piece.arguments
    out["function"] = function
    return out


def has_content(event: GenerationEvent) -> bool:
    """Whether an event has anything for the client besides text."""
    return bool(event.tool_calls or event.refusal or event.reasoning or event.extra)


class TextFormat:
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def choice(
        self, index: int, text: str, finish: str | None, logprobs: list[TokenLogprob] | None,
        parts: MessageParts | None = None,
    ) -> dict[str, Any]:
        return _choice(index, "text", text, logprobs, _text_logprobs, finish)

    def delta(self, index: int, text: str | None, finish: str | None,
              logprobs: list[TokenLogprob] | None, first: bool,
              event: GenerationEvent | None = None) -> dict[str, Any]:
        return self.choice(index, text or "", finish, logprobs)
