"""Two `sluice serve` processes sharing Postgres and Redis hold one tenant's hard budget:
under 200 concurrent requests the tenant overspends by at most one request's reservation."""

from __future__ import annotations


import asyncio
import datetime as dt
import secrets
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from sluice.gateway.db.models import Tenant, UsageEvent
from sluice.gateway.economics.tables import Budget
from tests.conftest import (
    ECHO_CONFIG,
    ProcessServer,
)

# micro-units per million tokens: prompt at 1 unit/Mtok, completion at 2 units/Mtok
CONFIG = ECHO_CONFIG + """
[prices.echo]
input = 1000000
output = 2000000
"""
MAX_TOKENS = 50
LIMIT_MICROS = 3_000



async def test_two_replicas_hold_a_hard_budget(own_db: str, redis_url: str,
                                               tmp_path: Path) -> None:
    env = {"SLUICE_REDIS_URL": redis_url}
    servers = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        servers.append(ProcessServer(own_db, tmp_path / str(i), CONFIG,
                                     env={**env, "SLUICE_DATA_DIR": str(tmp_path / str(i))}))
    engine = create_async_engine(own_db)
    budget_id = f"bud_{secrets.token_hex(6)}"
    try:
        for server in servers:
            server.wait_ready()
        tenant = f"t-{secrets.token_hex(4)}"
        key = await servers[0].tenant_key(tenant)
        async with engine.begin() as conn:
            tenant_id = await conn.scalar(select(Tenant.id).where(Tenant.name == tenant))
            await conn.execute(Budget.__table__.insert().values(
                id=budget_id, tenant_id=tenant_id, key_id=None, period="month",
                limit_micros=LIMIT_MICROS, mode="hard", thresholds=[100], webhook_url=None,
                created_at=dt.datetime.now(dt.UTC)))

        async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
            return await client.post(
                f"{servers[i % 2].base_url}/v1/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={"model": "echo", "max_tokens": MAX_TOKENS,
                      "messages": [{"role": "user", "content": f"request number {i} of many"}]})

        async with httpx.AsyncClient(timeout=60) as client:
            replies = await asyncio.gather(*(one(client, i) for i in range(200)))
        codes = [r.status_code for r in replies]
        assert set(codes) <= {200, 429}, codes
        refused = [r for r in replies if r.status_code == 429]
        assert refused and all(r.json()["error"]["code"] == "budget_exceeded" for r in refused)
        for server in servers:
            server.stop()  # graceful: every usage row written
        async with engine.connect() as conn:
            cost, served = (await conn.execute(
                select(func.sum(UsageEvent.cost_pico), func.count())
                .where(UsageEvent.tenant_id == tenant_id, UsageEvent.status == 200))).one()
        assert served == codes.count(200) > 0
        # One request's reservation: its prompt (< 20 tokens) plus MAX_TOKENS at 2 units.
        reservation_pico = 20 * 1_000_000 + MAX_TOKENS * 2_000_000
        assert cost <= LIMIT_MICROS * 1_000_000 + reservation_pico
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.stop()
        client = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(f"sluice:budget:*{budget_id}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await engine.dispose()
