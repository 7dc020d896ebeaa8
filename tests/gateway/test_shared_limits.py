"""Rate limits hold across replicas: two gateway processes share one Redis, or one Redis
Cluster (SLUICE_REDIS_CLUSTER=1)."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from tests.conftest import ECHO_CONFIG, ProcessServer


@pytest.mark.parametrize("store", ["redis", "redis_cluster"])
async def test_two_gateways_sharing_redis_admit_no_more_than_the_limit(
    postgres_url: str, store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    redis_url = request.getfixturevalue(f"{store}_url")
    prefix = f"sluice-test-{secrets.token_hex(4)}"
    # A generous store timeout: this test is about the shared count, and the limiter's
    # 100 ms default (fail open) can trip on a loaded CI machine and admit without headers.
    config = ECHO_CONFIG + f'\n[ratelimit]\nkey_prefix = "{prefix}"\nstore_timeout_s = 5.0\n'
    env = {"SLUICE_REDIS_URL": redis_url, **({"SLUICE_REDIS_CLUSTER": "1"} if store == "redis_cluster" else {})}
    servers = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        servers.append(ProcessServer(postgres_url, tmp_path / str(i), config, env=env))
    try:
        for server in servers:
            server.wait_ready()
        rpm = 40
        key = await servers[0].tenant_key("shared-limit", rpm=rpm)
        statuses: list[int] = []
        started = time.monotonic()

        async def hammer(base_url: str) -> None:
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
                for _ in range(60):
                    r = await http.post(
                        "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                        json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
                    statuses.append(r.status_code)
                    assert r.status_code in (200, 429), (r.status_code, r.text)
                    if r.status_code == 429:
                        assert int(r.headers["retry-after"]) >= 0
                        assert r.json()["error"]["code"] == "rate_limit_exceeded"
                    else:
                        assert r.headers.get("x-ratelimit-limit-requests") == str(rpm), (
                            "admitted without the limiter's headers: the store call failed "
                            "and the limiter failed open", r.headers)

        await asyncio.gather(*(hammer(s.base_url) for s in servers for _ in range(2)))
        elapsed = time.monotonic() - started
        admitted = statuses.count(200)
        refill = rpm * elapsed / 60  # what the window legitimately refilled meanwhile
        assert set(statuses) <= {200, 429}
        assert rpm <= admitted <= rpm + refill + 1, (admitted, elapsed)
        assert statuses.count(429) == 240 - admitted
    finally:
        for server in servers:
            server.stop()
        if store == "redis":  # the test cluster goes away with the session
            client = aioredis.from_url(redis_url)
            keys = [k async for k in client.scan_iter(f"{prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
