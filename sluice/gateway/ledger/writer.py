"""One durable batch writer, shared by metering and the audit log.

Records are buffered and handed to a *sink* (an async function that writes one batch to
the database) in batches, from a background task. When the sink fails because the
database is unreachable, the buffer goes to a :class:`~sluice.gateway.ledger.spool.Spool`
(fsync'd) and is replayed, oldest first, once the database answers again; newer records
queue behind the spool so order is kept. Sinks must be idempotent (by request id or by
chain sequence): a crash between a committed insert and the spool's bookkeeping
re-delivers that batch.

If the spool cannot take a batch either (disk full, read-only, I/O error), the records
stay in memory and :attr:`BatchWriter.durable` turns False until a write succeeds again:
callers refuse new work (503) rather than serve what they cannot record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from sluice.gateway.ledger.spool import Spool

log = logging.getLogger(__name__)

Sink = Callable[[list[dict[str, Any]]], Awaitable[None]]
# What a failed write looks like when the database is down or unreachable.
DB_UNAVAILABLE: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError, asyncio.TimeoutError)


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached (rather than, say, that its
    schema is missing)."""
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, DBAPIError):
        orig = exc.orig
        return exc.connection_invalidated or isinstance(orig, (OSError, asyncio.TimeoutError)) or (
            type(orig).__name__ in {"CannotConnectNowError", "ConnectionDoesNotExistError"})
    return False


class NotDurable(Exception):
    """Records are held only in memory: neither the database nor the spool took them."""


class BatchWriter:
    """Buffered, batched, spool-backed writer of records to one sink."""

    def __init__(
        self,
        name: str,
        sink: Sink,
        *,
        spool: Spool | None = None,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        on_durable: Callable[[], None] | None = None,
    ) -> None:
        """``on_durable`` runs (under the writer's lock, without awaiting) each time a flush
        has made every record added so far durable."""
        self.name = name
        self.on_durable = on_durable
        self.spool = spool
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.db_ok = True  # the last write reached the database
        self.spool_ok = True  # the spool took its last batch (or was not needed)
        self._sink = sink
        self._buffer: list[dict[str, Any]] = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Disk writes on a thread of their own: the loop's default executor is the CPU pool
        # (tokenizing a large prompt there must not hold up an fsync).
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sluice-{name}-io")

    async def run_io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def durable(self) -> bool:
        """Whether new records can be made durable (database, or else the spool)."""
        return self.spool_ok and (self.db_ok or self.spool is not None)

    def add(self, record: dict[str, Any]) -> None:
        self._buffer.append(record)
        if len(self._buffer) >= self.batch_size:
            self._wake.set()

    async def replay(self) -> None:
        """Deliver what an earlier process spooled (raises while the database is down)."""
        if self.spool is not None and self.spool.pending():
            async with self._lock:
                await self.spool.replay(self._sink)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.name}-writer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        finally:
            self._io.shutdown(wait=False)

    async def flush(self) -> None:
        """Make every record added so far durable: in the database, or in the spool when
        the database is unreachable. Raises :class:`NotDurable` (records kept in memory)
        when neither takes them, and the sink's own error for anything else."""
        async with self._lock:
            if self.spool is not None and self.spool.pending():
                try:
                    await self.spool.replay(self._sink)  # older records first
                except DB_UNAVAILABLE as exc:
                    self._db_failed(exc)
                    await self._spool_buffer()
                    self._durable()
                    return
            while self._buffer:
                batch = self._buffer[: self.batch_size]
                try:
                    await self._sink(batch)
                except DB_UNAVAILABLE as exc:
                    self._db_failed(exc)
                    if self.spool is None:
                        raise NotDurable(f"{self.name}: {len(self._buffer)} records in memory "
                                         f"only: {exc}") from exc  # fmt: skip
                    await self._spool_buffer()
                    self._durable()
                    return
                del self._buffer[: len(batch)]
            if not self.db_ok:
                log.info("%s: database writes succeed again", self.name)
            self.db_ok = self.spool_ok = True
            self._durable()

    def _durable(self) -> None:
        if self.on_durable is not None and not self._buffer:
            self.on_durable()

    def _db_failed(self, exc: BaseException) -> None:
        if self.db_ok:
            log.warning("%s: database write failed (%s: %s)", self.name, type(exc).__name__, exc)
        self.db_ok = False

    async def _spool_buffer(self) -> None:
        assert self.spool is not None
        batch = list(self._buffer)
        if batch:
            try:
                await self.run_io(self.spool.append, batch)
            except OSError as exc:
                self.spool_ok = False
                log.error("%s: spool %s failed (%s); %d records held in memory only, refusing "
                          "new work", self.name, self.spool.path, exc, len(self._buffer))  # fmt: skip
                raise NotDurable(f"{self.name}: spool failed: {exc}") from exc
            del self._buffer[: len(batch)]  # records added meanwhile stay, in order
        self.spool_ok = True

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.flush_interval_s)
            self._wake.clear()
            try:
                await self.flush()
            except NotDurable:
                await asyncio.sleep(self.flush_interval_s)  # logged where it happened
            except Exception:
                log.exception("%s: write failed; %d records kept for the next attempt",
                              self.name, len(self._buffer))  # fmt: skip
                await asyncio.sleep(1.0)
