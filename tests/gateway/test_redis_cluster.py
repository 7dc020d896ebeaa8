"""The rate limiter on a real three-node Redis Cluster (redis-server --cluster-enabled),
started by the test on free ports and torn down after: every admit's keys share the
tenant's hash slot, so each stays one script call on one node, and limits hold across
gateway replicas."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from redis.cluster import RedisCluster

from gateway.ratelimit import Limits, RateLimitConfig, RateLimited, RateLimiter
from tests.conftest import ECHO_CONFIG, ProcessServer

NATURAL = "Could you explain how tides work and why there are two of them each day?"


def _cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 >= 65536:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not server or not cli:
        pytest.fail("redis-server and redis-cli are needed to start a test cluster", pytrace=False)
    data = tmp_path_factory.mktemp("redis-cluster")
    ports: list[int] = []
    procs = []
    try:
        for _ in range(3):
            port = _cluster_port()
            ports.append(port)
            procs.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{port}.conf", "--save", "", "--appendonly", "no",
                 "--dir", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            _wait(lambda p=port: redis.Redis(host="127.0.0.1", port=p, socket_timeout=0.5).ping())
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        for port in ports:
            _wait(lambda p=port: _cluster_ok(p))
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def _cluster_ok(port: int) -> bool:
    info = redis.Redis(host="127.0.0.1", port=port, decode_responses=True).execute_command("CLUSTER INFO")
    return (info.get("cluster_state") if isinstance(info, dict) else "cluster_state:ok" in info) in (True, "ok")


def _wait(ready, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the test Redis Cluster did not come up")
        time.sleep(0.1)


def _nodes_holding(url: str, prefix: str) -> int:
    """How many of the cluster's nodes hold keys under ``prefix``."""
    client = RedisCluster.from_url(url)
    try:
        nodes = [(n.host, n.port) for n in client.get_nodes()]
    finally:
        client.close()
    return sum(1 for host, port in nodes if redis.Redis(host=host, port=port).keys(f"{prefix}*"))


async def test_limits_risk_and_settle_on_a_cluster(cluster_url: str) -> None:
    prefix = f"sluice-test-rl-{uuid.uuid4().hex[:12]}"
    lim = RateLimiter.from_settings(cluster_url, RateLimitConfig(key_prefix=prefix), redis_cluster=True)
    try:
        tenants = [f"tenant-{i}" for i in range(24)]  # spread over the three nodes' slots

        async def admit(tenant: str, key: Limits, **kw):
            return await lim.admit(key_id=f"{tenant}-key", tenant_id=tenant, key_limits=key,
                                   tenant_limits=Limits(), prompt=NATURAL, prompt_tokens=100,
                                   max_tokens=200, **kw)

        for tenant in tenants:
            for _ in range(3):
                await admit(tenant, Limits(rpm=3))
            with pytest.raises(RateLimited):
                await admit(tenant, Limits(rpm=3))
        assert _nodes_holding(cluster_url, prefix) == 3

        adm = await admit("tenant-0", Limits(tpm=10_000))
        assert adm.headers["x-ratelimit-remaining-tokens"] == "9700"
        await lim.settle(adm, actual_tokens=120)
        nxt = await admit("tenant-0", Limits(tpm=10_000))
        assert int(nxt.headers["x-ratelimit-remaining-tokens"]) - 9580 in range(0, 20)

        await lim.record_violation("tenant-5-key", "tenant-5", severity=2.0)
        assert (await admit("tenant-5", Limits())).risk_multiplier == pytest.approx(2.0, abs=1e-3)
        assert (await admit("tenant-6", Limits())).risk_multiplier == 1.0
    finally:
        await lim.close()


async def test_two_gateways_share_limits_through_the_cluster(
        postgres_url: str, cluster_url: str, tmp_path: Path) -> None:
    prefix = f"sluice-test-{uuid.uuid4().hex[:8]}"
    config = ECHO_CONFIG + f'\n[ratelimit]\nkey_prefix = "{prefix}"\n'
    servers = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        servers.append(ProcessServer(postgres_url, tmp_path / str(i), config,
                                     env={"SLUICE_REDIS_URL": cluster_url, "SLUICE_REDIS_CLUSTER": "1"}))
    try:
        for s in servers:
            s.wait_ready()
        rpm = 20
        key = await servers[0].tenant_key("cluster-limit", rpm=rpm)
        statuses: list[int] = []
        started = time.monotonic()

        async def hammer(base_url: str) -> None:
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
                for _ in range(20):
                    r = await http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                        json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
                    statuses.append(r.status_code)

        await asyncio.gather(*(hammer(s.base_url) for s in servers for _ in range(2)))
        refill = rpm * (time.monotonic() - started) / 60
        admitted = statuses.count(200)
        assert set(statuses) <= {200, 429}
        assert rpm <= admitted <= rpm + refill + 1, (admitted, refill)
    finally:
        for s in servers:
            s.stop()
