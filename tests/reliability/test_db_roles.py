"""The compose stack's database roles, set up as deploy/ does it, on a real Postgres.

deploy/postgres/init-roles.sh (run by psql as the superuser, as the postgres image runs
it) makes an owner and an app role; migrations run as the owner; `sluice db grant-app`
gives the app role its rows. The gateway's writes then work as the app role, and every
way around the audit log's trigger is refused to it. Role names are unique per run and
dropped afterwards.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from sluice.gateway.accounts.tenants import Accounts
from sluice.gateway.ledger.roles import grant_app_role
from sluice.gateway.db.session import create_engine, migrate, sessionmaker
from sluice.gateway.ledger.audit import AuditLog
from sluice.gateway.ledger.metering import Meter, UsageRecord
from sluice.gateway.ledger.verify import verify

ROOT = Path(__file__).resolve().parents[2]
SERVER = "postgresql+asyncpg://{user}@127.0.0.1:5432/{db}"
KEY = b"roles-test-key-" + b"r" * 32


@pytest.fixture
def roles() -> Iterator[tuple[str, str, str]]:
    tag = secrets.token_hex(4)
    db, owner, app = f"sluice_t_{tag}", f"sluice_t_owner_{tag}", f"sluice_t_app_{tag}"
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-v",
                    "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{db}"'], check=True,
                   capture_output=True)  # fmt: skip
    env = {**os.environ, "PGHOST": "127.0.0.1", "POSTGRES_USER": "postgres", "POSTGRES_DB": db,
           "SLUICE_OWNER_ROLE": owner, "SLUICE_APP_ROLE": app,
           "SLUICE_OWNER_PASSWORD": "o-" + tag, "SLUICE_APP_PASSWORD": "a-" + tag}  # fmt: skip
    done = subprocess.run(["sh", str(ROOT / "deploy/postgres/init-roles.sh")], env=env,
                          capture_output=True, text=True)  # fmt: skip
    try:
        assert done.returncode == 0, done.stderr
        yield db, owner, app
    finally:
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-c",
                        f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)', "-c",
                        f"DROP ROLE IF EXISTS {app}", "-c", f"DROP ROLE IF EXISTS {owner}"],
                       capture_output=True)  # fmt: skip


async def test_gateway_role_works_and_cannot_bypass_the_audit_trigger(roles) -> None:
    db, owner, app = roles
    migrate(SERVER.format(user=owner, db=db))  # as the owner, like the compose `migrate`
    owner_engine = create_async_engine(SERVER.format(user=owner, db=db))
    await grant_app_role(owner_engine, app)
    await owner_engine.dispose()

    engine = create_engine(SERVER.format(user=app, db=db))
    try:
        accounts = Accounts(sessionmaker(engine))
        await accounts.create_tenant("acme")
        audit = AuditLog(engine, "gw-roles", key=KEY)
        await audit.record("admin", "tenant.create", "acme")
        await audit.close()
        meter = Meter(engine)
        meter.record(UsageRecord(request_id="r1", tenant_id="t", key_id="k", model="echo",
                                 endpoint="chat", prompt_tokens=3, completion_tokens=2,
                                 status=200, finish_reason="stop", latency_ms=1.0, ttft_ms=None,
                                 created_at=dt.datetime.now(dt.UTC)))  # fmt: skip
        await meter.flush()
        assert meter.written == 1

        async with engine.connect() as conn:
            info = (await conn.execute(text(
                "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user"))).one()
        assert tuple(info) == (False, False)
        for stmt, why in {
            "SET session_replication_role = replica": "permission denied",
            "ALTER TABLE audit_log DISABLE TRIGGER ALL": "must be owner",
            "ALTER TABLE audit_log OWNER TO current_user": "must be owner",
            "UPDATE audit_log SET actor = 'x'": "permission denied",
            "DELETE FROM audit_log": "permission denied",
            "UPDATE alembic_version SET version_num = '0001'": "permission denied",
        }.items():
            with pytest.raises(DBAPIError, match=why):
                async with engine.begin() as conn:
                    await conn.execute(text(stmt))
        assert (await verify(engine, KEY)).ok
    finally:
        await engine.dispose()
