"""Server-sent events and request-body reading."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from sluice.gateway.errors import InvalidRequest, PayloadTooLarge

DONE = b"data: [DONE]\n\n"


# Characters JSON lets a string hold raw that some SSE clients take for line ends: httpx's
# line reader (str.splitlines' rules) breaks on U+0085, U+2028 and U+2029 and would cut an
# event in two. In UTF-8 these byte runs are those characters and nothing else.
_LINE_ENDS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def event_json(value: Any) -> bytes:
    """JSON for one SSE data line: orjson's, with the characters above escaped."""
    out = orjson.dumps(value)
    if not out.isascii():  # one check for nearly every chunk
        for raw, escaped in _LINE_ENDS:
            out = out.replace(raw, escaped)
    return out


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + event_json(data) + b"\n\n"


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing bodies over ``limit`` bytes (413) before reading
    them whole, and anything that is not a JSON object (400)."""
    data, _ = await read_body(request, limit)
    return data


async def read_body(request: Request, limit: int) -> tuple[Any, bytes]:
    """:func:`read_json`, and the body's bytes (what a proxying backend forwards)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        except ValueError:
            raise InvalidRequest("invalid Content-Length header") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise InvalidRequest("request body is empty; send a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data, body
