"""A response's head and body, written in one event-loop step, leave in one send; nothing
written is lost or reordered by a close."""

from __future__ import annotations

import asyncio
from typing import Any

from sluice.gateway.http.connections import CoalescingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1234) if name == "peername" else default


async def test_writes_of_one_step_are_sent_once_in_order() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(memoryview(b'{"ok":true}'))
    assert raw.sent == []
    assert transport.get_write_buffer_size() == 30
    await asyncio.sleep(0)
    assert raw.sent == [b'HTTP/1.1 200 OK\r\n\r\n{"ok":true}']


async def test_a_later_step_is_a_later_send() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw)  # type: ignore[arg-type]
    transport.write(b"data: 1\n\n")
    await asyncio.sleep(0)
    transport.write(b"data: 2\n\n")
    await asyncio.sleep(0)
    assert raw.sent == [b"data: 1\n\n", b"data: 2\n\n"]


async def test_close_sends_what_was_written_first() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw)  # type: ignore[arg-type]
    transport.write(b"last bytes")
    transport.close()
    assert raw.sent == [b"last bytes"] and raw.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert raw.sent == [b"last bytes"]


async def test_abort_drops_what_was_not_sent() -> None:
    raw = RecordingTransport()
    transport = CoalescingTransport(raw)  # type: ignore[arg-type]
    transport.write(b"never sent")
    transport.abort()
    await asyncio.sleep(0)
    assert raw.sent == [] and raw.aborted
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1234)
