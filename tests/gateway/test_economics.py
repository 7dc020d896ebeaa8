"""Prices, exact costs and budgets against the real Postgres and Redis."""

from __future__ import annotations


import asyncio
import datetime as dt
import random
import secrets

import orjson
import pytest
import redis.asyncio as aioredis
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine

from sluice.gateway.db.models import UsageDaily, UsageEvent
from sluice.gateway.economics.budgets import BudgetExceeded, Budgets, micros_up
from sluice.gateway.economics.prices import (
    Price,
    PriceConfig,
    PriceTable,
    add_price,
    load_prices,
    sync_config_prices,
)
from sluice.gateway.economics.spend_store import MemorySpendStore, RedisSpendStore
from sluice.gateway.economics.tables import Budget
from sluice.gateway.ledger.metering import UsageRecord, write_usage

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)



def test_cost_is_exact_integer_arithmetic() -> None:
    price = Price("m", T0, input=150_000, output=600_000, cached_input=75_000)
    # 1,000 prompt tokens (200 of them cached) and 500 completion tokens, in pico-units
    assert price.cost(1000, 500, cached_tokens=200) == 800 * 150_000 + 200 * 75_000 + 500 * 600_000
    assert price.cost(10, 0, cached_tokens=50) == 10 * 75_000  # cached never exceeds the prompt


def test_a_price_version_applies_from_its_effective_time_only() -> None:
    later = T0 + dt.timedelta(days=10)
    table = PriceTable([Price("m", later, 2, 20, 2), Price("m", T0, 1, 10, 1)])
    assert table.cost("m", T0 - dt.timedelta(seconds=1), 5, 5) == 0  # before any price
    assert table.cost("m", T0, 5, 5) == 5 + 50
    assert table.cost("m", later - dt.timedelta(microseconds=1), 5, 5) == 5 + 50
    assert table.cost("m", later, 5, 5) == 10 + 100
    assert table.cost("unpriced", later, 5, 5) == 0
    assert [p.input for p in table.history("m")] == [1, 2]


async def test_price_history_in_the_database(own_db: str) -> None:
    engine = create_async_engine(own_db)
    try:
        model = f"m-{secrets.token_hex(3)}"
        await sync_config_prices(engine, {model: PriceConfig(input=100, output=300)})
        await sync_config_prices(engine, {model: PriceConfig(input=100, output=300)})  # no-op
        with pytest.raises(ValueError, match="past"):
            await add_price(engine, model, PriceConfig(input=1, output=1, effective_from=T0),
                            source="admin")
        change = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
        await add_price(engine, model, PriceConfig(input=200, output=900, effective_from=change),
                        source="admin")
        table = PriceTable(await load_prices(engine))
        assert len(table.history(model)) == 2
        assert table.cost(model, change - dt.timedelta(seconds=1), 3, 1) == 3 * 100 + 300
        assert table.cost(model, change, 3, 1) == 3 * 200 + 900
    finally:
        await engine.dispose()


async def test_cost_column_equals_tokens_times_price_over_10000_rows(own_db: str) -> None:
    engine = create_async_engine(own_db)
    rng = random.Random(7)
    tenant = f"ten_{secrets.token_hex(6)}"
    change = T0 + dt.timedelta(days=3)
    table = PriceTable([Price("a", T0, 150_000, 600_000, 75_000),
                        Price("a", change, 170_000, 610_000, 85_000),
                        Price("b", T0, 3, 7, 3)])
    records = []
    for i in range(10_000):
        model = rng.choice(["a", "b"])
        at = T0 + dt.timedelta(seconds=rng.randrange(6 * 86400))
        prompt, completion = rng.randrange(1, 40_000), rng.randrange(0, 4_000)
        records.append(UsageRecord(
            request_id=f"req-{tenant}-{i}", tenant_id=tenant, key_id="key_x", model=model,
            endpoint="chat", prompt_tokens=prompt, completion_tokens=completion, status=200,
            finish_reason="stop", latency_ms=1.0, ttft_ms=None, created_at=at,
            cost_pico=table.cost(model, at, prompt, completion)))
    try:
        await write_usage(engine, [{f: getattr(r, f) for f in r.__slots__} for r in records])
        async with engine.connect() as conn:
            rows = (await conn.execute(select(UsageEvent).where(UsageEvent.tenant_id == tenant))).all()
            assert len(rows) == 10_000
            for row in rows:
                price = table.price_at(row.model, row.created_at)
                assert row.cost_pico == (row.prompt_tokens * price.input
                                         + row.completion_tokens * price.output)
            # The rollup's cost is the exact sum of its rows' costs.
            daily = (await conn.execute(text(
                "SELECT d.day, d.model, d.cost_pico, "
                "(SELECT sum(e.cost_pico) FROM usage_events e WHERE e.tenant_id = d.tenant_id "
                " AND e.model = d.model AND e.created_at::date = d.day) FROM usage_daily d "
                "WHERE d.tenant_id = :t"), {"t": tenant})).all()
            assert daily and all(row[2] == row[3] for row in daily)
            total = (await conn.execute(select(UsageDaily.cost_pico).where(
                UsageDaily.tenant_id == tenant))).scalars().all()
            assert sum(total) == sum(r.cost_pico for r in records)
    finally:
        await engine.dispose()


async def _budget(engine, tenant: str, limit: int, *, mode: str = "hard", key_id: str | None = None,
                  period: str = "month", webhook: str | None = None) -> str:
    budget_id = f"bud_{secrets.token_hex(6)}"
    async with engine.begin() as conn:
        await conn.execute(Budget.__table__.insert().values(
            id=budget_id, tenant_id=tenant, key_id=key_id, period=period, limit_micros=limit,
            mode=mode, thresholds=[50, 80, 100], webhook_url=webhook,
            created_at=dt.datetime.now(dt.UTC)))
    return budget_id


async def test_two_replicas_sharing_redis_overspend_by_at_most_one_reservation(
        own_db: str, redis_url: str) -> None:
    """200 concurrent requests through two replicas' budget enforcement, each reserving its
    worst case and settling to a real cost at most that: spend never passes the limit plus
    one reservation, and every refusal is a hard-budget refusal."""
    engine = create_async_engine(own_db)
    tenant = f"ten_{secrets.token_hex(6)}"
    prefix = f"sluice-test-{secrets.token_hex(4)}:"
    limit = 50_000  # micro-units
    await _budget(engine, tenant, limit)
    replicas = [Budgets(engine, RedisSpendStore(aioredis.Redis.from_url(redis_url)),
                        key_prefix=prefix) for _ in range(2)]
    rng = random.Random(11)
    reservation_pico = 1_000 * 1_000_000  # 1,000 micro-units per request at worst
    spent_pico = 0
    refused = 0

    async def one(i: int) -> None:
        nonlocal spent_pico, refused
        replica = replicas[i % 2]
        try:
            held = await replica.reserve(tenant, "key_a", reservation_pico)
        except BudgetExceeded:
            refused += 1
            return
        await asyncio.sleep(rng.random() / 100)
        actual = rng.randrange(reservation_pico // 2, reservation_pico + 1)
        await replica.settle(held, actual)
        spent_pico += micros_up(actual)

    try:
        await asyncio.gather(*(one(i) for i in range(200)))
        assert refused > 0
        # Real costs never exceed reservations here, so the hard limit holds exactly.
        assert spent_pico <= limit
        client = aioredis.Redis.from_url(redis_url)
        counters = [k async for k in client.scan_iter(f"{prefix}*") if b":alert:" not in k]
        await client.aclose()
        assert len(counters) == 1
        assert await replicas[0].store.spent(counters[0].decode()) == spent_pico
        with pytest.raises(BudgetExceeded):
            await replicas[1].reserve(tenant, "key_a", reservation_pico)
    finally:
        client = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        for replica in replicas:
            await replica.close()
        await engine.dispose()


async def test_soft_budgets_warn_and_alert_once_per_threshold(own_db: str) -> None:
    engine = create_async_engine(own_db)
    tenant = f"ten_{secrets.token_hex(6)}"
    await _budget(engine, tenant, 1_000, mode="soft", key_id="key_a")
    await _budget(engine, tenant, 10**9, key_id="key_other")  # another key's: not applied
    alerts: list[dict] = []

    async def sink(event: dict) -> None:
        alerts.append(event)

    budgets = Budgets(engine, MemorySpendStore(), alert_sink=sink)
    try:
        for _ in range(12):  # 12 x 100 micro-units against a soft limit of 1,000
            held = await budgets.reserve(tenant, "key_a", 100 * 1_000_000)
            await budgets.settle(held, 100 * 1_000_000)
        await asyncio.sleep(0)
        await asyncio.gather(*budgets._tasks)
        assert held is not None and held.warnings  # past the limit, yet served
        assert sorted(a["threshold_percent"] for a in alerts) == [50, 80, 100]
        assert {a["key_id"] for a in alerts} == {"key_a"}
    finally:
        await budgets.close()
        await engine.dispose()


async def test_a_period_starts_from_the_usage_already_written(own_db: str) -> None:
    """A fresh spend counter (new replica, Redis restarted) is seeded from the rollup."""
    engine = create_async_engine(own_db)
    tenant = f"ten_{secrets.token_hex(6)}"
    await _budget(engine, tenant, 5_000, period="day")
    now = dt.datetime.now(dt.UTC)
    await write_usage(engine, [dict(
        request_id=f"r-{tenant}", tenant_id=tenant, key_id="key_a", model="a", endpoint="chat",
        prompt_tokens=1, completion_tokens=1, status=200, finish_reason="stop", latency_ms=1.0,
        ttft_ms=None, created_at=now, cost_pico=4_900 * 1_000_000, backend=None)])
    budgets = Budgets(engine, MemorySpendStore())
    try:
        with pytest.raises(BudgetExceeded) as refused:
            await budgets.reserve(tenant, "key_a", 200 * 1_000_000)
        assert refused.value.retry_after_s <= 86400
        held = await budgets.reserve(tenant, "key_a", 100 * 1_000_000)
        assert held is not None
    finally:
        await budgets.close()
        await engine.dispose()


async def test_threshold_webhook_is_retried_until_delivered(own_db: str) -> None:
    """The alert's webhook answers 503 once, then 200: delivered on the second try, and
    the audit sink sees it delivered."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        received.append(await reader.readexactly(length))
        status = b"503 Busy" if len(received) == 1 else b"200 OK"
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    engine = create_async_engine(own_db)
    tenant = f"ten_{secrets.token_hex(6)}"
    await _budget(engine, tenant, 1_000, mode="soft", webhook=f"http://127.0.0.1:{port}/hook")
    alerts: list[dict] = []

    async def sink(event: dict) -> None:
        alerts.append(event)

    budgets = Budgets(engine, MemorySpendStore(), alert_sink=sink)
    try:
        held = await budgets.reserve(tenant, "key_a", 600 * 1_000_000)
        await budgets.settle(held, 600 * 1_000_000)  # crosses 50%
        await asyncio.gather(*budgets._tasks)
        assert len(received) == 2  # one failure, one retry
        assert orjson.loads(received[1])["threshold_percent"] == 50
        assert [a["delivered"] for a in alerts] == [True]
    finally:
        server.close()
        await budgets.close()
        await engine.dispose()


async def test_requests_recovered_after_a_crash_are_priced(tmp_path) -> None:  # noqa: ANN001
    """A process killed with requests in flight leaves them in its usage WAL; the next
    start writes them once, priced at the price in force when they were admitted."""
    from sluice.gateway.db.session import create_engine, migrate
    from sluice.gateway.ledger.metering import Meter
    from sluice.gateway.ledger.wal import UsageWAL
    from sluice.gateway.state import _price_recovered
    from tests.gateway.test_wal import killed_child

    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = create_engine(url)
    table = PriceTable([Price("echo", T0, input=3, output=5, cached_input=3)])
    try:
        killed_child(tmp_path / "wal")
        meter = Meter(engine, wal=UsageWAL(tmp_path / "wal"), flush_interval_s=0.05)
        meter.start(price=lambda record: _price_recovered(table, record))
        await meter.flush()
        await meter.close()
        async with engine.connect() as conn:
            rows = (await conn.execute(select(UsageEvent))).all()
        assert len(rows) == 6
        assert all(r.cost_pico == r.prompt_tokens * 3 + r.completion_tokens * 5 > 0
                   for r in rows)
    finally:
        await engine.dispose()
