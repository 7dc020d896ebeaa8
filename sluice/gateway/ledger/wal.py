"""The usage write-ahead log: a request is on disk before it runs, so no kill loses it.

At admission a request's usage record (prompt tokens, nothing completed yet) is appended
and fsync'd (group commit: concurrent admissions share one fsync). While it streams, each
chunk handed to the client appends a progress line (completion tokens so far); at the end
the final record is appended. Progress and close lines are plain ``write`` calls: they
live in the kernel's page cache the moment the call returns, so a ``kill -9`` of the
process cannot lose them (a power cut can: then the request is billed from its last
fsync'd state, its prompt at least).

Segments are files ``<dir>/usage-<owner>-<n>.wal``, each held under ``flock`` by the
process writing it. At start-up a process recovers every segment whose lock it can take
(its writer is dead): requests closed there yield their final record, requests left open
yield what was sent before the process died (status 500, finish_reason
``gateway_restart``). Usage rows are idempotent by request id, so a record both in the
database and in a segment is written once. A segment is deleted after the meter has made
every record closed in it durable (database or spool); still-open requests are first
copied to the next segment.

Line format, as in the spool: ``<crc32 hex> <json>\\n`` with json ``{"o": record}``,
``{"p": [request_id, completion_tokens]}`` or ``{"c": record}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sluice.gateway.ledger.spool import decode_line, encode_line

log = logging.getLogger(__name__)

ROTATE_BYTES = 1 << 20


class UsageWAL:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ok = True  # False after a failed write, until a rotation succeeds
        self._owner = uuid.uuid4().hex[:12]
        self._n = 0
        self._open: dict[str, dict[str, Any]] = {}  # request id -> latest state
        self._recovered: list[tuple[Path, int]] = []  # orphan segments (path, locked fd)
        self._written = self._synced = 0
        self._sync_task: asyncio.Task[None] | None = None
        # fsyncs on a thread of their own, not the loop's default executor (the CPU pool)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-wal")
        self._path, self._fd = self._new_segment()
        self._size = 0

    # -- writing ----------------------------------------------------------------------------

    async def open(self, record: dict[str, Any]) -> None:
        """Append a request's opening record and wait until it is fsync'd. Raises OSError
        (disk full, I/O error): the caller must not serve the request."""
        self._open[record["request_id"]] = dict(record)
        try:
            self._append(_encode({"o": record}))
            await self._sync()
        except OSError:
            self._open.pop(record["request_id"], None)
            raise

    def progress(self, request_id: str, completion_tokens: int) -> None:
        state = self._open.get(request_id)
        if state is None or state["completion_tokens"] == completion_tokens:
            return
        state["completion_tokens"] = completion_tokens
        self._append_quietly(_encode({"p": [request_id, completion_tokens]}))

    def close(self, record: dict[str, Any]) -> None:
        if self._open.pop(record["request_id"], None) is not None:
            self._append_quietly(_encode({"c": record}))

    def _append_quietly(self, line: bytes) -> None:
        try:  # (not contextlib.suppress: this runs once per streamed chunk)
            self._append(line)
        except OSError:  # logged by _append; self.ok refuses new work
            pass

    def _append(self, line: bytes) -> None:
        if not self.ok:  # after a failed or short write the segment's tail is suspect
            raise OSError(errno.EIO, f"usage WAL {self._path} is failed until rotated")
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"short write to {self._path} ({written} of {len(line)} bytes)")
        except OSError as exc:
            if self.ok:
                log.error("usage WAL %s: write failed (%s); refusing new requests", self._path, exc)
            self.ok = False
            raise
        self._size += len(line)
        self._written += 1

    async def _sync(self) -> None:
        """Group commit: wait until an fsync that started after our write has finished."""
        target = self._written
        while self._synced < target:
            if self._sync_task is None:
                self._sync_task = asyncio.create_task(self._fsync())
            await asyncio.shield(self._sync_task)

    async def _fsync(self) -> None:
        upto, fd = self._written, self._fd
        try:
            await asyncio.get_running_loop().run_in_executor(self._io, os.fsync, fd)
        except OSError:
            self.ok = False
            raise
        finally:
            self._sync_task = None
        self._synced = max(self._synced, upto)

    def sync_soon(self) -> None:
        """Start an fsync of what was written since the last one (progress and close lines),
        so a power cut loses at most one flush interval of them."""
        if self._written > self._synced and self._sync_task is None and self.ok:
            self._sync_task = asyncio.get_running_loop().create_task(self._fsync_quietly())

    async def _fsync_quietly(self) -> None:
        with contextlib.suppress(OSError):  # self.ok is False now: new work is refused
            await self._fsync()

    # -- segments ---------------------------------------------------------------------------

    def due(self) -> bool:
        return self._size >= ROTATE_BYTES or bool(self._recovered) or not self.ok

    def rotate(self) -> None:
        """Start a new segment holding the requests still open, and delete the old one and
        any recovered ones. Call only when every record closed so far is durable; no await
        in here, so no request closes meanwhile. Skipped while an fsync is in flight."""
        if self._sync_task is not None:
            return
        old_path, old_fd = self._path, self._fd
        path, fd = self._new_segment()
        try:
            lines = b"".join(_encode({"o": state}) for state in self._open.values())
            if lines:
                if os.write(fd, lines) != len(lines):
                    raise OSError(f"short write to {path}")
                os.fsync(fd)
        except OSError as exc:
            log.error("usage WAL: rotation failed (%s); keeping %s", exc, old_path)
            _drop(path, fd)
            self.ok = False
            return
        self._path, self._fd, self._size = path, fd, len(lines)
        self._synced = self._written  # counters only grow: waiters compare against them
        self.ok = True
        _drop(old_path, old_fd)
        for orphan, orphan_fd in self._recovered:
            _drop(orphan, orphan_fd)
        self._recovered = []

    def recover(self) -> list[dict[str, Any]]:
        """Usage records of segments left by dead processes (kept until :meth:`rotate`)."""
        records: list[dict[str, Any]] = []
        for path in sorted(self.dir.glob("usage-*.wal")):
            if path == self._path:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its writer is alive
                os.close(fd)
                continue
            found = _read_segment(path)
            log.warning("usage WAL: recovered %d requests from %s", len(found), path.name)
            records.extend(found)
            self._recovered.append((path, fd))
        return records

    def close_file(self, *, durable: bool = False) -> None:
        """Close the segment; with ``durable`` (every closed record is in the database or
        the spool) and no request open, remove it and any recovered ones too."""
        self._io.shutdown(wait=False)
        if durable and not self._open and self._sync_task is None:
            for path, fd in [(self._path, self._fd), *self._recovered]:
                _drop(path, fd)
            self._recovered = []
            return
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _new_segment(self) -> tuple[Path, int]:
        self._n += 1
        path = self.dir / f"usage-{self._owner}-{self._n:06d}.wal"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(OSError):  # the new name must survive a power cut too
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return path, fd


def _read_segment(path: Path) -> list[dict[str, Any]]:
    opened: dict[str, dict[str, Any]] = {}
    closed: dict[str, dict[str, Any]] = {}
    with open(path, "rb") as f:
        for line in f:
            entry = _decode(line)
            if entry is None:
                continue  # a torn last line: the process died inside write()
            if "o" in entry:
                opened.setdefault(entry["o"]["request_id"], entry["o"])
            elif "p" in entry and entry["p"][0] in opened:
                opened[entry["p"][0]]["completion_tokens"] = entry["p"][1]
            elif "c" in entry:
                closed[entry["c"]["request_id"]] = entry["c"]
    interrupted = [
        {**state, "status": 500, "finish_reason": "gateway_restart"}
        for rid, state in opened.items() if rid not in closed
    ]  # fmt: skip
    return [*closed.values(), *interrupted]


def _encode(entry: dict[str, Any]) -> bytes:
    return encode_line(entry)


def _decode(line: bytes) -> dict[str, Any] | None:
    entry = decode_line(line)
    return entry if isinstance(entry, dict) else None


def _drop(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
    with contextlib.suppress(OSError):
        os.close(fd)
