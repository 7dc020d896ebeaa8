"""A local, fsynced spool that keeps records while the database is unreachable.

File format: a header line naming the file's generation, then one line per batch::

    #sluice-spool <generation>
    <crc32 of json, 8 hex digits> <json array of records>

A line without its newline or with a wrong CRC is a torn write (the process died inside
``append``); it is skipped and cut off before the next append. Replay progress lives in a
sidecar ``<path>.done`` (``{"generation", "offset"}``, replaced atomically), so a crash
mid-replay re-delivers at most the batch being consumed: consumers must be idempotent
(by request id or sequence number). Once everything is consumed the file is atomically
replaced by an empty one of a new generation, which also invalidates the old sidecar.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

HEADER = b"#sluice-spool "

Consumer = Callable[[list[dict[str, Any]]], Awaitable[None]]


class Spool:
    """Durable FIFO of record batches. ``append`` may be called from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._done_path = self.path.with_name(self.path.name + ".done")
        self._lock = threading.Lock()
        self._replaying = False
        self.torn = 0  # torn lines found (and cut off) since this object was created
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if not self.path.exists():
                self._reset_file()
            self._generation = self._read_generation()
            self._repair_tail()
            self._pending = sum(1 for _ in self._scan(self._done_offset()))

    # -- writing --------------------------------------------------------------------------

    def append(self, records: list[dict[str, Any]]) -> None:
        """Write one batch as one line and fsync it; when this returns, the batch survives
        a crash. Raises ``TypeError`` for records that are not JSON-serialisable."""
        if not records:
            return
        line = encode_line(records)
        with self._lock:
            with open(self.path, "ab") as f:
                start = f.tell()
                try:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
                except BaseException:
                    f.truncate(start)  # never leave half a line behind in this process
                    raise
            self._pending += 1

    def pending(self) -> int:
        """Batches appended and not yet consumed."""
        return self._pending

    # -- reading --------------------------------------------------------------------------

    async def replay(self, consumer: Consumer) -> int:
        """Feed pending batches, oldest first, to ``consumer``; returns how many batches it
        consumed. A batch counts as done only after ``consumer`` returns; if it raises,
        replay stops there and the exception propagates (that batch stays pending)."""
        if self._replaying:
            raise RuntimeError("Spool.replay is already running")
        self._replaying = True
        consumed = 0
        try:
            while True:
                with self._lock:
                    offset = self._done_offset()
                    nxt = next(self._scan(offset), None)
                if nxt is None:
                    break
                records, end = nxt
                await consumer(records)
                with self._lock:
                    self._write_done(end)
                    self._pending -= 1
                consumed += 1
            with self._lock:
                self._compact_if_drained()
        finally:
            self._replaying = False
        return consumed

    def _scan(self, offset: int):  # type: ignore[no-untyped-def]
        """Yield ``(records, end_offset)`` for each complete, valid line after ``offset``."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            pos = offset
            for line in f:
                end = pos + len(line)
                parsed = _parse(line)
                if parsed is None:
                    if end == os.fstat(f.fileno()).st_size:
                        break  # torn tail, cut off before the next append
                    self.torn += 1
                    log.error("spool %s: corrupt batch at byte %d skipped", self.path, pos)
                else:
                    yield parsed, end
                pos = end

    # -- file management --------------------------------------------------------------------

    def _read_generation(self) -> str:
        with open(self.path, "rb") as f:
            first = f.readline()
        if not first.startswith(HEADER) or not first.endswith(b"\n"):
            # The file was created but its header never made it to disk: nothing was spooled.
            self._reset_file()
            return self._read_generation()
        return first[len(HEADER) : -1].decode()

    def _header_len(self) -> int:
        return len(HEADER) + len(self._generation) + 1

    def _done_offset(self) -> int:
        try:
            done = json.loads(self._done_path.read_text())
        except (FileNotFoundError, ValueError):
            return self._header_len()
        if done.get("generation") != self._generation:
            return self._header_len()
        return max(int(done["offset"]), self._header_len())

    def _write_done(self, offset: int) -> None:
        tmp = self._done_path.with_name(self._done_path.name + ".tmp")
        tmp.write_text(json.dumps({"generation": self._generation, "offset": offset}))
        _fsync_path(tmp)
        os.replace(tmp, self._done_path)
        _fsync_path(self.path.parent)

    def _repair_tail(self) -> None:
        """Cut a torn last line so the next batch starts on a line of its own."""
        data_end = self._header_len()
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            f.seek(data_end)
            for line in f:
                is_last = data_end + len(line) == size
                if not line.endswith(b"\n") or (is_last and _parse(line) is None):
                    break
                data_end += len(line)
        if data_end < size:
            self.torn += 1
            log.warning("spool %s: torn last batch (%d bytes) cut off", self.path, size - data_end)
            with open(self.path, "r+b") as f:
                f.truncate(data_end)
                os.fsync(f.fileno())

    def _compact_if_drained(self) -> None:
        if self._done_offset() == self.path.stat().st_size:
            self._reset_file()

    def _reset_file(self) -> None:
        self._generation = uuid.uuid4().hex
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(HEADER + self._generation.encode() + b"\n")
        _fsync_path(tmp)
        os.replace(tmp, self.path)
        _fsync_path(self.path.parent)
        self._pending = 0


def encode_line(value: Any) -> bytes:
    """One checksummed line: ``<crc32 hex> <json>\\n`` (the spool's and the WAL's format).
    Raises ``TypeError`` for values that are not JSON-serialisable."""
    try:  # orjson: a usage record in a tenth of json.dumps' time (two per request)
        body = orjson.dumps(value)
    except TypeError:  # what orjson refuses (an int over 64 bits, a non-str key): as before
        body = json.dumps(value, separators=(",", ":"), default=_json_default).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_line(line: bytes) -> Any | None:
    """The value of a complete line with a matching checksum; None for a torn or corrupt one."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        return json.loads(body)
    except ValueError:
        return None


def _parse(line: bytes) -> list[dict[str, Any]] | None:
    records = decode_line(line)
    return records if isinstance(records, list) else None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
