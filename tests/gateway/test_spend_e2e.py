"""Money and routing through the running gateway: every usage row priced exactly, hard
budgets refusing with 429 budget_exceeded, fallbacks across fault-injecting upstreams (one
usage row per request, never a replay after the first byte), and the response cache."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator

import httpx
import orjson
import pytest
from sqlalchemy import select

from sluice.gateway.backends.routing import GroupConfig, GroupMember
from sluice.gateway.db.models import UsageEvent
from sluice.gateway.economics.config import PriceConfig
from sluice.gateway.economics.tables import Budget
from sluice.gateway.pipeline.cache import CacheConfig
from sluice.gateway.settings import BackendConfig
from tests.conftest import (
    GatewayServer,
    echo_settings,
)
from tests.gateway.faulty_upstream import MODES, FaultyUpstream

PRICE = PriceConfig(input=7_000, output=13_000)  # micro-units per million tokens



@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultyUpstream]:
    server = FaultyUpstream().start()
    yield server
    server.stop()


def _upstream(url: str) -> BackendConfig:
    return BackendConfig(plugin="openai_upstream", options={
        "base_url": url, "models": {"m": "m"}, "timeout_s": 0.5, "answer_timeout_s": 0.5,
        "tokenizer": "none"})


@pytest.fixture
def server(own_db: str, upstream: FaultyUpstream) -> Iterator[GatewayServer]:
    backends = {"echo": BackendConfig(plugin="echo"),
                "backup": BackendConfig(plugin="echo", options={"model": "m"})}
    groups = {}
    for mode in MODES:
        backends[f"up-{mode}"] = _upstream(upstream.base_url(mode))
    # one group per fault: the faulty upstream first, the echo backup second
    settings = echo_settings(
        own_db, backends=backends,
        groups={"m": GroupConfig(backends=(GroupMember(backend="up-ok"),), strategy="ordered",
                                 backoff_s=0.01)} | groups,
        prices={"echo": PRICE, "m": PRICE}, aliases={"echo-latest": "echo"},
        cache=CacheConfig(enabled=True))
    gateway = GatewayServer(settings).start()
    yield gateway
    gateway.stop()


def _rows(server: GatewayServer, tenant: str) -> list[UsageEvent]:
    async def read() -> list[UsageEvent]:
        await server.gateway.meter.flush()
        async with server.gateway.db.connect() as conn:
            return list((await conn.execute(
                select(UsageEvent).where(UsageEvent.tenant_id == tenant)
                .order_by(UsageEvent.id))).all())
    return server.run(read())


def _tenant_id(server: GatewayServer, name: str) -> str:
    return server.run(server.gateway.accounts.tenant(name)).id


def chat(server: GatewayServer, key: str, content: str, **body: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions",
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": "echo", "messages": [{"role": "user", "content": content}],
                            **body}, timeout=30)


def content(reply: httpx.Response) -> str:
    """The answer's text, streamed (SSE deltas joined) or not."""
    if not reply.headers["content-type"].startswith("text/event-stream"):
        return reply.json()["choices"][0]["message"]["content"] or ""
    parts = []
    for line in reply.text.splitlines():
        if line.startswith("data: {"):
            for choice in orjson.loads(line[6:]).get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
    return "".join(parts)


def test_every_usage_row_is_priced_exactly(server: GatewayServer) -> None:
    tenant = f"t-{secrets.token_hex(4)}"
    key = server.tenant_key(tenant)
    for i in range(40):
        assert chat(server, key, f"hello number {i} " * (i % 7 + 1),
                    stream=bool(i % 2)).status_code == 200
    assert chat(server, key, "through an alias", model="echo-latest").json()["model"] == "echo"
    rows = _rows(server, _tenant_id(server, tenant))
    assert len(rows) == 41
    for row in rows:
        assert row.cost_pico == row.prompt_tokens * PRICE.input + row.completion_tokens * PRICE.output
        assert row.cost_pico > 0 and row.backend == "echo"
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'sluice_cost_total{backend="echo",model="echo"}' in metrics


def test_a_hard_budget_refuses_with_budget_exceeded(server: GatewayServer) -> None:
    tenant = f"t-{secrets.token_hex(4)}"
    key = server.tenant_key(tenant)
    tenant_id = _tenant_id(server, tenant)

    async def add() -> None:
        async with server.gateway.db.begin() as conn:
            await conn.execute(Budget.__table__.insert().values(
                id=f"bud_{secrets.token_hex(6)}", tenant_id=tenant_id, key_id=None,
                period="day", limit_micros=30, mode="hard", thresholds=[50, 100],
                webhook_url=None, created_at=dt.datetime.now(dt.UTC)))
    server.run(add())
    # Each request reserves its worst case: ~10 prompt tokens x 7,000 + 200 x 13,000 pico
    # (max_tokens 200) = 2.7 micro-units, and settles at its real cost (well under).
    statuses = [chat(server, key, "a few words", max_tokens=200).status_code for _ in range(30)]
    assert 200 in statuses and statuses[-1] == 429
    refused = chat(server, key, "a few words", max_tokens=200)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "budget_exceeded"
    assert 0 < int(refused.headers["retry-after"]) <= 86400 + 1
    rows = _rows(server, tenant_id)
    assert sum(r.cost_pico for r in rows) <= 30 * 1_000_000  # never past the hard limit


@pytest.mark.parametrize("fault", ["500", "429", "timeout", "reset", "die-before"])
@pytest.mark.parametrize("stream", [False, True])
def test_fallback_to_the_next_backend_before_the_first_byte(
        own_db: str, upstream: FaultyUpstream, fault: str, stream: bool) -> None:
    backends = {"flaky": _upstream(upstream.base_url(fault)),
                "backup": BackendConfig(plugin="echo", options={"model": "m"})}
    group = GroupConfig(backends=(GroupMember(backend="flaky"), GroupMember(backend="backup")),
                        strategy="ordered", backoff_s=0.01)
    gateway = GatewayServer(echo_settings(own_db, backends=backends,
                                          groups={"m": group})).start()
    try:
        tenant = f"t-{secrets.token_hex(4)}"
        key = gateway.tenant_key(tenant)
        before = upstream.hits[fault]
        reply = chat(gateway, key, "served by the backup", model="m", stream=stream)
        assert reply.status_code == 200
        assert content(reply) == "served by the backup"
        assert upstream.hits[fault] == before + 1
        rows = _rows(gateway, _tenant_id(gateway, tenant))
        assert [(r.backend, r.status) for r in rows] == [("backup", 200)]
    finally:
        gateway.stop()


def test_a_stream_that_dies_after_its_first_token_is_never_replayed(
        own_db: str, upstream: FaultyUpstream) -> None:
    backends = {"flaky": _upstream(upstream.base_url("die-after")),
                "backup": BackendConfig(plugin="echo", options={"model": "m"})}
    group = GroupConfig(backends=(GroupMember(backend="flaky"), GroupMember(backend="backup")),
                        strategy="ordered")
    gateway = GatewayServer(echo_settings(own_db, backends=backends,
                                          groups={"m": group})).start()
    try:
        tenant = f"t-{secrets.token_hex(4)}"
        key = gateway.tenant_key(tenant)
        reply = chat(gateway, key, "never replayed", model="m", stream=True)
        assert content(reply) == "partial" and '"error"' in reply.text  # the backup never ran
        rows = _rows(gateway, _tenant_id(gateway, tenant))
        assert len(rows) == 1 and rows[0].backend == "flaky" and rows[0].completion_tokens >= 1
    finally:
        gateway.stop()


def test_deterministic_requests_are_cached_per_tenant(server: GatewayServer) -> None:
    tenant, other = f"t-{secrets.token_hex(4)}", f"t-{secrets.token_hex(4)}"
    key, other_key = server.tenant_key(tenant), server.tenant_key(other)
    first = chat(server, key, "cache me", temperature=0)
    again = chat(server, key, "cache me", temperature=0)
    streamed = chat(server, key, "cache me", temperature=0, stream=True)
    assert first.json()["choices"] == again.json()["choices"]
    assert content(streamed) == content(first) == "cache me"
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert chat(server, other_key, "cache me", temperature=0).status_code == 200
    sampled = [chat(server, key, "sampled", temperature=1) for _ in range(2)]
    assert all(r.status_code == 200 for r in sampled)
    no_cache = httpx.post(f"{server.base_url}/v1/chat/completions",
                          headers={"authorization": f"Bearer {key}", "cache-control": "no-cache"},
                          json={"model": "echo", "temperature": 0,
                                "messages": [{"role": "user", "content": "cache me"}]})
    assert no_cache.status_code == 200
    rows = _rows(server, _tenant_id(server, tenant))
    assert [r.backend for r in rows] == ["echo", "cache", "cache", "echo", "echo", "echo"]
    assert [r.cost_pico == 0 for r in rows] == [False, True, True, False, False, False]
    assert [r.backend for r in _rows(server, _tenant_id(server, other))] == ["echo"]
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'sluice_cache_requests_total{result="hit"}' in metrics


def test_prices_and_budgets_through_the_admin_api(server: GatewayServer) -> None:
    from sluice.gateway.accounts.auth import issue_admin_token

    admin = {"authorization": "Bearer "
             + issue_admin_token(server.settings.admin_jwt_secret, "ops", 300)}
    base = f"{server.base_url}/admin/api"
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    made = httpx.post(f"{base}/prices/echo", headers=admin,
                      json={"input": 9_000, "output": 15_000, "effective_from": later})
    assert made.status_code == 201, made.text
    listed = httpx.get(f"{base}/prices", headers=admin).json()
    assert [p["input"] for p in listed["history"]["echo"]] == [PRICE.input, 9_000]
    assert [p["input"] for p in listed["data"] if p["model"] == "echo"] == [PRICE.input]
    for bad in ({"input": -1, "output": 1}, {"input": 1}, {"input": 1, "output": 1, "x": 1},
                {"input": 1, "output": 1, "effective_from": "2001-01-01T00:00:00Z"},
                {"input": 10**30, "output": 1}):
        refused = httpx.post(f"{base}/prices/echo", headers=admin, json=bad)
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(f"{base}/prices/nope", headers=admin,
                      json={"input": 1, "output": 1}).status_code == 404

    tenant = f"t-{secrets.token_hex(4)}"
    server.tenant_key(tenant)
    budget = httpx.post(f"{base}/tenants/{tenant}/budgets", headers=admin,
                        json={"period": "month", "limit_micros": 1_000_000, "mode": "soft"})
    assert budget.status_code == 201, budget.text
    assert budget.json()["mode"] == "soft" and budget.json()["thresholds"] == [50, 80, 100]
    for bad in ({"period": "week", "limit_micros": 1}, {"period": "day", "limit_micros": 0},
                {"period": "day", "limit_micros": 1, "thresholds": [0]},
                {"period": "day", "limit_micros": 1, "webhook_url": "ftp://x"}):
        assert httpx.post(f"{base}/tenants/{tenant}/budgets", headers=admin,
                          json=bad).status_code == 400, bad
    other_key = httpx.post(f"{base}/tenants/{tenant}/budgets", headers=admin,
                           json={"period": "day", "limit_micros": 5, "key_id": "key_of_another"})
    assert other_key.status_code == 404
    listed = httpx.get(f"{base}/tenants/{tenant}/budgets", headers=admin).json()["data"]
    assert [b["id"] for b in listed] == [budget.json()["id"]]
    assert httpx.delete(f"{base}/budgets/{budget.json()['id']}", headers=admin).status_code == 204
    assert httpx.get(f"{base}/tenants/{tenant}/budgets", headers=admin).json()["data"] == []
    spend = httpx.get(f"{base}/spend", headers=admin, params={"tenant": tenant})
    assert spend.status_code == 200 and spend.json()["data"] == []
    assert httpx.get(f"{base}/prices").status_code == 401
