"""Usage exports: CSV or JSON lines, streamed in constant memory, in id order."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import IO, Any, Literal

import orjson
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice.gateway.db.models import UsageEvent, to_utc

ExportFormat = Literal["csv", "jsonl"]
EXPORT_COLUMNS = (
    "id", "request_id", "created_at", "tenant_id", "key_id", "model", "endpoint",
    "prompt_tokens", "completion_tokens", "total_tokens", "status", "finish_reason",
    "latency_ms", "ttft_ms", "cost_pico", "backend",
)  # fmt: skip


class BillingError(Exception):
    """An export or a push cannot go ahead; the message is one line for the operator."""



def iso(ts: dt.datetime) -> str:
    """``2026-03-01T10:05:00.000000Z`` (the audit log's format)."""
    return to_utc(ts).isoformat(timespec="microseconds")[:-6] + "Z"


def _usage_filter(start: dt.datetime, end: dt.datetime, tenant: str | None) -> list[Any]:
    where = [UsageEvent.created_at >= start, UsageEvent.created_at < end]  # UTCDateTime binds
    if tenant is not None:
        where.append(UsageEvent.tenant_id == tenant)
    return where


async def count_usage(
    engine: AsyncEngine, *, start: dt.datetime, end: dt.datetime, tenant: str | None = None
) -> int:
    """Rows an export with the same arguments will write (for a progress bar's total)."""
    async with engine.connect() as conn:
        stmt = select(func.count()).select_from(UsageEvent)
        stmt = stmt.where(*_usage_filter(start, end, tenant))
        return int((await conn.execute(stmt)).scalar_one())


def _row_values(row: Any) -> tuple[Any, ...]:
    return (
        row.id, row.request_id, iso(row.created_at), row.tenant_id, row.key_id, row.model,
        row.endpoint, row.prompt_tokens, row.completion_tokens,
        row.prompt_tokens + row.completion_tokens, row.status, row.finish_reason,
        row.latency_ms, row.ttft_ms, row.cost_pico, row.backend,
    )  # fmt: skip


def _encode_csv(rows: list[Any]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(_row_values(r) for r in rows)
    return buf.getvalue().encode()


def _encode_jsonl(rows: list[Any]) -> bytes:
    return b"".join(
        orjson.dumps(dict(zip(EXPORT_COLUMNS, _row_values(r), strict=True)),
                     option=orjson.OPT_APPEND_NEWLINE)  # fmt: skip
        for r in rows
    )


async def iter_usage_export(
    engine: AsyncEngine,
    *,
    start: dt.datetime,
    end: dt.datetime,
    tenant: str | None = None,
    fmt: ExportFormat = "csv",
    chunk_rows: int = 5000,
    progress: Callable[[int], None] | None = None,
) -> AsyncIterator[bytes]:
    """Usage events with ``start <= created_at < end`` (and ``tenant_id == tenant``), in id
    order, as encoded chunks of up to ``chunk_rows`` rows: made for an HTTP streaming
    response. Rows come through a server-side cursor, so memory does not grow with the
    export. ``progress`` gets the running row count after each chunk."""
    if fmt not in ("csv", "jsonl"):
        raise BillingError(f"unknown export format {fmt!r} (csv or jsonl)")
    encode = _encode_csv if fmt == "csv" else _encode_jsonl
    if fmt == "csv":
        yield (",".join(EXPORT_COLUMNS) + "\n").encode()
    stmt = (
        select(UsageEvent.__table__)
        .where(*_usage_filter(start, end, tenant))
        .order_by(UsageEvent.id)
        .execution_options(yield_per=chunk_rows)
    )
    done = 0
    async with engine.connect() as conn:
        result = await conn.stream(stmt)
        async for rows in result.partitions():
            yield encode(rows)
            done += len(rows)
            if progress is not None:
                progress(done)


async def export_usage(
    engine: AsyncEngine,
    *,
    start: dt.datetime,
    end: dt.datetime,
    tenant: str | None = None,
    fmt: ExportFormat = "csv",
    out: IO[bytes] | Callable[[bytes], Awaitable[None]],
    progress: Callable[[int], None] | None = None,
    chunk_rows: int = 5000,
) -> int:
    """Write an export to a binary stream (``out.write``) or an async chunk consumer;
    returns the number of rows written."""
    rows = 0

    def count(done: int) -> None:
        nonlocal rows
        rows = done
        if progress is not None:
            progress(done)

    write = getattr(out, "write", None)
    chunks = iter_usage_export(engine, start=start, end=end, tenant=tenant, fmt=fmt,
                               chunk_rows=chunk_rows, progress=count)  # fmt: skip
    async for chunk in chunks:
        if write is not None:
            write(chunk)
        else:
            await out(chunk)  # type: ignore[operator]
    return rows
