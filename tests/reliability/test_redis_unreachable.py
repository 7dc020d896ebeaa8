"""Redis unreachable: the limiter follows ``on_store_error`` and never answers 500.

`sluice serve` runs with SLUICE_REDIS_URL on a port nobody listens on and a tenant whose
rpm makes the limiter consult the store on every request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    ECHO_CONFIG,
    ProcessServer,
    drop_postgres_database,
    free_port,
    make_postgres_database,
)
from tests.reliability.support import report, request_body

REQUESTS = 24


@pytest.fixture(scope="module")
def database_url() -> str:
    url = make_postgres_database("sluice_redis")
    yield url  # type: ignore[misc]
    drop_postgres_database(url)


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_limiter_follows_its_mode(mode: str, database_url: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    config = ECHO_CONFIG + f'\n[ratelimit]\non_store_error = "{mode}"\n'
    server = ProcessServer(database_url, tmp_path, config=config)
    try:
        server.wait_ready()
        key = asyncio.run(_limited_key(server, f"redis-{mode}"))
        statuses, retry_after = [], []
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            for i in range(REQUESTS):
                path, body, _ = request_body(i)
                r = client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
                statuses.append(r.status_code)
                if r.status_code == 503:
                    retry_after.append(r.headers.get_list("retry-after"))
                    assert r.json()["error"]["type"]  # OpenAI's error shape
                if r.status_code == 200 and body.get("stream"):
                    assert r.text.rstrip().endswith("data: [DONE]")
        report(f"redis_unreachable_{mode}", requests=REQUESTS,
               statuses={s: statuses.count(s) for s in sorted(set(statuses))},
               server_errors=sum(s >= 500 and s != 503 for s in statuses),
               retry_after_headers=retry_after[:1])
        assert 500 not in statuses
        if mode == "open":
            assert statuses == [200] * REQUESTS
        else:
            assert statuses == [503] * REQUESTS
            assert all(values and all(int(v) >= 1 for v in values) for values in retry_after)
            assert_one_retry_after(retry_after)
    finally:
        server.stop()


async def _limited_key(server: ProcessServer, tenant: str) -> str:
    from sluice.gateway.accounts.tenants import Accounts
    from sluice.gateway.db.session import create_engine, sessionmaker

    engine = create_engine(server.database_url)
    try:
        await Accounts(sessionmaker(engine)).create_tenant(tenant, rpm=10_000)
    finally:
        await engine.dispose()
    return await server.tenant_key(tenant)


def assert_one_retry_after(values: list[list[str]]) -> None:
    """Exactly one Retry-After per 503 (the limiter's and the error's are not both sent)."""
    duplicated = sum(len(v) > 1 for v in values)
    assert not duplicated, f"{duplicated}/{len(values)} responses carry Retry-After twice"
