"""Usage events: exactly one per request id, written in batches off the request path.

A request's event is handed to :class:`Meter` when the request ends, however it ends
(finished, failed, client gone). The writer inserts batches with ``ON CONFLICT DO
NOTHING`` on the request id, so a replayed batch is harmless, and updates the
``usage_daily`` rollup in the same transaction for exactly the rows it inserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice.gateway.db.models import UsageDaily, UsageEvent
from sluice.gateway.ledger.spool import Spool

log = logging.getLogger("sluice.metering")


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    tenant_id: str
    key_id: str
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    status: int
    finish_reason: str | None
    latency_ms: float
    ttft_ms: float | None
    created_at: dt.datetime
    cost_pico: int = 0  # exact, in pico-units (sluice/gateway/economics)
    backend: str | None = None


_FIELDS = tuple(f.name for f in fields(UsageRecord))


def _dialect_insert(engine: AsyncEngine):  # type: ignore[no-untyped-def]
    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert


async def write_usage(engine: AsyncEngine, records: list[dict[str, Any]]) -> int:
    """Insert usage rows (idempotent by request id) and roll them up. Returns rows inserted."""
    dialect_insert = _dialect_insert(engine)
    async with engine.begin() as conn:
        stmt = (
            dialect_insert(UsageEvent)
            .on_conflict_do_nothing(index_elements=["request_id"])
            .returning(UsageEvent.request_id)
        )
        inserted: set[str] = set()
        for start in range(0, len(records), 1000):
            result = await conn.execute(stmt, records[start : start + 1000])
            inserted.update(result.scalars().all())
        if not inserted:
            return 0
        rollup: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for r in records:
            if r["request_id"] in inserted:
                created = r["created_at"]
                day = created.date() if isinstance(created, dt.datetime) else created
                agg = rollup[(day, r["tenant_id"], r["key_id"], r["model"])]
                agg[0] += 1
                agg[1] += r["prompt_tokens"]
                agg[2] += r["completion_tokens"]
                agg[3] += r.get("cost_pico", 0)
        rows = [
            {
                "day": day,
                "tenant_id": tenant,
                "key_id": key,
                "model": model,
                "requests": agg[0],
                "prompt_tokens": agg[1],
                "completion_tokens": agg[2],
                "cost_pico": agg[3],
            }
            for (day, tenant, key, model), agg in rollup.items()
        ]
        upsert = dialect_insert(UsageDaily)
        upsert = upsert.on_conflict_do_update(
            index_elements=["day", "tenant_id", "key_id", "model"],
            set_={
                "requests": UsageDaily.requests + upsert.excluded.requests,
                "prompt_tokens": UsageDaily.prompt_tokens + upsert.excluded.prompt_tokens,
                "completion_tokens": UsageDaily.completion_tokens
                + upsert.excluded.completion_tokens,
                "cost_pico": UsageDaily.cost_pico + upsert.excluded.cost_pico,
            },
        )
        # Sorted so that concurrent writers take row locks in one order (no deadlocks).
        for row in sorted(rows, key=lambda r: (r["day"], r["tenant_id"], r["key_id"], r["model"])):
            await conn.execute(upsert, row)
        return len(inserted)


class Meter:
    """Collects usage records and writes them in batches from a background task.

    When the database cannot take a batch, the batch goes to the local spool (fsync'd)
    and is replayed, in order, once the database is back: nothing is lost, and since
    inserts are idempotent by request id, nothing is counted twice.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        spool: Spool | None = None,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
    ) -> None:
        self.engine = engine
        self.spool = spool
        self.healthy = True
        self._batch_size = batch_size
        self._interval = flush_interval_s
        self._pending: list[dict[str, Any]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.written = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sluice-meter")

    def record(self, record: UsageRecord) -> None:
        # A shallow copy: dataclasses.asdict deep-copies every field and costs 5x as much.
        self._pending.append({name: getattr(record, name) for name in _FIELDS})
        if len(self._pending) >= self._batch_size:
            self._wakeup.set()

    async def flush(self) -> None:
        async with self._lock:
            if self.spool is not None and self.spool.pending():
                try:
                    await self.spool.replay(self._write)  # older records first
                except Exception:
                    # Still down: newer records join the spool too (durable, in order).
                    if self._pending:
                        batch, self._pending = self._pending, []
                        self.spool.append(batch)
                    self.healthy = False
                    raise
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._write(batch)
                except Exception:
                    if self.spool is None:
                        self._pending[:0] = batch  # keep it; the next flush retries
                        raise
                    self.spool.append(batch)
                    self.healthy = False
                    raise
            self.healthy = True

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        for record in batch:  # replayed from the spool: timestamps come back as text
            if isinstance(record["created_at"], str):
                record["created_at"] = dt.datetime.fromisoformat(record["created_at"])
        self.written += await write_usage(self.engine, batch)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), self._interval)
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception as exc:
                where = "spooled to disk" if self.spool is not None else "kept in memory"
                log.error("usage write failed (%s: %s); records %s for replay",
                          type(exc).__name__, exc, where)
                await asyncio.sleep(1.0)

