"""What the usage WAL costs a request: one fsync'd line at admission (shared by concurrent
admissions: group commit) and one plain write per streamed chunk."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

from sluice.gateway.ledger.wal import UsageWAL
from tests.reliability.support import report


def _record(i: int) -> dict:
    return {"request_id": f"r{i}", "tenant_id": "t", "key_id": "k", "model": "echo",
            "endpoint": "chat", "prompt_tokens": 10, "completion_tokens": 0, "status": 200,
            "finish_reason": None, "latency_ms": 0.0, "ttft_ms": None,
            "created_at": dt.datetime.now(dt.UTC), "cost_pico": 0, "backend": None}  # fmt: skip


async def test_wal_overhead(tmp_path: Path) -> None:
    wal = UsageWAL(tmp_path)
    start = time.perf_counter()
    for i in range(300):
        await wal.open(_record(i))
    sequential_ms = (time.perf_counter() - start) / 300 * 1e3
    start = time.perf_counter()
    await asyncio.gather(*(wal.open(_record(10_000 + i)) for i in range(2000)))
    concurrent_per_s = 2000 / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(20_000):
        wal.progress(f"r{10_000 + i % 2000}", i)
    progress_us = (time.perf_counter() - start) / 20_000 * 1e6
    wal.close_file()
    # The figures are reported, not asserted (timings are the benchmark's business); what
    # is asserted is that every record opened, one by one or concurrently, is durable.
    report("wal_overhead", open_sequential_ms=round(sequential_ms, 3),
           open_concurrent_per_s=round(concurrent_per_s), progress_line_us=round(progress_us, 1))
    found = UsageWAL(tmp_path).recover()
    assert len(found) == 2300 and len({r["request_id"] for r in found}) == 2300
