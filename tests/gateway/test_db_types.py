"""Timestamps come back aware and in UTC from both databases, whatever went in."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy import func, select

from sluice.gateway.db.models import ApiKey, Tenant
from sluice.gateway.db.session import create_engine, sessionmaker

PLUS_TWO = dt.timezone(dt.timedelta(hours=2))


async def _round_trip(url: str) -> tuple[dt.datetime, dt.datetime | None, dt.datetime]:
    engine = create_engine(url)
    try:
        async with sessionmaker(engine)() as session:
            tenant = Tenant(name=f"utc-{dt.datetime.now().timestamp()}")
            session.add(tenant)
            await session.flush()
            key = ApiKey(tenant_id=tenant.id, prefix=tenant.id[-12:], secret_hash="x",
                         # 12:00 at UTC+2 and a naive 10:00 (taken as UTC) are one instant
                         expires_at=dt.datetime(2030, 1, 1, 12, 0, tzinfo=PLUS_TWO),
                         revoked_at=dt.datetime(2030, 1, 1, 10, 0))
            session.add(key)
            await session.commit()
            key_id = key.id
        async with sessionmaker(engine)() as session:
            loaded = await session.get(ApiKey, key_id)
            assert loaded is not None
            latest = (await session.execute(
                select(func.max(ApiKey.expires_at)).where(ApiKey.id == key_id))).scalar_one()
            return loaded.expires_at, loaded.revoked_at, latest  # type: ignore[return-value]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_timestamps_are_aware_utc_on_every_database(database: str,
                                                     request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("sqlite_url" if database == "sqlite" else "postgres_url")
    expires, revoked, latest = asyncio.run(_round_trip(url))
    instant = dt.datetime(2030, 1, 1, 10, 0, tzinfo=dt.UTC)
    for value in (expires, revoked, latest):
        assert value == instant
        assert value.tzinfo is dt.UTC
