"""ASGI middleware: a request id on every response, and OpenAI-shaped errors for
anything that escapes the routes (including Starlette's own 404/405)."""

from __future__ import annotations

import logging
import secrets

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            body = orjson.dumps(
                {
                    "error": {
                        "message": "internal server error",
                        "type": "server_error",
                        "param": None,
                        "code": "internal_error",
                    }
                }
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json"), header],
                }
            )
            await send({"type": "http.response.body", "body": body})
