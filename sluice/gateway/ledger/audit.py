"""Tamper-evident audit log: one SHA-256 hash chain per gateway instance.

Each record's ``hash`` is ``sha256(prev_hash + canonical_json(record))``, where the
canonical form has sorted keys, no whitespace and a fixed UTC timestamp format
(``2026-01-31T12:00:00.000000Z``). Editing, deleting or reordering rows therefore breaks
the chain at a row that :func:`verify` names. On Postgres a trigger (migration 0002) also
refuses UPDATE, DELETE and TRUNCATE outright.

:class:`AuditLog` is off the request path: ``record`` hashes and buffers, a background task
writes batches; when the database is unreachable batches go to a :class:`~gateway.spool.Spool`
and are replayed, in order and idempotently (by instance and sequence), once it is back.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice.gateway.db.accounting import AuditRecord
from sluice.gateway.ledger.spool import Spool

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
HASHED_FIELDS = (
    "instance_id", "seq", "created_at", "actor", "action", "target",
    "request_id", "decision", "details", "prev_hash",
)  # fmt: skip
_MAX_LEN = {"instance_id": 64, "actor": 128, "action": 64, "target": 256, "request_id": 64,
            "decision": 32}  # fmt: skip
# What a failed write looks like when the database is down or unreachable.
DB_UNAVAILABLE = (SQLAlchemyError, OSError, asyncio.TimeoutError)


class AuditChainConflict(Exception):
    """Another writer used this instance id: a stored record has our sequence number but a
    different hash. Instance ids must be unique among live gateways."""


def canonical_timestamp(ts: dt.datetime) -> str:
    if ts.tzinfo is None:  # SQLite hands back naive datetimes; we only ever store UTC
        ts = ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(record: dict[str, Any]) -> str:
    body = {name: record[name] for name in HASHED_FIELDS}
    if isinstance(body["created_at"], dt.datetime):
        body["created_at"] = canonical_timestamp(body["created_at"])
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)  # fmt: skip


def chain_hash(record: dict[str, Any]) -> str:
    """The hash a record must carry, given its fields and its ``prev_hash``."""
    return hashlib.sha256((record["prev_hash"] + canonical_json(record)).encode()).hexdigest()


def prompt_digest(text: str, store: bool) -> dict[str, Any]:
    """What the audit log keeps of a prompt: its SHA-256 and length, and the text itself
    only when the tenant opted in (``tenants.store_prompts``)."""
    digest: dict[str, Any] = {
        "prompt_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "prompt_chars": len(text),
    }
    if store:
        digest["prompt"] = text
    return digest


def default_instance_id() -> str:
    """``host-pid``: unique among live processes. Set your own (e.g. a pod name) to keep
    one chain across restarts; two live writers must never share one."""
    return f"{socket.gethostname()}-{os.getpid()}"[-64:]


class AuditLog:
    """Buffered, batched, hash-chained audit writer for one gateway instance."""

    def __init__(
        self,
        engine: AsyncEngine,
        instance_id: str,
        *,
        spool: Spool | None = None,
        batch_size: int = 200,
        flush_interval_s: float = 0.2,
        max_buffer: int = 10_000,
    ) -> None:
        if not instance_id or len(instance_id) > _MAX_LEN["instance_id"]:
            raise ValueError("audit instance_id must be 1..64 characters")
        self.engine = engine
        self.instance_id = instance_id
        self.spool = spool
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_buffer = max_buffer
        self._buffer: list[dict[str, Any]] = []
        self._seq = 0
        self._last_hash = GENESIS_HASH
        self._started = False
        self._closed = False
        self._start_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def last_seq(self) -> int:
        return self._seq

    async def start(self) -> None:
        """Replay anything spooled, resume this instance's chain from the database and start
        the background writer. ``record`` calls it on first use."""
        async with self._start_lock:
            if self._started:
                return
            if self.spool is not None and self.spool.pending():
                await self.spool.replay(self._insert)
            async with self.engine.connect() as conn:
                last = (
                    await conn.execute(
                        select(AuditRecord.seq, AuditRecord.hash)
                        .where(AuditRecord.instance_id == self.instance_id)
                        .order_by(AuditRecord.seq.desc())
                        .limit(1)
                    )
                ).first()
            if last is not None:
                self._seq, self._last_hash = int(last.seq), last.hash
            self._task = asyncio.create_task(self._run(), name=f"audit-writer-{self.instance_id}")
            self._started = True

    async def record(
        self,
        actor: str,
        action: str,
        target: str,
        *,
        request_id: str | None = None,
        decision: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Chain and buffer one event; returns the record (with ``seq`` and ``hash``).
        Durable after the next :meth:`flush` (at most ``flush_interval_s`` later)."""
        if self._closed:
            raise RuntimeError("AuditLog is closed")
        if not self._started:
            await self.start()
        if len(self._buffer) >= self.max_buffer:
            await self.flush()  # backpressure instead of unbounded memory
        fields = {"actor": actor, "action": action, "target": target,
                  "request_id": request_id, "decision": decision}  # fmt: skip
        for name, value in fields.items():
            if value is not None and len(value) > _MAX_LEN[name]:
                raise ValueError(f"audit {name} longer than {_MAX_LEN[name]} characters")
        # Round-trip through JSON now, so what we hash is exactly what the database returns.
        clean_details = None if details is None else json.loads(json.dumps(details, default=str))
        # No await from here on: sequence numbers follow call order.
        self._seq += 1
        record = {
            "instance_id": self.instance_id,
            "seq": self._seq,
            "created_at": canonical_timestamp(dt.datetime.now(dt.UTC)),
            **fields,
            "details": clean_details,
            "prev_hash": self._last_hash,
        }
        record["hash"] = self._last_hash = chain_hash(record)
        self._buffer.append(record)
        if len(self._buffer) >= self.batch_size:
            self._wake.set()
        return record

    async def flush(self) -> None:
        """Make every record so far durable: in the database, or in the spool if the database
        is unreachable. Without a spool a database error propagates (records stay buffered)."""
        async with self._write_lock:
            while self._buffer:
                batch = self._buffer[: self.batch_size]
                await self._write(batch)
                del self._buffer[: len(batch)]

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except DB_UNAVAILABLE as exc:  # no spool: keep the records, try again later
                log.warning("audit: database write failed, %d records buffered: %s",
                            len(self._buffer), exc)  # fmt: skip
            except AuditChainConflict:
                log.exception("audit: chain conflict; records kept in buffer")

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        if self.spool is None:
            await self._insert(batch)
            return
        if self.spool.pending():
            # Older batches are waiting: keep chain order by queueing behind them.
            await asyncio.to_thread(self.spool.append, batch)
            await self._replay_spool()
            return
        try:
            await self._insert(batch)
        except DB_UNAVAILABLE as exc:
            log.warning("audit: database write failed, spooling %d records: %s", len(batch), exc)
            await asyncio.to_thread(self.spool.append, batch)

    async def _replay_spool(self) -> None:
        assert self.spool is not None
        try:
            await self.spool.replay(self._insert)
        except DB_UNAVAILABLE as exc:
            log.warning("audit: database still unavailable, %d batches spooled: %s",
                        self.spool.pending(), exc)  # fmt: skip

    async def _insert(self, batch: list[dict[str, Any]]) -> None:
        """Insert a batch; rows already stored with the same hash (a replay) are skipped."""
        rows = [_to_row(r) for r in batch]
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(AuditRecord), rows)
        except IntegrityError:
            await self._insert_missing(rows)

    async def _insert_missing(self, rows: list[dict[str, Any]]) -> None:
        by_instance: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_instance.setdefault(row["instance_id"], []).append(row)
        async with self.engine.begin() as conn:
            missing = []
            for instance_id, group in by_instance.items():
                result = await conn.execute(
                    select(AuditRecord.seq, AuditRecord.hash).where(
                        AuditRecord.instance_id == instance_id,
                        AuditRecord.seq.in_([r["seq"] for r in group]),
                    )
                )
                stored = {seq: hash_ for seq, hash_ in result}
                for row in group:
                    if row["seq"] not in stored:
                        missing.append(row)
                    elif stored[row["seq"]] != row["hash"]:
                        raise AuditChainConflict(
                            f"audit instance {instance_id!r} seq {row['seq']} already stored "
                            "with a different hash: is another gateway using this instance id?"
                        )
            if missing:
                await conn.execute(insert(AuditRecord), missing)


def _to_row(record: dict[str, Any]) -> dict[str, Any]:
    row = dict(record)
    row["created_at"] = dt.datetime.strptime(row["created_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=dt.UTC
    )
    return row


# -- verification --------------------------------------------------------------------------

BreakReason = Literal["hash mismatch", "gap", "reorder", "prev_hash mismatch"]


@dataclass(frozen=True)
class BrokenLink:
    instance_id: str
    seq: int
    row_id: int
    reason: BreakReason
    detail: str

    def __str__(self) -> str:
        return (f"instance {self.instance_id!r} seq {self.seq} (row id {self.row_id}): "
                f"{self.reason}: {self.detail}")  # fmt: skip


@dataclass
class ChainSummary:
    instance_id: str
    records: int = 0
    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    broken: BrokenLink | None = None


@dataclass
class VerifyReport:
    """``chains`` in instance order, each with its first broken link (if any). The last
    seq/hash per chain are worth keeping elsewhere: cutting off a chain's tail is the one
    change a hash chain alone cannot show."""

    chains: list[ChainSummary] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.broken is None for c in self.chains)

    @property
    def records(self) -> int:
        return sum(c.records for c in self.chains)

    @property
    def breaks(self) -> list[BrokenLink]:
        return [c.broken for c in self.chains if c.broken is not None]

    @property
    def first_break(self) -> BrokenLink | None:
        return next(iter(self.breaks), None)


async def verify(engine: AsyncEngine, *, yield_per: int = 2000) -> VerifyReport:
    """Walk every chain in sequence order (streamed, constant memory)."""
    report = VerifyReport()
    chain: ChainSummary | None = None
    prev_id = 0
    stmt = (
        select(AuditRecord.__table__)
        .order_by(AuditRecord.instance_id, AuditRecord.seq)
        .execution_options(yield_per=yield_per)
    )
    async with engine.connect() as conn:
        result = await conn.stream(stmt)
        async for row in result.mappings():
            if chain is None or row["instance_id"] != chain.instance_id:
                chain = ChainSummary(row["instance_id"])
                report.chains.append(chain)
            chain.records += 1
            if chain.broken is None:
                chain.broken = _check_link(chain, prev_id, row)
            chain.last_seq, chain.last_hash, prev_id = row["seq"], row["hash"], row["id"]
    return report


def _check_link(chain: ChainSummary, prev_id: int, row: Any) -> BrokenLink | None:
    def broken(reason: BreakReason, detail: str) -> BrokenLink:
        return BrokenLink(chain.instance_id, row["seq"], row["id"], reason, detail)

    expected = chain.last_seq + 1
    if row["seq"] < expected:
        return broken("reorder", f"seq {row['seq']} appears twice")
    if row["seq"] > expected:
        missing = f"{expected}" if row["seq"] == expected + 1 else f"{expected}..{row['seq'] - 1}"
        return broken("gap", f"seq {missing} missing")
    if chain.records > 1 and row["id"] < prev_id:
        return broken("reorder", f"stored before seq {chain.last_seq} (row id {prev_id})")
    if row["prev_hash"] != chain.last_hash:
        return broken("prev_hash mismatch", "prev_hash is not the previous record's hash")
    if chain_hash(dict(row)) != row["hash"]:
        return broken("hash mismatch", "record content does not match its hash")
    return None
