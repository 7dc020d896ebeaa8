"""The rate limiter on a real three-node Redis Cluster (the ``redis_cluster_url`` fixture):
every admit's keys share the tenant's hash slot, so each stays one script call on one
node. Limits across gateway replicas on the cluster: test_shared_limits.py."""

from __future__ import annotations

import uuid

import pytest
import redis
from redis.cluster import RedisCluster

from sluice.gateway.pipeline.ratelimit import Limits, RateLimitConfig, RateLimited, RateLimiter

NATURAL = "Could you explain how tides work and why there are two of them each day?"


def _nodes_holding(url: str, prefix: str) -> int:
    """How many of the cluster's nodes hold keys under ``prefix``."""
    client = RedisCluster.from_url(url)
    try:
        nodes = [(n.host, n.port) for n in client.get_nodes()]
    finally:
        client.close()
    return sum(1 for host, port in nodes if redis.Redis(host=host, port=port).keys(f"{prefix}*"))


async def test_limits_risk_and_settle_on_a_cluster(redis_cluster_url: str) -> None:
    prefix = f"sluice-test-rl-{uuid.uuid4().hex[:12]}"
    # A generous store timeout: the first call discovers the slots and loads the scripts on
    # each node, which on a loaded CI box once took past the default 0.1 s (x3) and the
    # limiter failed open. Failing open is the product's behaviour; this test checks the
    # limits themselves.
    config = RateLimitConfig(key_prefix=prefix, store_timeout_s=2.0)
    lim = RateLimiter.from_settings(redis_cluster_url, config, redis_cluster=True)
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
        assert _nodes_holding(redis_cluster_url, prefix) == 3

        adm = await admit("tenant-0", Limits(tpm=10_000))
        assert adm.headers["x-ratelimit-remaining-tokens"] == "9700"
        await lim.settle(adm, actual_tokens=120)
        nxt = await admit("tenant-0", Limits(tpm=10_000))
        assert int(nxt.headers["x-ratelimit-remaining-tokens"]) - 9580 in range(20)

        await lim.record_violation("tenant-5-key", "tenant-5", severity=2.0)
        assert (await admit("tenant-5", Limits())).risk_multiplier == pytest.approx(2.0, abs=1e-3)
        assert (await admit("tenant-6", Limits())).risk_multiplier == 1.0
    finally:
        await lim.close()

