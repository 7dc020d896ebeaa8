"""Tamper-evident audit log: one keyed hash chain per gateway instance, one for the CLI.

:class:`AuditLog` is off the request path: ``record`` links and buffers, a
:class:`~sluice.gateway.ledger.writer.BatchWriter` writes batches; when the database is
unreachable batches go to the spool and are replayed, in order and idempotently (by
instance and sequence), once it is back. Each batch also moves the chain's head in the
registry (``audit_chains``) in the same transaction, and heads are checkpointed to a
signed file outside the database. On Postgres a trigger (migration 0002) refuses UPDATE,
DELETE and TRUNCATE; the gateway's role can neither drop it nor switch it off
(docs/operations.md). How chains are checked: ledger/verify.py.

A *shared* chain (the CLI's) has many short-lived writers: each record is written at once,
under a lock on the chain's registry row, so every CLI command extends the same chain.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sluice.gateway.db.accounting import AuditRecord
from sluice.gateway.ledger.chain import (
    CLI_CHAIN, GENESIS_HASH, canonical_timestamp, chain_hash, load_key,
    prompt_digest,
)  # fmt: skip
from sluice.gateway.errors import ServiceUnavailable
from sluice.gateway.ledger.audit_store import (
    MAX_LEN, AuditChainConflict, missing, move_head, read_head, record_body, stored_head,
    to_row, warn_if_privileged,
)  # fmt: skip
from sluice.gateway.ledger.checkpoints import CheckpointFile
from sluice.gateway.ledger.spool import Spool
from sluice.gateway.ledger.verify import Verifier, VerifyReport
from sluice.gateway.ledger.writer import DB_UNAVAILABLE, BatchWriter, NotDurable

__all__ = ["AuditChainConflict", "AuditLog", "audit_key", "checkpoint_file", "cli_audit",
           "default_instance_id", "prompt_digest"]  # fmt: skip

log = logging.getLogger(__name__)


def default_instance_id() -> str:
    """``host-pid``: unique among live processes. Set your own (e.g. a pod name) to keep
    one chain across restarts; two live writers must never share one."""
    return f"{socket.gethostname()}-{os.getpid()}"[-64:]


class AuditSettings(Protocol):
    """What the audit log reads from :class:`~sluice.gateway.settings.Settings` (a protocol,
    so the ledger does not import the settings module)."""

    @property
    def data_dir(self) -> Path: ...
    @property
    def audit_key(self) -> str: ...
    @property
    def audit_key_file(self) -> Path | None: ...
    @property
    def audit_checkpoints(self) -> Path | None: ...


def audit_key(settings: AuditSettings) -> bytes:
    path = settings.audit_key_file or settings.data_dir / "audit_key"
    return load_key(settings.audit_key, path)


def checkpoint_file(settings: AuditSettings, key: bytes) -> CheckpointFile:
    return CheckpointFile(settings.audit_checkpoints or settings.data_dir / "audit.checkpoints",
                          key)  # fmt: skip


def cli_audit(engine: AsyncEngine, settings: AuditSettings) -> AuditLog:
    """The CLI's audit log: every command appends to the one persistent ``cli`` chain."""
    key = audit_key(settings)
    return AuditLog(engine, CLI_CHAIN, key=key, shared=True,
                    checkpoints=checkpoint_file(settings, key))


class AuditLog:
    """Buffered, batched, keyed hash-chain writer for one chain."""

    def __init__(
        self,
        engine: AsyncEngine,
        instance_id: str,
        *,
        key: bytes,
        spool: Spool | None = None,
        checkpoints: CheckpointFile | None = None,
        checkpoint_interval_s: float = 5.0,
        shared: bool = False,
        batch_size: int = 200,
        flush_interval_s: float = 0.2,
        max_buffer: int = 10_000,
    ) -> None:
        if not instance_id or len(instance_id) > MAX_LEN["instance_id"]:
            raise ValueError("audit instance_id must be 1..64 characters")
        self.engine = engine
        self.instance_id = instance_id
        self.key = key
        self.checkpoints = checkpoints
        self.checkpoint_interval_s = checkpoint_interval_s
        self.shared = shared
        self.max_buffer = max_buffer
        self.writer = BatchWriter(f"audit {instance_id}", self._insert, spool=spool,
                                  batch_size=batch_size, flush_interval_s=flush_interval_s,
                                  on_durable=self._save_head)  # fmt: skip
        # The chain's head as last made durable, so a start while the database is down
        # continues the chain instead of forking it.
        self._head_path = None if spool is None else spool.path.with_name(spool.path.name + ".head")
        self._saved_seq = -1
        self._seq = 0
        self._last_hash = GENESIS_HASH
        self._started = False
        self._closed = False
        self._start_lock = asyncio.Lock()
        self._checkpointed_at = 0.0
        self._verifier: Verifier | None = None

    @property
    def last_seq(self) -> int:
        return self._seq

    async def verify(self) -> VerifyReport:
        """Every chain checked, incrementally: only records added since the last call
        are walked (the dashboard's audit page; ``sluice audit verify`` checks all)."""
        if self._verifier is None:
            self._verifier = Verifier(self.engine, self.key, self.checkpoints)
        return await self._verifier.check()

    async def start(self) -> None:
        """Replay anything spooled, resume this chain from the database and start the
        background writer. ``record`` calls it on first use."""
        async with self._start_lock:
            if self._started:
                return
            if not self.shared:
                try:
                    await self.writer.replay()
                    async with self.engine.connect() as conn:
                        self._seq, self._last_hash = await stored_head(conn, self.instance_id)
                        await warn_if_privileged(conn)
                except DB_UNAVAILABLE as exc:
                    if self._head_path is None:
                        raise
                    self._seq, self._last_hash = read_head(self._head_path)
                    log.warning("audit: database unreachable at start (%s); chain %s continues "
                                "from its local head, seq %d", exc, self.instance_id, self._seq)
                self._saved_seq = self._seq
                self.writer.start()
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
        """Link and buffer one event; returns the record (with ``seq`` and ``hash``).
        Durable after the next :meth:`flush` (at most ``flush_interval_s`` later); on a
        shared chain, durable when this returns."""
        if self._closed:
            raise RuntimeError("AuditLog is closed")
        if not self._started:
            await self.start()
        body = record_body(actor, action, target, request_id, decision, details)
        if self.shared:
            return await self._append_locked(body)
        if self.writer.buffered >= self.max_buffer:
            try:  # backpressure instead of unbounded memory
                await self.flush()
            except NotDurable:
                raise ServiceUnavailable("the audit log cannot be written right now; try "
                                         "again shortly") from None  # fmt: skip
        # No await from here on: sequence numbers follow call order.
        self._seq, record = self._seq + 1, self._link(self._seq + 1, self._last_hash, body)
        self._last_hash = record["hash"]
        self.writer.add(record)
        return record

    async def record_in(self, conn: AsyncConnection, actor: str, action: str, target: str, *,
                        decision: str | None = None,
                        details: dict[str, Any] | None = None) -> dict[str, Any]:
        """Append to this shared chain inside the caller's transaction (``conn``): the
        caller's change and its audit record commit together or not at all. Pass the
        record to :meth:`committed` once the transaction has committed. (edge, issue 18)"""
        if not self.shared:
            raise RuntimeError("record_in needs a shared chain (its head is locked per append)")
        body = record_body(actor, action, target, None, decision, details)
        seq, last = await stored_head(conn, self.instance_id, lock=True)
        record = self._link(seq + 1, last, body)
        await self._store(conn, [record])
        return record

    async def committed(self, record: dict[str, Any]) -> None:
        """A :meth:`record_in` record's transaction committed: checkpoint the new head."""
        self._seq, self._last_hash = record["seq"], record["hash"]
        await self._checkpoint(force=True)

    async def flush(self) -> None:
        """Make every record so far durable (database, or the spool while it is down)."""
        await self.writer.flush()

    async def close(self) -> None:
        self._closed = True
        await self.writer.close()

    def _link(self, seq: int, prev_hash: str, body: dict[str, Any]) -> dict[str, Any]:
        record = {"instance_id": self.instance_id, "seq": seq,
                  "created_at": canonical_timestamp(dt.datetime.now(dt.UTC)),
                  **body, "prev_hash": prev_hash}  # fmt: skip
        record["hash"] = chain_hash(record, self.key)
        return record

    def _save_head(self) -> None:
        if self._head_path is None or self._saved_seq == self._seq:
            return
        tmp = self._head_path.with_name(self._head_path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump({"seq": self._seq, "hash": self._last_hash}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._head_path)
        except OSError as exc:
            log.error("audit: cannot save the chain head to %s: %s", self._head_path, exc)
            return
        self._saved_seq = self._seq

    async def _append_locked(self, body: dict[str, Any]) -> dict[str, Any]:
        for _ in range(20):  # SQLite has no row locks: a concurrent writer means retry
            try:
                async with self.engine.begin() as conn:
                    seq, last = await stored_head(conn, self.instance_id, lock=True)
                    record = self._link(seq + 1, last, body)
                    await self._store(conn, [record])
            except IntegrityError:
                await asyncio.sleep(0.05)
                continue
            self._seq, self._last_hash = record["seq"], record["hash"]
            await self._checkpoint(force=True)
            return record
        raise AuditChainConflict(f"audit chain {self.instance_id!r}: too many concurrent writers")

    async def _insert(self, batch: list[dict[str, Any]]) -> None:
        """Insert a batch and move the head; rows already stored with the same hash (a
        replay) are skipped."""
        try:
            async with self.engine.begin() as conn:
                await self._store(conn, batch)
        except IntegrityError:
            async with self.engine.begin() as conn:
                await self._store(conn, await missing(conn, batch))
        await self._checkpoint()

    async def _store(self, conn: AsyncConnection, batch: list[dict[str, Any]]) -> None:
        if not batch:
            return
        await conn.execute(insert(AuditRecord), [to_row(r) for r in batch])
        last = max(batch, key=lambda r: r["seq"])
        await move_head(conn, self.key, self.instance_id, last["seq"], last["hash"])

    async def _checkpoint(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.checkpoints is None or (not force and now - self._checkpointed_at <
                                        self.checkpoint_interval_s):  # fmt: skip
            return
        self._checkpointed_at = now
        async with self.engine.connect() as conn:
            seq, last = await stored_head(conn, self.instance_id)
        await self.writer.run_io(self.checkpoints.append, {self.instance_id: (seq, last)})
