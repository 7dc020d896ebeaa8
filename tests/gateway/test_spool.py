"""Spool: what was appended survives crashes and is delivered in order, once per consumer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sluice.gateway.ledger.spool import Spool


def batches(n: int, size: int = 3) -> list[list[dict[str, Any]]]:
    return [[{"request_id": f"r{b}-{i}", "tokens": b * 10 + i} for i in range(size)]
            for b in range(n)]  # fmt: skip


class IdempotentSink:
    """A consumer like the metering/audit writers: keyed by request id, so a re-delivered
    batch changes nothing. Optionally fails (like a dropped connection) on one call."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.rows: dict[str, int] = {}
        self.order: list[str] = []
        self.calls = 0
        self.fail_on_call = fail_on_call

    async def __call__(self, batch: list[dict[str, Any]]) -> None:
        self.calls += 1
        for rec in batch:
            if rec["request_id"] not in self.rows:
                self.rows[rec["request_id"]] = rec["tokens"]
                self.order.append(rec["request_id"])
        if self.calls == self.fail_on_call:
            raise ConnectionError("database went away after committing")


async def test_replay_delivers_in_order_and_empties(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.spool")
    for b in batches(4):
        spool.append(b)
    assert spool.pending() == 4
    seen: list[list[dict[str, Any]]] = []

    async def consume(batch: list[dict[str, Any]]) -> None:
        seen.append(batch)

    assert await spool.replay(consume) == 4
    assert seen == batches(4) and spool.pending() == 0
    assert await spool.replay(consume) == 0
    # Compacted: only the header line is left.
    assert (tmp_path / "s.spool").read_bytes().count(b"\n") == 1


async def test_pending_batches_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    first = Spool(path)
    for b in batches(3):
        first.append(b)
    sink = IdempotentSink()
    assert await Spool(path).replay(sink) == 3  # a new process opens the same file
    assert sink.order == [r["request_id"] for b in batches(3) for r in b]


async def test_torn_last_write_is_skipped_and_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    spool = Spool(path)
    for b in batches(2):
        spool.append(b)
    whole = path.read_bytes()
    # The process died inside append(): half of a third line reached the disk.
    spool.append(batches(3)[2])
    torn = path.read_bytes()[: len(whole) + 20]
    path.write_bytes(torn)

    reopened = Spool(path)
    assert reopened.pending() == 2 and reopened.torn == 1
    assert path.read_bytes() == whole  # cut back to the last complete line
    reopened.append([{"request_id": "after-crash", "tokens": 1}])
    sink = IdempotentSink()
    assert await reopened.replay(sink) == 3
    assert sink.order[-1] == "after-crash" and len(sink.rows) == 7


async def test_corrupted_line_fails_its_checksum(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    spool = Spool(path)
    for b in batches(3):
        spool.append(b)
    data = bytearray(path.read_bytes())
    second_line = data.index(b"\n", data.index(b"\n") + 1) + 1
    data[second_line + 20] ^= 0x01  # a flipped bit in the middle batch
    path.write_bytes(bytes(data))
    sink = IdempotentSink()
    assert await Spool(path).replay(sink) == 2
    assert not any(k.startswith("r1-") for k in sink.rows)


async def test_crash_mid_replay_redelivers_and_idempotent_consumer_counts_once(tmp_path: Path):
    path = tmp_path / "s.spool"
    spool = Spool(path)
    for b in batches(5):
        spool.append(b)
    sink = IdempotentSink(fail_on_call=3)  # batch 3 is written, then the ack is lost
    with pytest.raises(ConnectionError):
        await spool.replay(sink)
    assert spool.pending() == 3

    sink.fail_on_call = None
    assert await Spool(path).replay(sink) == 3  # batch 3 again, then 4 and 5
    assert sink.calls == 6
    expected = {r["request_id"]: r["tokens"] for b in batches(5) for r in b}
    assert sink.rows == expected
    assert sink.order == list(expected)


async def test_appends_during_replay_are_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.spool")
    spool.append(batches(1)[0])
    seen: list[str] = []

    async def consume(batch: list[dict[str, Any]]) -> None:
        seen.append(batch[0]["request_id"])
        if len(seen) == 1:
            spool.append([{"request_id": "late", "tokens": 0}])

    assert await spool.replay(consume) == 2
    assert seen == ["r0-0", "late"] and spool.pending() == 0


def test_append_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "s.spool")
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    spool.append([{"request_id": "x", "tokens": 1}])
    assert len(synced) == 1
