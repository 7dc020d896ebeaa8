"""Checking the audit log: every link, every chain head, every checkpoint.

:func:`verify` walks every chain in sequence order (streamed, constant memory) and checks
each record's keyed hash and link, then compares each chain's last record with the
registry (``audit_chains``, whose rows carry a MAC) and with the newest signed checkpoint
outside the database. Between them they find:

- an edited row, even with every hash recomputed (``hash mismatch``: the key is not in
  the database);
- deleted or reordered rows inside a chain (``gap``, ``reorder``);
- a cut-off tail (``tail cut``: the registry or a checkpoint knows a later record);
- a deleted chain (``chain deleted``: in the registry or a checkpoint, no rows left);
- a registry row written without the key (``registry forged``).

:class:`Verifier` does the same incrementally for the dashboard: a full walk once, then
per view only the records appended since (plus per-chain counts, so a deletion below the
verified point triggers a re-walk of that chain). ``sluice audit verify`` is the full check.
"""

from __future__ import annotations

import dataclasses
import hmac
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice.gateway.db.accounting import AuditRecord
from sluice.gateway.ledger.chain import (
    GENESIS_HASH, AuditChain, chain_hash, head_mac, legacy_hash, legacy_mac,
)  # fmt: skip
from sluice.gateway.ledger.checkpoints import CheckpointFile, Checkpoints

BreakReason = Literal["hash mismatch", "gap", "reorder", "prev_hash mismatch", "tail cut",
                      "chain deleted", "registry forged", "checkpoint mismatch",
                      "unregistered", "unkeyed"]  # fmt: skip


@dataclass(frozen=True)
class BrokenLink:
    instance_id: str
    seq: int | None
    row_id: int | None
    reason: BreakReason
    detail: str

    def __str__(self) -> str:
        where = "" if self.seq is None else f" seq {self.seq}"
        row = "" if self.row_id is None else f" (row id {self.row_id})"
        return f"instance {self.instance_id!r}{where}{row}: {self.reason}: {self.detail}"


@dataclass
class ChainSummary:
    instance_id: str
    records: int = 0
    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    last_row_id: int = 0
    broken: BrokenLink | None = None
    legacy_until: int = 0  # records up to here have unkeyed links (sealed, pre-0005)
    legacy_hash: str | None = None  # the hash of record legacy_until, as walked


@dataclass
class VerifyReport:
    """``chains`` in instance order, each with its first finding (if any); ``problems``
    are findings about the checkpoint file itself."""

    chains: list[ChainSummary] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.broken is None for c in self.chains)

    @property
    def records(self) -> int:
        return sum(c.records for c in self.chains)

    @property
    def breaks(self) -> list[BrokenLink | str]:
        return [*(c.broken for c in self.chains if c.broken is not None), *self.problems]

    @property
    def first_break(self) -> BrokenLink | str | None:
        return next(iter(self.breaks), None)


async def verify(engine: AsyncEngine, key: bytes, *, checkpoints: CheckpointFile | None = None,
                 yield_per: int = 2000) -> VerifyReport:  # fmt: skip
    """The full check: every record of every chain, the registry and the checkpoints."""
    # Heads first: records committed meanwhile are then newer than them, never missing.
    saved = checkpoints.read() if checkpoints is not None else Checkpoints()
    registry = await _registry(engine)
    chains: dict[str, ChainSummary] = {}
    await _walk(engine, key, chains, saved, registry, None, yield_per)
    return _report(key, chains, saved, registry)


class Verifier:
    """Incremental verification for repeated views (the dashboard's audit page)."""

    def __init__(self, engine: AsyncEngine, key: bytes,
                 checkpoints: CheckpointFile | None = None) -> None:  # fmt: skip
        self.engine, self.key, self.checkpoints = engine, key, checkpoints
        self._chains: dict[str, ChainSummary] | None = None
        self._saved, self._saved_offset = Checkpoints(), 0

    async def check(self) -> VerifyReport:
        saved = self._saved
        if self.checkpoints is not None:  # only the lines appended since the last view
            self._saved_offset = self.checkpoints.read_into(saved, self._saved_offset)
        registry = await _registry(self.engine)
        if self._chains is None:
            self._chains = {}
            await _walk(self.engine, self.key, self._chains, saved, registry, None, 2000)
            return _report(self.key, self._chains, saved, registry)
        async with self.engine.connect() as conn:
            stats = (await conn.execute(
                select(AuditRecord.instance_id, func.count(), func.max(AuditRecord.seq))
                .group_by(AuditRecord.instance_id))).all()  # fmt: skip
        present = set()
        for instance_id, count, max_seq in stats:
            present.add(instance_id)
            known = self._chains.get(instance_id)
            if known is not None and known.broken is None and count == max_seq >= known.last_seq:
                if max_seq > known.last_seq:  # only what was appended since the last view
                    await _walk(self.engine, self.key, self._chains, saved, registry, known, 2000)
                continue
            sealed = registry[instance_id].legacy_until if instance_id in registry else 0
            self._chains[instance_id] = ChainSummary(instance_id, legacy_until=sealed)  # re-walk
            await _walk(self.engine, self.key, self._chains, saved, registry,
                        self._chains[instance_id], 2000)  # fmt: skip
        for gone in set(self._chains) - present:
            del self._chains[gone]
        return _report(self.key, self._chains, saved, registry)


async def _walk(engine: AsyncEngine, key: bytes, chains: dict[str, ChainSummary],
                saved: Checkpoints, registry: dict[str, Any], only: ChainSummary | None,
                yield_per: int) -> None:  # fmt: skip
    """Check records in (instance, seq) order; ``only``: that chain, after its last seq."""
    stmt = select(AuditRecord.__table__).order_by(AuditRecord.instance_id, AuditRecord.seq)
    if only is not None:
        stmt = stmt.where(AuditRecord.instance_id == only.instance_id,
                          AuditRecord.seq > only.last_seq)  # fmt: skip
    chain = only
    async with engine.connect() as conn:
        result = await conn.stream(stmt.execution_options(yield_per=yield_per))
        async for row in result.mappings():
            if chain is None or row["instance_id"] != chain.instance_id:
                name = row["instance_id"]
                sealed = registry[name].legacy_until if name in registry else 0
                chain = chains.setdefault(name, ChainSummary(name, legacy_until=sealed))
            chain.records += 1
            if chain.broken is None:
                chain.broken = _check_link(chain, key, saved, row)
            chain.last_seq, chain.last_hash, chain.last_row_id = row["seq"], row["hash"], row["id"]


def _check_link(chain: ChainSummary, key: bytes, saved: Checkpoints, row: Any) -> BrokenLink | None:
    def broken(reason: BreakReason, detail: str) -> BrokenLink:
        return BrokenLink(chain.instance_id, row["seq"], row["id"], reason, detail)

    expected = chain.last_seq + 1
    if row["seq"] < expected:
        return broken("reorder", f"seq {row['seq']} appears twice")
    if row["seq"] > expected:
        missing = f"{expected}" if row["seq"] == expected + 1 else f"{expected}..{row['seq'] - 1}"
        return broken("gap", f"seq {missing} missing")
    if chain.records > 1 and row["id"] < chain.last_row_id:
        return broken("reorder", f"stored before seq {chain.last_seq} (row id {chain.last_row_id})")
    if row["prev_hash"] != chain.last_hash:
        return broken("prev_hash mismatch", "prev_hash is not the previous record's hash")
    if row["seq"] <= chain.legacy_until:  # sealed, pre-0005: an unkeyed link
        if legacy_hash(dict(row)) != row["hash"]:
            return broken("hash mismatch", "record content does not match its (unkeyed) hash")
        if row["seq"] == chain.legacy_until:
            chain.legacy_hash = row["hash"]
    elif not hmac.compare_digest(chain_hash(dict(row), key), row["hash"]):
        if chain.records == row["seq"] == 1 and legacy_hash(dict(row)) == row["hash"]:
            return broken("unkeyed", "written before keyed chains (migration 0005): check and "
                                     "seal it with `sluice audit seal-legacy`")  # fmt: skip
        return broken("hash mismatch", "record content does not match its keyed hash")
    checkpointed = saved.heads.get(chain.instance_id)
    if checkpointed is not None and checkpointed[0] == row["seq"] and checkpointed[1] != row["hash"]:
        return broken("checkpoint mismatch", "differs from the record checkpointed outside the "
                                             "database")  # fmt: skip
    return None


async def _registry(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        return {r.instance_id: r for r in (await conn.execute(select(AuditChain))).all()}


def _report(key: bytes, chains: dict[str, ChainSummary], saved: Checkpoints,
            registry: dict[str, Any]) -> VerifyReport:  # fmt: skip
    """Copies of the walked chains, with what the registry and checkpoints add."""
    out = {name: dataclasses.replace(c) for name, c in chains.items()}

    def flag(name: str, reason: BreakReason, detail: str) -> None:
        chain = out.setdefault(name, ChainSummary(name))
        if chain.broken is None:
            chain.broken = BrokenLink(name, None, None, reason, detail)

    for name, head in registry.items():
        mac = head_mac(key, name, head.last_seq, head.last_hash)
        if not hmac.compare_digest(mac, head.mac):
            flag(name, "registry forged", "the registry's head MAC does not match")
        walked = out.get(name)
        if head.legacy_until and walked is not None and walked.records and not hmac.compare_digest(
                legacy_mac(key, name, head.legacy_until, walked.legacy_hash or ""),
                head.legacy_mac or ""):  # fmt: skip
            flag(name, "registry forged", "the legacy seal's MAC does not match")
        _compare(out.get(name), name, head.last_seq, head.last_hash, "the registry", flag)
    for name, (seq, last_hash) in saved.heads.items():
        _compare(out.get(name), name, seq, last_hash, "a signed checkpoint", flag)
    for name in out.keys() - registry.keys():
        flag(name, "unregistered", "records of a chain the registry does not list")
    return VerifyReport(chains=[out[n] for n in sorted(out)], problems=list(saved.bad_lines))


def _compare(chain: ChainSummary | None, name: str, seq: int, last_hash: str, source: str,
             flag: Any) -> None:  # fmt: skip
    if chain is None or chain.records == 0:
        flag(name, "chain deleted", f"{source} knows seq {seq}; no records left")
    elif chain.last_seq < seq:
        flag(name, "tail cut", f"{source} knows seq {seq}; the last record is seq {chain.last_seq}")
    elif chain.last_seq == seq and chain.last_hash != last_hash and source == "the registry":
        flag(name, "registry forged", "the registry's last hash is not the last record's")
