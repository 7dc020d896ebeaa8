"""ASGI middleware: a request id on every response, and OpenAI-shaped errors for
anything that escapes the routes (including Starlette's own 404/405); a deadline on
request bodies (slow uploads are answered 408 and their connection closed)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import ClassVar

import orjson
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice.gateway.errors import SluiceError

log = logging.getLogger("sluice.http")


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


class RequestIdMiddleware:
    """Assigns ``scope["state"]["request_id"]`` and echoes it as ``x-request-id``.

    Any unhandled exception becomes a 500 in OpenAI's error shape (and is logged), so a
    client never sees a bare text error page.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # An aborted upload: nobody to answer, nothing wrong with the server.
            log.info("client went away during %s %s (%s)", scope.get("method"),
                     scope.get("path"), request_id)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            body = orjson.dumps(SluiceError("internal server error").body())
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json"), header],
                }
            )
            await send({"type": "http.response.body", "body": body})


class RequestTimeout(SluiceError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class BodyTimeout:
    """Bounds how long a request body may take: ``total_s`` for all of it, ``idle_s``
    between two chunks. Past either, reading the body raises :class:`RequestTimeout`
    (408, ``Connection: close``), so a client that trickles its upload (or stops
    mid-way) gives its connection and its task back. Once the body is complete, ``receive``
    is passed through untouched (a streamed response waits on it for the disconnect).
    """

    methods: ClassVar[frozenset[str]] = frozenset({"POST", "PUT", "PATCH", "DELETE"})

    def __init__(self, app: ASGIApp, *, total_s: float = 60.0, idle_s: float = 15.0) -> None:
        self.app = app
        self.total_s = total_s
        self.idle_s = idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in self.methods:
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_s
        done = False

        async def bounded() -> Message:
            nonlocal done
            if done:
                return await receive()
            left = deadline - loop.time()
            try:
                async with asyncio.timeout(min(self.idle_s, max(0.0, left))):
                    message = await receive()
            except TimeoutError:
                which = "within %.0f s" % self.total_s if left <= self.idle_s else \
                    "(no data for %.0f s)" % self.idle_s
                log.info("request body of %s %s not received %s; closing", scope.get("method"),
                         scope.get("path"), which)
                raise RequestTimeout(f"request body not received {which}") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        await self.app(scope, bounded, send)
