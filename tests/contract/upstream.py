"""A recording OpenAI-compatible upstream for the contract suite.

A real HTTP server (Starlette under uvicorn, in a thread) that records every request it
gets (path, headers, body bytes) and answers like OpenAI does, per upstream model name:

    plain      text, usage with prompt/completion token details, system_fingerprint
    tools      two tool calls (streamed as id/name then argument fragments), finish tool_calls
    answer     after a tool message: text that quotes the tool's result
    refusal    a refusal (content null), finish stop
    reasoning  reasoning_content, then text
    truncated  a stream that stops mid-answer: no finish_reason, then [DONE]
    limited    429 with Retry-After and x-ratelimit-* headers
    embed      /embeddings: one vector per input, usage.prompt_tokens = 3 per input

Streamed or not as the request says; a streamed request gets a usage chunk only when it
asked for one (``stream_options.include_usage``), as OpenAI does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import free_port

FINGERPRINT = "fp_contract"
PROMPT_DETAILS = {"cached_tokens": 4, "audio_tokens": 0}
COMPLETION_DETAILS = {"reasoning_tokens": 2, "audio_tokens": 0,
                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
TOOL_CALLS = [
    {"id": "call_weather", "name": "get_weather", "arguments": ['{"city"', ': "Paris"}']},
    {"id": "call_time", "name": "get_time", "arguments": ['{"tz": ', '"CET"}']},
]
LIMIT_HEADERS = {"retry-after": "7", "x-ratelimit-limit-requests": "60",
                 "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "7s"}


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


def _deltas(model: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, int]:
    """The answer as a list of chat deltas, its finish_reason and completion tokens."""
    if model == "tools":
        deltas: list[dict[str, Any]] = []
        for i, call in enumerate(TOOL_CALLS):
            deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                           "function": {"name": call["name"],
                                                        "arguments": ""}}]})
            deltas += [{"tool_calls": [{"index": i, "function": {"arguments": piece}}]}
                       for piece in call["arguments"]]
        return deltas, "tool_calls", 9
    if model == "answer":
        tool = next(m for m in body["messages"] if m["role"] == "tool")
        return [{"content": "It is "}, {"content": tool["content"]}], "stop", 3
    if model == "refusal":
        return [{"refusal": "I can't help "}, {"refusal": "with that."}], "stop", 5
    if model == "reasoning":
        return ([{"reasoning_content": "Think "}, {"reasoning_content": "first."},
                 {"content": "Done."}], "stop", 4)
    if model == "truncated":
        return [{"content": "Once "}, {"content": "upon "}, {"content": "a"}], None, 3
    return [{"content": "Hello "}, {"content": "from "}, {"content": "upstream"}], "stop", 3


def _usage(completion: int) -> dict[str, Any]:
    return {"prompt_tokens": 11, "completion_tokens": completion,
            "total_tokens": 11 + completion, "prompt_tokens_details": PROMPT_DETAILS,
            "completion_tokens_details": COMPLETION_DETAILS}


def _message(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None,
                               "annotations": []}
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for key in ("content", "refusal", "reasoning_content"):
            if key in delta:
                message[key] = (message.get(key) or "") + delta[key]
        for piece in delta.get("tool_calls", ()):
            call = calls.setdefault(piece["index"], {"id": piece.get("id"), "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
            call["function"]["name"] += piece["function"].get("name", "")
            call["function"]["arguments"] += piece["function"].get("arguments", "")
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


class RecordingUpstream:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        app = Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/v1/embeddings", self._embeddings, methods=["POST"]),
        ])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> RecordingUpstream:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("recording upstream did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def last(self, path: str = "/v1/chat/completions") -> Recorded:
        return next(r for r in reversed(self.requests) if r.path == path)

    async def _record(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        self.requests.append(Recorded(request.url.path, dict(request.headers), body))
        return orjson.loads(body)

    async def _chat(self, request: Request) -> Response:
        body = await self._record(request)
        model = body["model"]
        if model == "limited":
            return _json({"error": {"message": "Rate limit reached for requests",
                                    "type": "requests", "param": None,
                                    "code": "rate_limit_exceeded"}}, 429, LIMIT_HEADERS)
        deltas, finish, completion = _deltas(model, body)
        head = {"id": "chatcmpl-up", "created": 1700000000, "model": model,
                "system_fingerprint": FINGERPRINT, "service_tier": "default"}
        if not body.get("stream"):
            choice = {"index": 0, "message": _message(deltas), "logprobs": None,
                      "finish_reason": finish}
            return _json({**head, "object": "chat.completion", "choices": [choice],
                          "usage": _usage(completion)})
        usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            chunk = {**head, "object": "chat.completion.chunk"}
            first = {"role": "assistant", "content": "", "refusal": None}
            yield _sse({**chunk, "choices": [{"index": 0, "delta": first,
                                              "logprobs": None, "finish_reason": None}]})
            for delta in deltas:
                await asyncio.sleep(0)
                yield _sse({**chunk, "choices": [{"index": 0, "delta": delta,
                                                  "logprobs": None, "finish_reason": None}]})
            if finish is not None:
                yield _sse({**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                  "finish_reason": finish}]})
                if usage:
                    yield _sse({**chunk, "choices": [], "usage": _usage(completion)})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _completions(self, request: Request) -> Response:
        body = await self._record(request)
        text = "Hello from upstream"
        answer = {"id": "cmpl-up", "object": "text_completion", "created": 1700000000,
                  "model": body["model"], "system_fingerprint": FINGERPRINT,
                  "choices": [{"index": 0, "text": text, "logprobs": None,
                               "finish_reason": "stop"}], "usage": _usage(3)}
        if not body.get("stream"):
            return _json(answer)

        async def events() -> AsyncIterator[bytes]:
            yield _sse({**answer, "usage": None})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield _sse({**answer, "choices": [], "usage": _usage(3)})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.25 * i, 0.5, -1.0]}
                for i in range(len(inputs))]
        return _json({"object": "list", "data": data, "model": body["model"],
                      "usage": {"prompt_tokens": 3 * len(inputs),
                                "total_tokens": 3 * len(inputs)}})


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"
