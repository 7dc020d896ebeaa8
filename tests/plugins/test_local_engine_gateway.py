"""The in-process engine served through the gateway, to the official openai client."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from sluice.gateway.settings import BackendConfig, PoolConfig
from tests.conftest import GatewayServer, echo_settings


@pytest.fixture
def engine_server(sqlite_url: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache = tmp_path_factory.mktemp("engine-cache")
    backends = {
        "local": BackendConfig(
            plugin="local",
            options={"cache_dir": str(cache), "num_kv_blocks": 256, "max_num_seqs": 8},
            pool=PoolConfig(idle_timeout_s=0.5, max_concurrency=8),
        )
    }
    server = GatewayServer(echo_settings(sqlite_url, backends=backends)).start()
    yield server
    server.stop()


def test_openai_client_gets_engine_completions_with_exact_usage(
    engine_server: GatewayServer,
) -> None:
    api = openai.OpenAI(base_url=engine_server.base_url + "/v1",
                        api_key=engine_server.tenant_key(), max_retries=0)
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
                {"role": "user", "content": "How are you?"}]
    reply = api.chat.completions.create(model="tiny-mixtral", messages=messages, max_tokens=12,
                                        temperature=0)
    # The reference Mixtral chat encoding of this conversation is 23 tokens.
    assert reply.usage.prompt_tokens == 23
    assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"

    stream = api.chat.completions.create(model="tiny-mixtral", messages=messages, max_tokens=12,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # greedy: the same tokens either way
    assert chunks[-1].usage.prompt_tokens == 23 and chunks[-1].usage.completion_tokens == 12

    seeded = [api.completions.create(model="tiny-mixtral", prompt="Once upon a time",
                                     max_tokens=8, temperature=0.9, seed=42).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_engine_pool_scales_to_zero_and_cold_starts_again(engine_server: GatewayServer) -> None:
    api = openai.OpenAI(base_url=engine_server.base_url + "/v1",
                        api_key=engine_server.tenant_key(), max_retries=0)
    pool = engine_server.gateway.runtime.pools["local"]

    def ask() -> str:
        return api.completions.create(model="tiny-mixtral", prompt="ping", max_tokens=4,
                                      temperature=0).choices[0].text

    first = ask()
    assert pool.cold_starts == 1 and len(pool.status()["workers"]) == 1
    deadline = time.monotonic() + 10
    while pool.status()["workers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.status()["workers"] == []  # idle: stopped, memory released
    assert ask() == first  # the same weights come back
    assert pool.cold_starts == 2
    assert pool.status()["last_cold_start_s"] < 30


async def test_burst_at_zero_on_the_engine_is_one_cold_start(engine_server: GatewayServer) -> None:
    api = openai.AsyncOpenAI(base_url=engine_server.base_url + "/v1",
                             api_key=engine_server.tenant_key(), max_retries=0)
    replies = await asyncio.gather(*(
        api.completions.create(model="tiny-mixtral", prompt=f"request {i}", max_tokens=3)
        for i in range(12)))
    assert all(r.usage.completion_tokens == 3 for r in replies)
    assert engine_server.gateway.runtime.pools["local"].cold_starts == 1
    await api.close()
