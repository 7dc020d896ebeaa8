"""Connection-level bounds for ``sluice serve``: a deadline on a request's headers.

uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) but not one that
sends its headers slowly: any byte cancels the keep-alive timer, so a client dripping a
header line every few seconds (slow-loris) holds its connection forever. These protocol
classes arm a deadline when a connection opens, and on a kept-alive connection when the
next request's first bytes arrive; it is cancelled once a request's headers are complete.
A connection still without a full request head at the deadline is closed (one DEBUG line;
a 408 would only feed the attacker). An idle kept-alive connection is left to uvicorn's
keep-alive timeout: closing it sooner, while a client is about to reuse it, is what
makes clients see connection resets.

Bodies are bounded in the ASGI layer (:class:`sluice.gateway.http.middleware.BodyTimeout`),
where the request is known and a 408 can be answered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("sluice.http")


class _HeaderDeadline:
    """Mixed into a uvicorn HTTP protocol; ``header_timeout_s`` is set by :func:`protocol`."""

    header_timeout_s: float = 10.0
    _deadline: asyncio.TimerHandle | None = None

    # -- hooks of uvicorn's protocols ------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self.transport = CoalescingTransport(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self._in_request():
            self._disarm()
        elif self._deadline is None:
            self._arm()  # the first bytes of the next request on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    # -- the deadline ---------------------------------------------------------------

    def _in_request(self) -> bool:
        cycle: Any = getattr(self, "cycle", None)
        return cycle is not None and not cycle.response_complete

    def _transport(self) -> asyncio.Transport:
        return self.transport  # type: ignore[attr-defined,no-any-return]

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._in_request():
            return
        transport = self._transport()
        if not transport.is_closing():
            client = getattr(self, "client", None)
            log.debug("closing connection from %s: no complete request head within %.0f s",
                      client[0] if client else "?", self.header_timeout_s)
            transport.close()


class CoalescingTransport:
    """The connection's transport, with the writes of one event-loop step sent as one.

    uvicorn writes a response's head and its body separately; a plain response is both in
    one step, so they leave in one ``send`` (one TCP segment, one wake-up of the client)
    instead of two. Bytes written are sent at the end of the step (``call_soon``), before
    any ``close``; a streamed chunk is not held longer than that. Everything else is the
    transport's own."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, set_protocol...
        return getattr(self._transport, name)


class GuardedH11Protocol(_HeaderDeadline, H11Protocol):
    pass


class GuardedHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
    pass


def protocol(name: str, header_timeout_s: float) -> type[asyncio.Protocol]:
    """The uvicorn ``http`` class for ``--http NAME`` with a header deadline."""
    base = {"h11": GuardedH11Protocol, "httptools": GuardedHttpToolsProtocol}[name]
    return type(base.__name__, (base,), {"header_timeout_s": header_timeout_s})
