"""An OpenAI-compatible upstream that fails on purpose, one way per URL prefix.

A raw asyncio HTTP server, so that it can do what a framework would not: drop the
connection, never answer, or end a stream early. ``base_url(mode)`` gives the ``/v1`` URL
of a mode; ``hits[mode]`` counts requests.

    ok           a streamed or plain answer "fine", finish stop, with usage
    500          500 with an OpenAI error body
    429          429, Retry-After: 0.05
    timeout      reads the request, never answers
    reset        reads the request, closes the connection (no response)
    die-before   200 + SSE headers, then closes before the first data line
    die-after    200 + SSE, one content chunk, then closes (no finish, no [DONE])
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import orjson

from tests.conftest import free_port

MODES = ("ok", "500", "429", "timeout", "reset", "die-before", "die-after")


def _chunk(content: str | None, finish: str | None) -> bytes:
    body = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": content},
                         "finish_reason": finish}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _response(status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> bytes:
    head = [f"HTTP/1.1 {status} X", f"content-type: {content_type}",
            f"content-length: {len(body)}", "connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class FaultyUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.hits: Counter[str] = Counter()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def base_url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/v1"

    def start(self) -> FaultyUpstream:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(shutdown()))
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self.loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                           if line.lower().startswith("content-length:")), 0)
            body = orjson.loads(await reader.readexactly(length)) if length else {}
            mode = path.strip("/").split("/")[0]
            self.hits[mode] += 1
            await self._answer(mode, bool(body.get("stream")), writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, mode: str, stream: bool, writer: asyncio.StreamWriter) -> None:
        sse_head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"connection: close\r\n\r\n")
        if mode == "ok":
            usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
            if stream:
                writer.write(sse_head + _chunk("fine", None) + _chunk(None, "stop")
                             + b"data: " + orjson.dumps({"id": "chatcmpl-x", "choices": [],
                                                          "usage": usage}) + b"\n\n"
                             + b"data: [DONE]\n\n")
            else:
                writer.write(_response(200, orjson.dumps({
                    "id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                                 "finish_reason": "stop"}], "usage": usage})))
        elif mode == "500":
            writer.write(_response(500, b'{"error": {"message": "boom", "type": "server_error"}}'))
        elif mode == "429":
            writer.write(_response(429, b'{"error": {"message": "slow down", "type": "requests"}}',
                                   {"retry-after": "0.05"}))
        elif mode == "timeout":
            await asyncio.sleep(30)
        elif mode == "reset":
            writer.transport.abort()
            return
        elif mode == "die-before":
            writer.write(sse_head)
        elif mode == "die-after":
            writer.write(sse_head + _chunk("partial", None))
        await writer.drain()
