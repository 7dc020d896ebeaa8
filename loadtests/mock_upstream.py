"""A minimal, fast OpenAI-compatible server for benchmarks and tests.

    python -m loadtests.mock_upstream --port 9100 [--tokens 16]

Raw asyncio (uvloop when installed) speaking just enough HTTP/1.1 (keep-alive,
Content-Length bodies): ``POST /v1/chat/completions`` and ``POST /v1/completions``,
streaming or not, with ``usage``; ``GET /v1/models``. Responses are built once
per distinct request shape and cached, so the server is never the bottleneck of
a gateway benchmark.

Every answer is ``--tokens`` words (fewer with ``max_tokens``, finish "length"),
streamed one word per chunk. ``prompt_tokens`` is 1 + the number of
whitespace-separated words in the prompt: deliberately not a real tokenizer, so
tests can tell the upstream's usage from a local count.

Fault injection through the model name:
``status-<code>`` answers that HTTP status with an OpenAI error body,
``sleep-<ms>`` waits before answering, ``cut-<n>`` drops the connection after
n stream chunks, ``nousage`` streams without a usage chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any, cast

import orjson

WORDS = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "keeps",
         "running", "far", "away"]
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 429: b"Too Many Requests",
            500: b"Internal Server Error", 503: b"Service Unavailable"}


class MockApp:
    """Request -> response bytes, cached by request shape."""

    def __init__(self, tokens: int = 16) -> None:
        self.tokens = tokens
        self.connections = 0  # accepted so far (tests check keep-alive with it)
        self.last_request: tuple[bytes, bytes] = (b"", b"")  # (head, body), for tests
        self._cache: dict[tuple[Any, ...], tuple[bytes, list[bytes], float, int | None]] = {}

    def respond(self, method: bytes, path: bytes, head: bytes, body: bytes
                ) -> tuple[bytes, list[bytes], float, int | None]:
        """(head, body chunks, delay before sending, chunks to send before dropping)."""
        self.last_request = (head, body)
        path = path.split(b"?", 1)[0]
        if method == b"GET" and path in (b"/v1/models", b"/models"):
            data = orjson.dumps({"object": "list", "data": [
                {"id": "mock-model", "object": "model", "owned_by": "mock"}]})
            return _head(200, b"application/json", len(data)), [data], 0.0, None
        if method == b"GET" and path == b"/health":
            return _head(200, b"text/plain", 2), [b"ok"], 0.0, None
        chat = path in (b"/v1/chat/completions", b"/chat/completions")
        if method != b"POST" or not (chat or path in (b"/v1/completions", b"/completions")):
            return _error(404, f"no route {method.decode()} {path.decode()}")
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "body is not JSON")
        model = str(req.get("model", ""))
        if chat:
            words = sum(len(str(m.get("content", "")).split()) for m in req.get("messages", ()))
        else:
            words = len(str(req.get("prompt", "")).split())
        stream = bool(req.get("stream"))
        usage = bool((req.get("stream_options") or {}).get("include_usage")) or not stream
        max_tokens = req.get("max_tokens")
        key = (chat, stream, usage, model, max_tokens, words)
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            cached = self._cache[key] = self._build(chat, stream, usage, model, max_tokens, words)
        return cached

    def _build(self, chat: bool, stream: bool, usage: bool, model: str,
               max_tokens: int | None, words: int
               ) -> tuple[bytes, list[bytes], float, int | None]:
        delay, cut = 0.0, None
        kind_, _, arg = model.partition("-")
        if kind_ in ("status", "sleep", "cut") and not arg.isdigit():
            return _error(400, f"mock model '{model}' needs a number after '-'")
        if kind_ == "status":
            return _error(int(arg), f"mock failure {arg}")
        if kind_ == "sleep":
            delay = int(arg) / 1000
        if kind_ == "cut":
            cut = int(arg)
        if model == "nousage":
            usage = False
        n = self.tokens if max_tokens is None else min(self.tokens, int(max_tokens))
        finish = "length" if n < self.tokens else "stop"
        pieces = [(" " if i else "") + WORDS[i % len(WORDS)] for i in range(n)]
        counts = {"prompt_tokens": 1 + words, "completion_tokens": n, "total_tokens": 1 + words + n}
        kind = "chat.completion" if chat else "text_completion"
        base = {"id": "cmpl-mock", "created": 1700000000, "model": model}
        if not stream:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(pieces)}
            else:
                choice["text"] = "".join(pieces)
            data = orjson.dumps({**base, "object": kind, "choices": [choice], "usage": counts})
            return _head(200, b"application/json", len(data)), [data], delay, None

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            payload = orjson.dumps({**base, "object": f"{kind}.chunk" if chat else kind,
                                    "choices": choices, **extra})
            return _chunk(b"data: " + payload + b"\n\n")

        def choice_of(text: str, finish_reason: str | None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {},
                        "finish_reason": finish_reason, "logprobs": None}
            return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}

        chunks = []
        if chat:
            chunks.append(event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "finish_reason": None}]))
        chunks += [event([choice_of(p, None)]) for p in pieces]
        chunks.append(event([choice_of("", finish)]))
        if usage:
            chunks.append(event([], usage=counts))
        chunks.append(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
        return head, chunks, delay, cut


def _head(status: int, content_type: bytes, length: int) -> bytes:
    return (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
            % (status, _REASONS.get(status, b"Error"), content_type, length))


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _error(status: int, message: str) -> tuple[bytes, list[bytes], float, int | None]:
    data = orjson.dumps({"error": {"message": message, "type": "mock_error", "code": status}})
    head = _head(status, b"application/json", len(data))
    if status == 429:
        head = head[:-2] + b"retry-after: 1\r\n\r\n"
    return head, [data], 0.0, None


class HttpProtocol(asyncio.Protocol):
    """One connection: parse requests off the buffer, one at a time (no pipelining needed)."""

    def __init__(self, app: MockApp) -> None:
        self.app = app
        self.buffer = bytearray()
        self.busy = False  # a delayed response is pending
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is duck-typed
        self.app.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._serve()

    def _serve(self) -> None:
        while self.transport is not None and not self.busy:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            request_head = bytes(self.buffer[:end])
            lines = request_head.split(b"\r\n")
            method, path, version = lines[0].split(b" ", 2)
            length, close = 0, version == b"HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            head, chunks, delay, cut = self.app.respond(method, path, request_head, body)
            if delay:
                self.busy = True
                asyncio.get_running_loop().call_later(delay, self._send_later, head, chunks,
                                                      cut, close)
                return
            self._send(head, chunks, cut, close)

    def _send_later(self, head: bytes, chunks: list[bytes], cut: int | None, close: bool) -> None:
        self.busy = False
        self._send(head, chunks, cut, close)
        self._serve()

    def _send(self, head: bytes, chunks: list[bytes], cut: int | None, close: bool) -> None:
        if self.transport is None:
            return
        if cut is not None:
            self.transport.write(head + b"".join(chunks[:cut]))
            self.transport.abort()
            return
        self.transport.write(head + b"".join(chunks))
        if close:
            self.transport.close()


async def start_server(app: MockApp, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Serve ``app`` on the running loop; ``port=0`` picks a free port."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: HttpProtocol(app), host, port, backlog=4096)


async def _main(host: str, port: int, tokens: int) -> None:
    server = await start_server(MockApp(tokens), host, port)
    print(f"mock upstream on http://{host}:{port}/v1 ({tokens} tokens per answer)", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--tokens", type=int, default=16, help="words per answer")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(_main(args.host, args.port, args.tokens))


if __name__ == "__main__":
    main()
