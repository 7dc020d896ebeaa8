"""The attacks of issue 18 on the audit log, as someone with database access makes them.

Each test writes real chains on a Postgres database of its own (migrated with alembic),
attacks them as the superuser (or as the gateway's plain role, where that is the point)
and checks that ``verify`` (and ``sluice audit verify``) names the attack, or that the
database refuses it. The gateway's role is created with a unique name and dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import insert, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sluice.gateway import cli_accounting
from sluice.gateway.ledger.roles import RoleError, grant_app_role
from sluice.gateway.db.session import create_engine, migrate
from sluice.gateway.ledger.audit import AuditLog, cli_audit
from sluice.gateway.db.accounting import AuditRecord
from sluice.gateway.ledger.chain import (
    CLI_CHAIN, AuditChain, canonical_json, chain_hash, head_mac, legacy_hash,
)  # fmt: skip
from sluice.gateway.ledger.checkpoints import CheckpointFile
from sluice.gateway.ledger.verify import Verifier, verify
from sluice.gateway.settings import Settings

PG_SERVER = "postgresql+asyncpg://postgres@127.0.0.1:5432"
KEY = b"tamper-test-key-" + b"k" * 32


@pytest.fixture
async def db() -> AsyncIterator[tuple[str, AsyncEngine]]:
    """A fresh database per test: findings of one attack do not leak into the next."""
    name = f"sluice_t_{secrets.token_hex(6)}"
    admin = create_async_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{PG_SERVER}/{name}"
    migrate(url)
    engine = create_engine(url)
    try:
        yield url, engine
    finally:
        await engine.dispose()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        await admin.dispose()


async def write(engine: AsyncEngine, n: int, *, instance: str = "gw-1",
                checkpoints: CheckpointFile | None = None) -> list[dict]:  # fmt: skip
    audit = AuditLog(engine, instance, key=KEY, checkpoints=checkpoints, batch_size=4,
                     checkpoint_interval_s=0)  # fmt: skip
    records = [await audit.record("admin", "key.revoke", f"key_{i}", decision="allow",
                                  details={"i": i}) for i in range(n)]  # fmt: skip
    await audit.close()
    return records


async def superuser(engine: AsyncEngine, *statements: str) -> None:
    """The attacker with the database's keys: trigger off (replica mode), change, back."""
    async with engine.begin() as conn:
        await conn.execute(text("SET LOCAL session_replication_role = replica"))
        for stmt in statements:
            await conn.execute(text(stmt))


def finding(report, instance: str):  # type: ignore[no-untyped-def]
    return next(c.broken for c in report.chains if c.instance_id == instance)


async def test_untouched_chains_verify(db, tmp_path: Path) -> None:
    _, engine = db
    cps = CheckpointFile(tmp_path / "cp", KEY)
    await write(engine, 9, checkpoints=cps)
    await write(engine, 3, instance="gw-2", checkpoints=cps)
    report = await verify(engine, KEY, checkpoints=cps)
    assert report.ok and report.records == 12 and len(report.chains) == 2
    assert cps.read().heads["gw-1"][0] == 9


async def test_edit_and_rechain_is_detected(db) -> None:
    """Edit a row and recompute every hash after it, as one could with an unkeyed chain
    (plain SHA-256, or HMAC under a guessed key), registry head included."""
    _, engine = db
    records = await write(engine, 8)
    forged, prev = [], records[2]["prev_hash"]
    for r in records[2:]:
        r = {**r, "prev_hash": prev, "decision": "deny" if r["seq"] == 3 else r["decision"]}
        r["hash"] = prev = hashlib.sha256((r["prev_hash"] + canonical_json(r)).encode()).hexdigest()
        forged.append(r)
    await superuser(engine, *(
        f"UPDATE audit_log SET decision = '{r['decision']}', prev_hash = '{r['prev_hash']}', "
        f"hash = '{r['hash']}' WHERE instance_id = 'gw-1' AND seq = {r['seq']}" for r in forged),
        f"UPDATE audit_chains SET last_hash = '{prev}' WHERE instance_id = 'gw-1'")  # fmt: skip
    report = await verify(engine, KEY)
    broken = finding(report, "gw-1")
    assert (broken.seq, broken.reason) == (3, "hash mismatch") and not report.ok


async def test_tail_cut_is_detected_by_the_registry(db) -> None:
    _, engine = db
    await write(engine, 10)
    await superuser(engine, "DELETE FROM audit_log WHERE instance_id = 'gw-1' AND seq > 7")
    broken = finding(await verify(engine, KEY), "gw-1")
    assert broken.reason == "tail cut" and "knows seq 10" in broken.detail


async def test_tail_cut_with_a_rewritten_registry_is_detected(db, tmp_path: Path) -> None:
    """The attacker also moves the registry back: without the key its MAC is wrong; with an
    older registry row saved earlier (valid MAC), the signed checkpoint still knows more."""
    _, engine = db
    cps = CheckpointFile(tmp_path / "cp", KEY)
    records = await write(engine, 10, checkpoints=cps)
    await superuser(engine, "DELETE FROM audit_log WHERE instance_id = 'gw-1' AND seq > 7",
                    f"UPDATE audit_chains SET last_seq = 7, last_hash = '{records[6]['hash']}' "
                    "WHERE instance_id = 'gw-1'")  # fmt: skip
    assert finding(await verify(engine, KEY), "gw-1").reason == "registry forged"

    replayed = head_mac(KEY, "gw-1", 7, records[6]["hash"])  # as read by the attacker earlier
    await superuser(engine, f"UPDATE audit_chains SET mac = '{replayed}' WHERE instance_id = 'gw-1'")
    assert (await verify(engine, KEY)).ok  # registry and rows agree now ...
    broken = finding(await verify(engine, KEY, checkpoints=cps), "gw-1")
    assert broken.reason == "tail cut" and "a signed checkpoint knows seq 10" in broken.detail


async def test_chain_deletion_is_detected(db, tmp_path: Path) -> None:
    _, engine = db
    cps = CheckpointFile(tmp_path / "cp", KEY)
    await write(engine, 5, instance="gw-keep", checkpoints=cps)
    await write(engine, 4, instance="gw-gone", checkpoints=cps)
    await superuser(engine, "DELETE FROM audit_log WHERE instance_id = 'gw-gone'")
    assert finding(await verify(engine, KEY), "gw-gone").reason == "chain deleted"
    # ... and its registry row too: the checkpoint outside the database remembers it.
    await superuser(engine, "DELETE FROM audit_chains WHERE instance_id = 'gw-gone'")
    report = await verify(engine, KEY, checkpoints=cps)
    assert finding(report, "gw-gone").reason == "chain deleted"
    assert finding(report, "gw-keep") is None


async def test_forged_checkpoint_line_is_reported(db, tmp_path: Path) -> None:
    _, engine = db
    cps = CheckpointFile(tmp_path / "cp", KEY)
    await write(engine, 3, checkpoints=cps)
    CheckpointFile(cps.path, b"not-the-key" * 4).append({"gw-1": (1, "0" * 64)})
    report = await verify(engine, KEY, checkpoints=cps)
    assert not report.ok and "bad signature" in report.problems[0]


async def test_gateway_role_cannot_bypass_the_trigger(db) -> None:
    """The app's role (granted by `sluice db grant-app`) writes the log but cannot change
    rows, disable the trigger or switch to replica mode (which skips triggers)."""
    url, engine = db
    role = f"sluice_t_app_{secrets.token_hex(4)}"
    dbname = url.rsplit("/", 1)[1]
    async with engine.begin() as conn:
        await conn.execute(text(f"CREATE ROLE {role} LOGIN NOSUPERUSER"))
        await conn.execute(text(f'GRANT CONNECT ON DATABASE "{dbname}" TO {role}'))
    await grant_app_role(engine, role)
    app = create_engine(f"{PG_SERVER.replace('postgres@', f'{role}@')}/{dbname}")
    try:
        await write(app, 3)  # the gateway works as this role
        refused = {
            "SET session_replication_role = replica": "permission denied",
            "ALTER TABLE audit_log DISABLE TRIGGER ALL": "must be owner",
            "DROP TRIGGER audit_log_no_update_delete ON audit_log": "must be owner",
            "UPDATE audit_log SET decision = 'deny'": "permission denied",
            "DELETE FROM audit_log": "permission denied",
            "TRUNCATE audit_log": "permission denied",
            "DELETE FROM audit_chains": "permission denied",
        }
        for stmt, why in refused.items():
            with pytest.raises(DBAPIError, match=why):
                async with app.begin() as conn:
                    await conn.execute(text(stmt))
        assert (await verify(app, KEY)).ok
    finally:
        await app.dispose()
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP OWNED BY {role}"))
            await conn.execute(text(f"DROP ROLE {role}"))
    with pytest.raises(RoleError, match="superuser or owns"):
        await grant_app_role(engine, "postgres")


async def test_trigger_bypass_by_the_owner_is_detected(db) -> None:
    """The owner (or a superuser) can skip the trigger; the keyed chain still tells."""
    _, engine = db
    await write(engine, 6)
    await superuser(engine, "UPDATE audit_log SET target = 'key_x' WHERE seq = 4")
    broken = finding(await verify(engine, KEY), "gw-1")
    assert (broken.seq, broken.reason) == (4, "hash mismatch")


async def test_cli_commands_share_one_persistent_chain(db, tmp_path: Path) -> None:
    _, engine = db
    settings = Settings(database_url="sqlite://", audit_key=KEY.decode(),
                        spool_dir=tmp_path / "spool")  # fmt: skip

    async def one_command(target: str) -> dict:
        audit = cli_audit(engine, settings)  # a new CLI process each time
        record = await audit.record("cli:ops", "key.revoke", target)
        await audit.close()
        return record

    records = await asyncio.gather(*(one_command(f"key_{i}") for i in range(6)))
    assert sorted(r["seq"] for r in records) == [1, 2, 3, 4, 5, 6]
    cps = CheckpointFile(tmp_path / "audit.checkpoints", KEY)
    report = await verify(engine, KEY, checkpoints=cps)
    assert report.ok and [c.instance_id for c in report.chains] == [CLI_CHAIN]
    # Deleting one key.revoke leaves a trace now: a gap, or a tail cut for the last one.
    await superuser(engine, "DELETE FROM audit_log WHERE seq = 3")
    assert finding(await verify(engine, KEY), CLI_CHAIN).reason == "gap"


async def test_verifier_is_incremental_and_still_catches_deletions(db) -> None:
    _, engine = db
    await write(engine, 20)
    verifier = Verifier(engine, KEY)
    assert (await verifier.check()).records == 20
    await write(engine, 5)  # the same chain continues
    report = await verifier.check()
    assert report.ok and report.records == 25
    await superuser(engine, "DELETE FROM audit_log WHERE seq = 2")  # below the verified point
    assert finding(await verifier.check(), "gw-1").reason == "gap"


async def test_cli_verify_reports_each_attack(db, tmp_path: Path, capsys) -> None:
    url, engine = db
    cps = CheckpointFile(tmp_path / "cp", KEY)
    await write(engine, 4, instance="gw-edit", checkpoints=cps)
    await write(engine, 4, instance="gw-cut", checkpoints=cps)
    await write(engine, 4, instance="gw-gone", checkpoints=cps)
    await superuser(engine, "UPDATE audit_log SET actor = 'x' WHERE instance_id = 'gw-edit' "
                    "AND seq = 2", "DELETE FROM audit_log WHERE instance_id = 'gw-cut' AND seq = 4",
                    "DELETE FROM audit_log WHERE instance_id = 'gw-gone'",
                    "DELETE FROM audit_chains WHERE instance_id = 'gw-gone'")  # fmt: skip
    parser = argparse.ArgumentParser(prog="sluice")
    cli_accounting.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", "verify", "--json", "--checkpoints", str(cps.path)])
    settings = Settings(database_url=url, audit_key=KEY.decode(), spool_dir=tmp_path / "s")
    assert await asyncio.to_thread(args.handler, args, settings) == 1
    out = capsys.readouterr()
    reasons = {c["instance_id"]: c["reason"] for c in json.loads(out.out)["chains"]}
    assert reasons == {"gw-edit": "hash mismatch", "gw-cut": "tail cut", "gw-gone": "chain deleted"}
    assert out.err.count("audit log tampered:") == 3


async def test_verification_cost_per_page_view(db) -> None:
    """The audit page used to re-verify the whole log per view (~1 s at 20k rows)."""
    _, engine = db
    rows, head = _bulk_chain(20_000)
    async with engine.begin() as conn:  # 20,000 keyed records, inserted in bulk
        await conn.execute(insert(AuditRecord), rows)
        await conn.execute(insert(AuditChain), [head])
    verifier = Verifier(engine, KEY)
    start = time.perf_counter()
    first = await verifier.check()
    full_s = time.perf_counter() - start
    await write(engine, 10, instance="gw-bulk")
    start = time.perf_counter()
    again = await verifier.check()
    incremental_s = time.perf_counter() - start
    print(f"[audit] full verify of 20,000 rows {full_s:.3f} s; next view {incremental_s:.3f} s")
    assert first.ok and again.ok and again.records == 20_010
    assert incremental_s < full_s / 5


def _bulk_chain(n: int) -> tuple[list[dict], dict]:
    rows, prev = [], "0" * 64
    for seq in range(1, n + 1):
        r = {"instance_id": "gw-bulk", "seq": seq, "created_at": "2026-12-01T00:00:00.000000Z",
             "actor": "a", "action": "key.use", "target": "t", "request_id": None,
             "decision": "allow", "details": None, "prev_hash": prev}  # fmt: skip
        r["hash"] = prev = chain_hash(r, KEY)
        rows.append({**r, "created_at": dt.datetime(2026, 12, 1, tzinfo=dt.UTC)})
    head = {"instance_id": "gw-bulk", "last_seq": n, "last_hash": prev,
            "mac": head_mac(KEY, "gw-bulk", n, prev), "updated_at": dt.datetime.now(dt.UTC)}
    return rows, head


async def test_verifier_reads_new_checkpoint_lines(db, tmp_path: Path) -> None:
    _, engine = db
    cps = CheckpointFile(tmp_path / "cp", KEY)
    first = await write(engine, 5, checkpoints=cps)
    verifier = Verifier(engine, KEY, cps)
    assert (await verifier.check()).ok
    await write(engine, 5, checkpoints=cps)  # seq 6..10, checkpointed after the first view
    old = head_mac(KEY, "gw-1", 5, first[-1]["hash"])  # a registry row saved by the attacker
    await superuser(engine, "DELETE FROM audit_log WHERE seq > 5",
                    f"UPDATE audit_chains SET last_seq = 5, last_hash = '{first[-1]['hash']}', "
                    f"mac = '{old}'")  # fmt: skip
    assert finding(await verifier.check(), "gw-1").reason == "tail cut"


async def _legacy_chain(engine: AsyncEngine, name: str, n: int) -> list[dict]:
    """A chain as written before migration 0005: plain SHA-256 links, no registry row."""
    rows, prev = [], "0" * 64
    for seq in range(1, n + 1):
        r = {"instance_id": name, "seq": seq, "created_at": "2026-11-30T00:00:00.000000Z",
             "actor": "cli", "action": "key.revoke", "target": f"key_{seq}", "request_id": None,
             "decision": "allow", "details": {"seq": seq}, "prev_hash": prev}  # fmt: skip
        r["hash"] = prev = legacy_hash(r)
        rows.append(r)
    async with engine.begin() as conn:
        await conn.execute(insert(AuditRecord), [
            {**r, "created_at": dt.datetime(2026, 11, 30, tzinfo=dt.UTC)} for r in rows])
    return rows


def _cli(argv: list[str], settings: Settings) -> int:
    parser = argparse.ArgumentParser(prog="sluice")
    cli_accounting.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args, settings)  # type: ignore[no-any-return]


async def test_legacy_chains_are_named_then_sealed(db, tmp_path: Path, capsys) -> None:
    url, engine = db
    settings = Settings(database_url=url, audit_key=KEY.decode(), spool_dir=tmp_path / "s")
    rows = await _legacy_chain(engine, "gw-old", 5)
    assert finding(await verify(engine, KEY), "gw-old").reason == "unkeyed"
    await write(engine, 2, instance="gw-old")  # a gateway went on writing it after upgrading
    assert finding(await verify(engine, KEY), "gw-old").reason == "unkeyed"

    assert await asyncio.to_thread(_cli, ["audit", "seal-legacy"], settings) == 0
    assert "sealed: gw-old (unkeyed records 1..5)" in capsys.readouterr().err
    report = await verify(engine, KEY)
    assert report.ok and {c.instance_id for c in report.chains} == {"gw-old", CLI_CHAIN}
    assert await asyncio.to_thread(_cli, ["audit", "seal-legacy"], settings) == 0  # idempotent

    # After the seal, rewriting the unkeyed part (recomputing its SHA-256 links) is found.
    forged, prev = [], rows[1]["hash"]
    for r in rows[2:]:
        r = {**r, "prev_hash": prev, "target": "key_x" if r["seq"] == 3 else r["target"]}
        r["hash"] = prev = legacy_hash(r)
        forged.append(r)
    await superuser(engine, *(
        f"UPDATE audit_log SET target = '{r['target']}', prev_hash = '{r['prev_hash']}', "
        f"hash = '{r['hash']}' WHERE instance_id = 'gw-old' AND seq = {r['seq']}"
        for r in forged))  # fmt: skip
    assert not (await verify(engine, KEY)).ok


async def test_a_checkpointed_chain_is_never_sealed_as_legacy(db, tmp_path: Path, capsys) -> None:
    """A keyed chain rewritten wholesale into SHA-256 links (registry row deleted) must not
    be laundered by seal-legacy: the checkpoint file knows it."""
    url, engine = db
    cps = CheckpointFile(tmp_path / "cp", KEY)
    await write(engine, 3, instance="gw-k", checkpoints=cps)
    await superuser(engine, "DELETE FROM audit_log WHERE instance_id = 'gw-k'",
                    "DELETE FROM audit_chains WHERE instance_id = 'gw-k'")
    await _legacy_chain(engine, "gw-k", 3)
    settings = Settings(database_url=url, audit_key=KEY.decode(), spool_dir=tmp_path / "s")
    code = await asyncio.to_thread(_cli, ["audit", "seal-legacy", "--checkpoints",
                                          str(cps.path)], settings)  # fmt: skip
    assert code == 1 and "not sealed: gw-k a signed checkpoint knows it" in capsys.readouterr().err
    assert finding(await verify(engine, KEY, checkpoints=cps), "gw-k").reason == "unkeyed"
