"""How audit records and chain heads are stored: inserts, the registry row, replays."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from sluice.gateway.db.accounting import AuditRecord
from sluice.gateway.ledger.chain import GENESIS_HASH, AuditChain, head_mac, parse_timestamp


log = logging.getLogger(__name__)


class AuditChainConflict(Exception):
    """Another writer used this instance id: a stored record has our sequence number but a
    different hash. Instance ids must be unique among live gateways."""


async def stored_head(conn: AsyncConnection, instance_id: str, *,
                       lock: bool = False) -> tuple[int, str]:  # fmt: skip
    stmt = select(AuditChain.last_seq, AuditChain.last_hash).where(
        AuditChain.instance_id == instance_id)
    head = (await conn.execute(stmt.with_for_update() if lock else stmt)).first()
    if head is not None:
        return int(head.last_seq), head.last_hash
    # A chain from before the registry (or a registry row lost): the records say.
    last = (await conn.execute(
        select(AuditRecord.seq, AuditRecord.hash).where(AuditRecord.instance_id == instance_id)
        .order_by(AuditRecord.seq.desc()).limit(1))).first()  # fmt: skip
    return (int(last.seq), last.hash) if last is not None else (0, GENESIS_HASH)


async def move_head(conn: AsyncConnection, key: bytes, instance_id: str, seq: int,
                     last_hash: str) -> None:  # fmt: skip
    """Upsert the registry row, never backwards (a replayed old batch leaves it alone)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    values = {"instance_id": instance_id, "last_seq": seq, "last_hash": last_hash,
              "mac": head_mac(key, instance_id, seq, last_hash),
              "updated_at": dt.datetime.now(dt.UTC)}  # fmt: skip
    stmt = dialect.insert(AuditChain).values(values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["instance_id"],
        set_={name: getattr(stmt.excluded, name) for name in values if name != "instance_id"},
        where=AuditChain.last_seq < stmt.excluded.last_seq,
    )
    await conn.execute(stmt)


async def missing(conn: AsyncConnection, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    instance_id = batch[0]["instance_id"]
    result = await conn.execute(
        select(AuditRecord.seq, AuditRecord.hash).where(
            AuditRecord.instance_id == instance_id,
            AuditRecord.seq.in_([r["seq"] for r in batch]),
        )
    )
    stored = {seq: hash_ for seq, hash_ in result}
    for record in batch:
        if record["seq"] in stored and stored[record["seq"]] != record["hash"]:
            raise AuditChainConflict(
                f"audit instance {instance_id!r} seq {record['seq']} already stored with a "
                "different hash: is another gateway using this instance id?"
            )
    return [r for r in batch if r["seq"] not in stored]


def to_row(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "created_at": parse_timestamp(record["created_at"])}


async def warn_if_privileged(conn: AsyncConnection) -> None:
    """Say so at start-up when the gateway's role could switch the audit trigger off."""
    if conn.dialect.name != "postgresql":
        return
    row = (await conn.execute(text(
        "SELECT r.rolsuper, pg_has_role(current_user, t.tableowner, 'USAGE') FROM pg_roles r, "
        "pg_tables t WHERE r.rolname = current_user AND t.tablename = 'audit_log'"))).first()
    if row is not None and (row[0] or row[1]):
        log.warning("audit: the gateway's database role is a superuser or owns audit_log, so "
                    "it can switch the append-only trigger off; run the gateway as a plain "
                    "role (sluice db grant-app, docs/operations.md)")
