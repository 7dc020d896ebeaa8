"""How audit records and chain heads are stored: record bodies, the registry row, replays,
and the local head file a start during an outage continues from."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from sluice.gateway.db.accounting import AuditRecord
from sluice.gateway.ledger.chain import GENESIS_HASH, AuditChain, head_mac, parse_timestamp

log = logging.getLogger(__name__)
MAX_LEN = {"instance_id": 64, "actor": 128, "action": 64, "target": 256, "request_id": 64,
           "decision": 32}  # fmt: skip


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


def record_body(actor: str, action: str, target: str, request_id: str | None, decision: str | None,
          details: dict[str, Any] | None) -> dict[str, Any]:
    fields = {"actor": actor, "action": action, "target": target,
              "request_id": request_id, "decision": decision}  # fmt: skip
    for name, value in fields.items():
        if value is not None and len(value) > MAX_LEN[name]:
            raise ValueError(f"audit {name} longer than {MAX_LEN[name]} characters")
    # Round-trip through JSON now, so what we hash is exactly what the database returns.
    clean = None if details is None else json.loads(json.dumps(details, default=str))
    return {**fields, "details": clean}


def read_head(path: Path) -> tuple[int, str]:
    try:
        head = json.loads(path.read_text())
        return int(head["seq"]), str(head["hash"])
    except FileNotFoundError:
        return 0, GENESIS_HASH
    except (ValueError, KeyError, TypeError) as exc:
        raise AuditChainConflict(f"audit head file {path} is unreadable ({exc}); start with "
                                 "the database reachable") from None  # fmt: skip
