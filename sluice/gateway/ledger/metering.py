"""Usage events: exactly one per request id, written in batches off the request path.

A request is opened in the usage WAL (ledger/wal.py) when it is admitted and its event is
handed to :class:`Meter` when it ends, however it ends (finished, failed, client gone).
:func:`write_usage` inserts batches with ``ON CONFLICT DO NOTHING`` on the request id, so
a replayed batch is harmless, and updates the ``usage_daily`` rollup in the same
transaction for exactly the rows it inserted.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice.gateway.db.models import UsageDaily, UsageEvent
from sluice.gateway.errors import ServiceUnavailable
from sluice.gateway.ledger.spool import Spool
from sluice.gateway.ledger.wal import UsageWAL
from sluice.gateway.ledger.writer import BatchWriter



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
    """Usage records: opened in the write-ahead log at admission, written at the end in
    batches by a :class:`~sluice.gateway.ledger.writer.BatchWriter` (spooled while the
    database is down). Nothing admitted is lost to a crash, and since inserts are
    idempotent by request id, nothing is counted twice.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        spool: Spool | None = None,
        wal: UsageWAL | None = None,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
    ) -> None:
        self.engine = engine
        self.wal = wal
        self.written = 0
        self.writer = BatchWriter("metering", self._write, spool=spool, batch_size=batch_size,
                                  flush_interval_s=flush_interval_s,
                                  on_durable=self._wal_checkpoint)  # fmt: skip

    @property
    def healthy(self) -> bool:
        """The database takes usage writes (``db_outage = "refuse"`` reads this)."""
        return self.writer.db_ok

    @property
    def accepting(self) -> bool:
        """Usage can be made durable: the WAL, and the database or the spool, work."""
        return self.writer.durable and (self.wal is None or self.wal.ok)

    def start(self, *, price: Callable[[dict[str, Any]], int] | None = None) -> None:
        """Recover what crashed processes admitted (priced by ``price``), then write."""
        if self.wal is not None:
            for record in self.wal.recover():  # requests a killed process had admitted
                if price is not None:
                    record["cost_pico"] = price(record)
                self.writer.add(record)
        self.writer.start()

    async def admit(self, record: UsageRecord) -> None:
        """Open the request's record in the WAL (fsync'd) before it runs; 503 when usage
        cannot be recorded (disk full, spool or WAL broken)."""
        if not self.accepting:
            raise ServiceUnavailable("usage cannot be recorded right now; try again shortly")
        if self.wal is not None:
            try:
                await self.wal.open(_as_dict(record))
            except OSError:
                raise ServiceUnavailable("usage cannot be recorded right now; try again "
                                         "shortly") from None  # fmt: skip

    def progress(self, request_id: str, completion_tokens: int) -> None:
        """Completion tokens handed to the client so far (what a kill -9 bills)."""
        if self.wal is not None:
            self.wal.progress(request_id, completion_tokens)

    def record(self, record: UsageRecord) -> None:
        """The request's final record (closes its WAL entry)."""
        row = _as_dict(record)
        if self.wal is not None:
            self.wal.close(row)
        self.writer.add(row)

    async def flush(self) -> None:
        await self.writer.flush()

    async def close(self) -> None:
        try:
            await self.writer.close()
        finally:  # a clean stop leaves no segment to recover; a failed one keeps it
            if self.wal is not None:
                self.wal.close_file(durable=self.writer.buffered == 0)

    def _wal_checkpoint(self) -> None:
        if self.wal is not None and self.wal.due():
            self.wal.rotate()
        elif self.wal is not None:
            self.wal.sync_soon()

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        for record in batch:  # replayed from the spool or the WAL: timestamps come as text
            if isinstance(record["created_at"], str):
                record["created_at"] = dt.datetime.fromisoformat(record["created_at"])
        self.written += await write_usage(self.engine, batch)


def _as_dict(record: UsageRecord) -> dict[str, Any]:
    # A shallow copy: dataclasses.asdict deep-copies every field and costs 5x as much.
    return {name: getattr(record, name) for name in _FIELDS}
