"""Response bodies of /v1/chat/completions and /v1/completions, full and streamed."""

from __future__ import annotations

from typing import Any

from sluice.gateway.backends.contract import TokenLogprob, Usage


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


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
        ]
    }


def _text_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [dict(lp.top) for lp in items],
    }


class ChatFormat:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(
        self, index: int, text: str, finish: str | None, logprobs: list[TokenLogprob] | None
    ) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": _chat_logprobs(logprobs) if logprobs is not None else None,
            "finish_reason": finish,
        }

    def delta(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        logprobs: list[TokenLogprob] | None,
        first: bool,
    ) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {
            "index": index,
            "delta": delta,
            "logprobs": _chat_logprobs(logprobs) if logprobs is not None else None,
            "finish_reason": finish,
        }


class TextFormat:
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def choice(
        self, index: int, text: str, finish: str | None, logprobs: list[TokenLogprob] | None
    ) -> dict[str, Any]:
        return {
            "index": index,
            "text": text,
            "logprobs": _text_logprobs(logprobs) if logprobs is not None else None,
            "finish_reason": finish,
        }

    def delta(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        logprobs: list[TokenLogprob] | None,
        first: bool,
    ) -> dict[str, Any]:
        return self.choice(index, text or "", finish, logprobs)
