"""Sealing chains written before keyed chains (migration 0005): ``sluice audit seal-legacy``.

Their links are plain SHA-256, which anyone with database access can recompute. Sealing
checks such a chain (every link, in order: records 1..k unkeyed, then keyed if a gateway
went on writing it after the upgrade) and records the boundary k with a MAC in the
registry, so later edits, cuts or deletions are found like any keyed chain's. What was
done to a legacy chain *before* it is sealed cannot be told apart from what was written:
seal right after upgrading. A chain that a signed checkpoint already knows is keyed and is
never sealed (that would let a rewritten keyed chain pass as legacy).
"""

from __future__ import annotations

import datetime as dt
import hmac
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice.gateway.db.accounting import AuditRecord
from sluice.gateway.ledger.chain import (
    GENESIS_HASH, AuditChain, chain_hash, head_mac, legacy_hash, legacy_mac,
)  # fmt: skip


@dataclass(frozen=True)
class Sealed:
    instance_id: str
    legacy_until: int  # records 1..legacy_until are unkeyed
    hash_at_until: str
    problem: str | None = None  # why it was not sealed


async def seal_legacy(engine: AsyncEngine, key: bytes, checkpointed: set[str]) -> list[Sealed]:
    """Seal every chain that starts with unkeyed links and is not sealed yet."""
    async with engine.connect() as conn:
        names = (await conn.execute(select(AuditRecord.instance_id).distinct())).scalars().all()
        registry = {r.instance_id: r for r in (await conn.execute(select(AuditChain))).all()}
    done = []
    for name in sorted(names):
        if name in registry and registry[name].legacy_until:
            continue  # sealed already
        found = await _boundary(engine, key, name)
        if found.legacy_until == 0 and found.problem is None:
            continue  # keyed from its first record
        if found.problem is None and name in checkpointed:
            found = Sealed(name, 0, "", "a signed checkpoint knows it as keyed")
        if found.problem is None:
            await _register(engine, key, name, found, registry.get(name))
        done.append(found)
    return done


async def _boundary(engine: AsyncEngine, key: bytes, name: str) -> Sealed:
    """Walk one chain: unkeyed links first, then (optionally) keyed ones, nothing else."""
    prev, until, until_hash, keyed = GENESIS_HASH, 0, "", False
    stmt = select(AuditRecord.__table__).where(AuditRecord.instance_id == name).order_by(
        AuditRecord.seq)
    async with engine.connect() as conn:
        result = await conn.stream(stmt.execution_options(yield_per=2000))
        expected = 1
        async for row in result.mappings():
            record = dict(row)
            if row["seq"] != expected or row["prev_hash"] != prev:
                return Sealed(name, 0, "", f"seq {row['seq']}: gap, reorder or broken link")
            if not keyed and legacy_hash(record) == row["hash"]:
                until, until_hash = row["seq"], row["hash"]
            elif hmac.compare_digest(chain_hash(record, key), row["hash"]):
                keyed = True
            else:
                return Sealed(name, 0, "", f"seq {row['seq']}: matches neither link")
            prev, expected = row["hash"], expected + 1
    return Sealed(name, until, until_hash)


async def _register(engine: AsyncEngine, key: bytes, name: str, found: Sealed,
                    head: object | None) -> None:  # fmt: skip
    seal = {"legacy_until": found.legacy_until,
            "legacy_mac": legacy_mac(key, name, found.legacy_until, found.hash_at_until)}
    async with engine.begin() as conn:
        if head is not None:
            await conn.execute(update(AuditChain).where(AuditChain.instance_id == name,
                                                        AuditChain.legacy_until == 0).values(seal))
            return
        last = (await conn.execute(
            select(AuditRecord.seq, AuditRecord.hash).where(AuditRecord.instance_id == name)
            .order_by(AuditRecord.seq.desc()).limit(1))).one()  # fmt: skip
        await conn.execute(AuditChain.__table__.insert().values(
            instance_id=name, last_seq=last.seq, last_hash=last.hash,
            mac=head_mac(key, name, last.seq, last.hash), updated_at=dt.datetime.now(dt.UTC),
            **seal))  # fmt: skip
