"""Data-parallel pools (issue 21): one worker per device, balanced, each scaled to zero on its own."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sluice.gateway.backends.contract import ChatMessage, GenerationRequest, SamplingParams
from sluice.gateway.backends.registry import build_backend
from sluice.gateway.backends.runtime import Pool
from sluice.gateway.errors import SettingsError
from sluice.gateway.settings import BackendConfig, PoolConfig
from sluice.plugins.echo import EchoBackend
from tests.conftest import GatewayServer, echo_settings

DEVICES = ("fake:0", "fake:1")


def dp_pool(config: PoolConfig, **options: object) -> tuple[Pool, list[tuple[str, EchoBackend]]]:
    made: list[tuple[str, EchoBackend]] = []

    def factory(device: str) -> EchoBackend:  # a real backend takes it as its `device` option
        backend = EchoBackend(EchoBackend.Options(**options))
        made.append((device, backend))
        return backend

    return Pool("echo", factory, config), made


async def serve(pool: Pool, i: int, text: str = "one two three") -> str:
    """Serve one request; returns the device of the worker that served it."""
    request = GenerationRequest(f"r{i}", "echo", SamplingParams(), messages=(ChatMessage("user", text),))
    async with pool.lease() as worker:
        assert "".join([e.text async for e in worker.backend.generate(request)]) == text
        return str(worker.device)


async def wait_for(condition, timeout_s: float = 3.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_workers_spread_over_devices_balance_and_scale_to_zero_each_on_its_own() -> None:
    pool, made = dp_pool(PoolConfig(min_workers=0, max_workers=2, max_concurrency=2, idle_timeout_s=0.4,
                                    queue_size=100, devices=DEVICES), start_delay_s=0.05, tokens_per_s=100)
    await pool.start()
    # a burst at zero: one cold start per device, never two workers on one device
    served = await asyncio.gather(*(serve(pool, i) for i in range(8)))
    assert sorted(d for d, _ in made) == list(DEVICES) and pool.cold_starts == 2
    assert set(served) == set(DEVICES)
    # both awake: concurrent requests go to the least-loaded worker, one each
    assert sorted(await asyncio.gather(serve(pool, 10), serve(pool, 11))) == list(DEVICES)
    # one device kept busy while the other idles: the idle one stops, the busy one stays
    long_text = " ".join(f"w{i}" for i in range(80))  # ~0.8 s at 100 tokens/s
    busy = asyncio.create_task(serve(pool, 20, long_text))
    await wait_for(lambda: len(pool.status()["workers"]) == 1)
    [left] = pool.status()["workers"]
    assert not busy.done() and left["inflight"] == 1
    busy_device = await busy
    assert left["device"] == busy_device
    await wait_for(lambda: not pool.status()["workers"])  # then it scales to zero too
    # and a new request starts a worker on a free device again
    assert await serve(pool, 30) in DEVICES and pool.cold_starts == 3
    await pool.close()


async def test_at_most_one_worker_per_device() -> None:
    pool, made = dp_pool(PoolConfig(min_workers=0, max_workers=4, max_concurrency=1, idle_timeout_s=60,
                                    queue_size=100, devices=DEVICES), start_delay_s=0.05, tokens_per_s=200)
    await pool.start()
    assert len(set(await asyncio.gather(*(serve(pool, i, "a b c d") for i in range(10))))) == 2
    assert sorted(d for d, _ in made) == list(DEVICES)  # max_workers 4, but two devices
    await pool.close()


def test_devices_need_a_plugin_with_a_device_option() -> None:
    from sluice.plugins.openai_upstream import OpenAIUpstreamBackend  # an upstream has no device

    config = BackendConfig(plugin="openai", options={"base_url": "http://127.0.0.1:9"},
                           pool=PoolConfig(devices=DEVICES))
    with pytest.raises(SettingsError, match="pool.devices needs a plugin with a device option"):
        build_backend("up", config, {"openai": OpenAIUpstreamBackend}, "fake:0")


def test_gateway_places_workers_on_devices_and_shows_them(sqlite_url: str) -> None:
    from sluice.gateway.dashboard.reports import runtime_rows
    from sluice.gateway.dashboard.web import templates

    pool_config = PoolConfig(max_workers=2, max_concurrency=1, idle_timeout_s=60, queue_size=50, devices=DEVICES)
    settings = echo_settings(sqlite_url, backends={
        "echo": BackendConfig(plugin="echo", options={"tokens_per_s": 50}, pool=pool_config)})
    server = GatewayServer(settings).start()
    try:
        key = server.tenant_key()

        def ask(i: int) -> int:
            return httpx.post(server.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"model": "echo", "messages": [{"role": "user", "content": f"a b c d {i}"}]},
                              timeout=30).status_code

        with ThreadPoolExecutor(4) as threads:
            assert list(threads.map(ask, range(4))) == [200] * 4
        pool = server.gateway.runtime.pools["echo"]
        assert sorted(w.device for w in pool.workers.workers) == list(DEVICES)
        assert all(w.backend.opts.device == w.device for w in pool.workers.workers)  # the plugin's option
        metrics = httpx.get(server.base_url + "/metrics").text
        for device in DEVICES:
            assert f'sluice_pool_device_workers{{backend="echo",device="{device}",state="ready"}} 1.0' in metrics
        html = templates.env.get_template("runtime.html").render(
            pools=runtime_rows(server.gateway.runtime.status()), request=None)
        assert 'data-device="fake:0"' in html and 'data-device="fake:1"' in html and "fake:0, fake:1" in html
    finally:
        server.stop()
