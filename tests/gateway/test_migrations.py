"""Alembic migrations upgrade from empty to head and downgrade back, on both databases."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import inspect

from sluice.gateway.db.session import create_engine, migrate
from tests.conftest import drop_postgres_database, make_postgres_database


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    await engine.dispose()
    return names - {"alembic_version"}


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_upgrade_downgrade_upgrade(dialect: str, tmp_path: Path) -> None:
    if dialect == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
        migrate(url)
    else:
        url = make_postgres_database("sluice_mig")
    try:
        expected = {"tenants", "api_keys", "usage_events", "usage_daily", "admins", "audit_log",
                    "dashboard_revoked_sessions"}
        assert expected <= asyncio.run(_tables(url))
        migrate(url, "base", downgrade=True)
        assert asyncio.run(_tables(url)) == set()
        migrate(url)
        assert expected <= asyncio.run(_tables(url))
    finally:
        if dialect == "postgres":
            drop_postgres_database(url)
