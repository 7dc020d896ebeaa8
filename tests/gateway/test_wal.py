"""The usage write-ahead log and the meter around it, without a gateway.

A child process admits requests into a WAL and is SIGKILLed; the parent recovers what it
left. The meter writes recovered records to a real database exactly once, and refuses
new work (503) when the disk under the WAL or the spool fails.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import func, select

from sluice.gateway.db.models import UsageDaily, UsageEvent
from sluice.gateway.db.session import create_engine, migrate
from sluice.gateway.errors import ServiceUnavailable
from sluice.gateway.ledger import wal as wal_module
from sluice.gateway.ledger.metering import Meter, UsageRecord
from sluice.gateway.ledger.spool import Spool
from sluice.gateway.ledger.wal import UsageWAL
from sluice.gateway.ledger.writer import NotDurable

CHILD = textwrap.dedent("""
    import asyncio, datetime as dt, os, signal, sys
    from sluice.gateway.ledger.wal import UsageWAL

    def rec(i, done=0):
        return {"request_id": f"req-{i}", "tenant_id": "t", "key_id": "k", "model": "echo",
                "endpoint": "chat", "prompt_tokens": 10 + i, "completion_tokens": done,
                "status": 200, "finish_reason": None, "latency_ms": 1.0, "ttft_ms": None,
                "created_at": dt.datetime(2026, 12, 3, tzinfo=dt.UTC), "cost_pico": 0,
                "backend": "echo"}

    async def main():
        wal = UsageWAL(sys.argv[1])
        for i in range(6):
            await wal.open(rec(i))
        for n in range(1, 8):  # req-1 streams 7 tokens, req-2 three
            wal.progress("req-1", n)
            if n <= 3:
                wal.progress("req-2", n)
        wal.close({**rec(0, 5), "finish_reason": "stop"})
        wal.close({**rec(3, 2), "finish_reason": "length"})
        print("ready", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush, nothing

    asyncio.run(main())
""")


def record(i: int, completion: int = 0) -> UsageRecord:
    return UsageRecord(request_id=f"req-{i}", tenant_id="t", key_id="k", model="echo",
                       endpoint="chat", prompt_tokens=10 + i, completion_tokens=completion,
                       status=200, finish_reason=None, latency_ms=1.0, ttft_ms=None,
                       created_at=dt.datetime(2026, 12, 3, tzinfo=dt.UTC), backend="echo")


def killed_child(directory: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(directory)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL and "ready" in proc.stdout, proc.stderr


def test_kill_9_leaves_every_admitted_request_recoverable(tmp_path: Path) -> None:
    killed_child(tmp_path)
    found = {r["request_id"]: r for r in UsageWAL(tmp_path).recover()}
    assert set(found) == {f"req-{i}" for i in range(6)}
    assert (found["req-0"]["completion_tokens"], found["req-0"]["finish_reason"]) == (5, "stop")
    assert found["req-3"]["finish_reason"] == "length"
    # Open when the process died: billed for the prompt and what had been sent.
    assert (found["req-1"]["completion_tokens"], found["req-1"]["status"]) == (7, 500)
    assert found["req-2"]["completion_tokens"] == 3
    assert found["req-5"]["finish_reason"] == "gateway_restart"
    assert found["req-4"]["prompt_tokens"] == 14


async def test_a_live_writers_segment_is_not_recovered(tmp_path: Path) -> None:
    live = UsageWAL(tmp_path)
    await live.open({**_row(1)})
    assert UsageWAL(tmp_path).recover() == []  # its flock is held
    live.close_file()
    assert [r["request_id"] for r in UsageWAL(tmp_path).recover()] == ["req-1"]


async def test_rotation_keeps_open_requests_and_drops_the_rest(tmp_path: Path) -> None:
    wal = UsageWAL(tmp_path)
    await wal.open(_row(1))
    await wal.open(_row(2))
    wal.progress("req-2", 4)
    wal.close({**_row(1), "completion_tokens": 9})
    wal.rotate()
    assert len(list(tmp_path.glob("usage-*.wal"))) == 1
    wal.close_file()
    found = UsageWAL(tmp_path).recover()
    assert [(r["request_id"], r["completion_tokens"]) for r in found] == [("req-2", 4)]


async def test_meter_writes_recovered_usage_once(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = create_engine(url)
    try:
        killed_child(tmp_path / "wal")
        for _ in range(2):  # a second start finds nothing left to recover
            meter = Meter(engine, wal=UsageWAL(tmp_path / "wal"), flush_interval_s=0.05)
            meter.start()
            await meter.flush()
            await meter.close()
        async with engine.connect() as conn:
            rows = (await conn.execute(select(UsageEvent.request_id, UsageEvent.completion_tokens)
                                       .order_by(UsageEvent.request_id))).all()  # fmt: skip
            daily = (await conn.execute(select(func.sum(UsageDaily.requests)))).scalar_one()
        assert rows == [("req-0", 5), ("req-1", 7), ("req-2", 3), ("req-3", 2), ("req-4", 0),
                        ("req-5", 0)]  # fmt: skip
        assert daily == 6  # 0 doubled
        assert list((tmp_path / "wal").glob("usage-*.wal")) == []  # a clean stop leaves none
    finally:
        await engine.dispose()


async def test_wal_write_failure_refuses_new_requests(tmp_path: Path, monkeypatch) -> None:
    """A fault-injected disk: every write to the WAL fails with ENOSPC."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = create_engine(url)
    meter = Meter(engine, wal=UsageWAL(tmp_path / "wal"), flush_interval_s=0.05)
    meter.start()
    try:
        await meter.admit(record(1))

        def full(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(wal_module.os, "write", full)
        with pytest.raises(ServiceUnavailable):
            await meter.admit(record(2))
        meter.record(record(1, 3))  # the admitted one still finishes and is written
        with pytest.raises(ServiceUnavailable):
            await meter.admit(record(3))  # still refusing
        monkeypatch.undo()
        await meter.flush()  # a flush rotates to a fresh segment: accepting again
        assert meter.accepting
        await meter.admit(record(4))
    finally:
        await meter.close()
        await engine.dispose()


async def test_spool_failure_keeps_records_and_refuses(tmp_path: Path, monkeypatch) -> None:
    """Database down and the spool's disk full: nothing is dropped, new work is refused."""
    down = create_engine("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    spool = Spool(tmp_path / "usage.spool")
    meter = Meter(down, spool=spool, flush_interval_s=60)
    try:
        meter.record(record(1, 2))
        real_fsync = os.fsync

        def failing_fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr("sluice.gateway.ledger.spool.os.fsync", failing_fsync)
        with pytest.raises(NotDurable):
            await meter.flush()
        assert not meter.accepting and meter.writer.buffered == 1
        with pytest.raises(ServiceUnavailable):
            await meter.admit(record(2))
        monkeypatch.setattr("sluice.gateway.ledger.spool.os.fsync", real_fsync)
        await meter.flush()  # the spool takes it now
        assert meter.accepting and meter.writer.buffered == 0 and spool.pending() == 1
    finally:
        await down.dispose()


def _row(i: int) -> dict:
    r = record(i)
    return {name: getattr(r, name) for name in r.__dataclass_fields__}


async def test_group_commit_shares_fsyncs(tmp_path: Path, monkeypatch) -> None:
    calls = 0
    real = os.fsync

    def counting(fd: int) -> None:
        nonlocal calls
        calls += 1
        real(fd)

    wal = UsageWAL(tmp_path)
    monkeypatch.setattr(wal_module.os, "fsync", counting)
    await asyncio.gather(*(wal.open(_row(i)) for i in range(50)))
    assert 1 <= calls < 50


async def test_a_stop_with_a_request_still_open_keeps_its_segment(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = create_engine(url)
    try:
        meter = Meter(engine, wal=UsageWAL(tmp_path / "wal"))
        meter.start()
        await meter.admit(record(1))
        await meter.admit(record(2))
        meter.record(record(1, 4))
        await meter.close()  # req-2 never finished (the runtime's drain gave up on it)
        found = UsageWAL(tmp_path / "wal").recover()
        assert {r["request_id"]: r["status"] for r in found} == {"req-1": 200, "req-2": 500}
    finally:
        await engine.dispose()


async def test_progress_is_fsynced_within_a_flush_interval(tmp_path: Path, monkeypatch) -> None:
    """Against a power cut (not only kill -9): progress lines reach the disk at the next flush."""
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(wal_module.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    wal = UsageWAL(tmp_path)
    await wal.open(_row(1))
    before = len(synced)
    wal.progress("req-1", 3)
    wal.sync_soon()
    await asyncio.sleep(0.1)
    assert len(synced) == before + 1
    wal.sync_soon()  # nothing new written: no fsync
    await asyncio.sleep(0.05)
    assert len(synced) == before + 1
