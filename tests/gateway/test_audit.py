"""Audit log: keyed hash chain, tamper detection, append-only enforcement, outage spooling.

Runs against a Postgres database of its own (created, migrated with alembic, dropped) and
an SQLite file for the embedded default. The attacks on the chain itself (edit and
rechain, tail cut, chain deletion, trigger bypass) are in test_audit_tamper.py.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sluice.gateway import cli_accounting
from sluice.gateway.ledger.audit import AuditLog, prompt_digest
from sluice.gateway.ledger.chain import chain_hash
from sluice.gateway.ledger.verify import verify
from sluice.gateway.db.session import create_engine, migrate
from sluice.gateway.settings import Settings
from sluice.gateway.ledger.spool import Spool

PG_SERVER = "postgresql+asyncpg://postgres@127.0.0.1:5432"
KEY = b"test-audit-key-" + b"x" * 32


@pytest.fixture(scope="module")
async def pg_url() -> AsyncIterator[str]:
    name = f"sluice_t_{secrets.token_hex(6)}"
    admin = create_async_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = f"{PG_SERVER}/{name}"
        migrate(url)
        yield url
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(pg_url)
    yield engine
    await engine.dispose()


async def write_chain(engine: AsyncEngine, n: int, **kw: object) -> tuple[str, list[dict]]:
    instance = f"gw-{secrets.token_hex(4)}"
    audit = AuditLog(engine, instance, key=KEY, **kw)  # type: ignore[arg-type]
    records = [
        await audit.record(f"key_{i % 3}", "key.use", f"model-{i}", request_id=f"req-{i}",
                           decision="allow", details={"i": i, "tokens": [i, i * 2]})  # fmt: skip
        for i in range(n)
    ]
    await audit.close()
    return instance, records


async def row_ids(engine: AsyncEngine, instance: str) -> dict[int, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT seq, id FROM audit_log WHERE instance_id = :i"), {"i": instance}
        )
        return dict(rows.all())


async def tamper(engine: AsyncEngine, *statements: str) -> None:
    """As the superuser: switch the append-only trigger off, change rows, switch it on."""
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update_delete"))
        for stmt in statements:
            await conn.execute(text(stmt))
        await conn.execute(text("ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update_delete"))


def break_of(report, instance: str):  # type: ignore[no-untyped-def]
    return next(c.broken for c in report.chains if c.instance_id == instance)


async def test_chain_verifies_and_resumes_across_restarts(pg: AsyncEngine) -> None:
    instance, first = await write_chain(pg, 25, batch_size=7)
    # A restarted gateway with the same instance id continues the same chain.
    audit = AuditLog(pg, instance, key=KEY)
    nxt = await audit.record("admin", "tenant.create", "acme")
    await audit.close()
    assert nxt["seq"] == 26 and nxt["prev_hash"] == first[-1]["hash"]

    report = await verify(pg, KEY)
    chain = next(c for c in report.chains if c.instance_id == instance)
    assert report.ok and chain.records == 26 and chain.last_hash == nxt["hash"]
    assert first[0]["prev_hash"] == "0" * 64


async def test_edit_is_caught_naming_the_row(pg: AsyncEngine) -> None:
    instance, records = await write_chain(pg, 10)
    ids = await row_ids(pg, instance)
    await tamper(pg, f"UPDATE audit_log SET decision = 'deny' WHERE id = {ids[4]}")
    broken = break_of(await verify(pg, KEY), instance)
    assert (broken.seq, broken.row_id, broken.reason) == (4, ids[4], "hash mismatch")
    assert f"row id {ids[4]}" in str(broken)


async def test_edit_with_recomputed_hash_breaks_the_next_link(pg: AsyncEngine) -> None:
    instance, records = await write_chain(pg, 10)
    ids = await row_ids(pg, instance)
    forged = {**records[4], "decision": "deny"}  # seq 5
    forged_hash = chain_hash(forged, KEY)
    await tamper(
        pg, f"UPDATE audit_log SET decision = 'deny', hash = '{forged_hash}' WHERE id = {ids[5]}"
    )
    broken = break_of(await verify(pg, KEY), instance)
    assert (broken.seq, broken.row_id, broken.reason) == (6, ids[6], "prev_hash mismatch")


async def test_delete_is_caught_as_a_gap(pg: AsyncEngine) -> None:
    instance, _ = await write_chain(pg, 10)
    ids = await row_ids(pg, instance)
    await tamper(pg, f"DELETE FROM audit_log WHERE id IN ({ids[3]}, {ids[4]})")
    broken = break_of(await verify(pg, KEY), instance)
    assert (broken.seq, broken.row_id, broken.reason) == (5, ids[5], "gap")
    assert "seq 3..4 missing" in broken.detail


async def test_reorder_is_caught(pg: AsyncEngine) -> None:
    instance, _ = await write_chain(pg, 10)
    ids = await row_ids(pg, instance)
    # Swap the stored positions of seq 6 and 7 (content, hashes and links untouched).
    await tamper(
        pg,
        f"UPDATE audit_log SET id = -1 WHERE id = {ids[6]}",
        f"UPDATE audit_log SET id = {ids[6]} WHERE id = {ids[7]}",
        f"UPDATE audit_log SET id = {ids[7]} WHERE id = -1",
    )
    broken = break_of(await verify(pg, KEY), instance)
    assert (broken.seq, broken.row_id, broken.reason) == (7, ids[6], "reorder")


@pytest.mark.parametrize(
    "stmt", ["UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"]
)
async def test_trigger_refuses_changes_even_for_the_owner(pg: AsyncEngine, stmt: str) -> None:
    await write_chain(pg, 2)
    with pytest.raises(DBAPIError, match="append-only"):
        async with pg.begin() as conn:
            await conn.execute(text(stmt))


async def test_outage_spools_then_replays_in_order(pg: AsyncEngine, pg_url: str, tmp_path: Path):
    dbname = pg_url.rsplit("/", 1)[1]
    instance = f"gw-{secrets.token_hex(4)}"
    spool = Spool(tmp_path / "audit.spool")
    audit = AuditLog(pg, instance, key=KEY, spool=spool)
    await audit.record("a", "key.use", "m", request_id="before")
    await audit.flush()

    admin = create_async_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:  # the database goes away
        await conn.execute(text(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false'))
        await conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
            {"d": dbname},
        )
    try:
        for i in range(5):
            await audit.record("a", "key.use", "m", request_id=f"outage-{i}")
            await audit.flush()  # succeeds: the batch is fsynced in the spool
        assert spool.pending() == 5
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true'))
        await admin.dispose()

    await audit.record("a", "key.use", "m", request_id="after")
    await audit.close()
    assert spool.pending() == 0
    async with pg.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT request_id FROM audit_log WHERE instance_id = :i ORDER BY id"),
                {"i": instance},
            )
        ).scalars().all()
    assert rows == ["before", *[f"outage-{i}" for i in range(5)], "after"]
    assert break_of(await verify(pg, KEY), instance) is None


async def test_restart_replays_spool_and_skips_rows_already_stored(pg: AsyncEngine, tmp_path):
    instance, records = await write_chain(pg, 4)
    spool = Spool(tmp_path / "audit.spool")
    # A crash after the insert committed but before the spool was marked done: the same
    # batch is spooled again. Replaying it must neither duplicate nor fail.
    spool.append(records[2:])
    audit = AuditLog(pg, instance, key=KEY, spool=spool)
    nxt = await audit.record("a", "key.use", "m")
    await audit.close()
    assert nxt["seq"] == 5 and spool.pending() == 0
    chain = next(c for c in (await verify(pg, KEY)).chains if c.instance_id == instance)
    assert chain.broken is None and chain.records == 5


async def test_sqlite_chain_roundtrip(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'sluice.db'}"
    migrate(url)
    engine = create_engine(url)
    try:
        instance, records = await write_chain(engine, 12, batch_size=5)
        report = await verify(engine, KEY)
        assert report.ok and report.records == 12
        assert report.chains[0].last_hash == records[-1]["hash"]
    finally:
        await engine.dispose()


def test_prompt_digest_keeps_text_only_on_opt_in() -> None:
    expected = hashlib.sha256("héllo".encode()).hexdigest()
    assert prompt_digest("héllo", store=False) == {"prompt_sha256": expected, "prompt_chars": 5}
    assert prompt_digest("héllo", store=True)["prompt"] == "héllo"


def verify_cli(url: str, state: Path) -> int:
    parser = argparse.ArgumentParser(prog="sluice")
    cli_accounting.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", "verify", "--checkpoints", str(state / "cp")])
    return args.handler(args, Settings(database_url=url, audit_key=KEY.decode(),
                                       spool_dir=state / "spool"))


async def test_cli_verify_exit_codes(pg: AsyncEngine, pg_url: str, tmp_path: Path, capsys):
    url = f"sqlite+aiosqlite:///{tmp_path / 'ok.db'}"
    migrate(url)
    engine = create_engine(url)
    await write_chain(engine, 3)
    await engine.dispose()
    assert await asyncio.to_thread(verify_cli, url, tmp_path) == 0
    assert "audit log intact: 3 records in 1 chains" in capsys.readouterr().err

    instance, _ = await write_chain(pg, 5)
    ids = await row_ids(pg, instance)
    await tamper(pg, f"UPDATE audit_log SET target = 'other' WHERE id = {ids[2]}")
    assert await asyncio.to_thread(verify_cli, pg_url, tmp_path) == 1
    assert (f"audit log tampered: instance '{instance}' seq 2 (row id {ids[2]}): hash mismatch"
            in capsys.readouterr().err)  # fmt: skip

    down = "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"
    assert await asyncio.to_thread(verify_cli, down, tmp_path) == 2
    assert capsys.readouterr().err.startswith("error: ")


async def test_start_while_the_database_is_down_continues_the_chain(pg: AsyncEngine,
                                                                    tmp_path: Path) -> None:
    """A restart during an outage: the chain's head comes from the local head file, the
    new records wait in the spool, and the chain is whole once the database is back."""
    instance = f"gw-{secrets.token_hex(4)}"
    first = AuditLog(pg, instance, key=KEY, spool=Spool(tmp_path / "audit.spool"))
    await first.record("a", "key.use", "m", request_id="before")
    await first.close()

    down = create_engine("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    during = AuditLog(down, instance, key=KEY, spool=Spool(tmp_path / "audit.spool"))
    rec = await during.record("a", "key.use", "m", request_id="during")
    await during.close()  # spooled
    await down.dispose()
    assert rec["seq"] == 2

    after = AuditLog(pg, instance, key=KEY, spool=Spool(tmp_path / "audit.spool"))
    assert (await after.record("a", "key.use", "m", request_id="after"))["seq"] == 3
    await after.close()
    chain = next(c for c in (await verify(pg, KEY)).chains if c.instance_id == instance)
    assert chain.broken is None and chain.records == 3
