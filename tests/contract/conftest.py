"""The contract suite's world: a recording upstream, and a real sluice app (uvicorn, SQLite
database of the test's own) with an openai_upstream backend pointed at it and the echo
backend beside it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import GatewayServer, echo_settings
from tests.contract.upstream import RecordingUpstream

UPSTREAM_MODELS = {name: name for name in (
    "plain", "tools", "answer", "refusal", "reasoning", "truncated", "limited", "embed")}


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    server = RecordingUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GatewayServer]:
    from sluice.gateway.db.session import migrate
    from sluice.gateway.settings import BackendConfig

    db = tmp_path_factory.mktemp("contract") / "sluice.db"
    migrate(f"sqlite+aiosqlite:///{db}")
    backends = {
        "echo": BackendConfig(plugin="echo"),
        "up": BackendConfig(plugin="openai_upstream", options={
            "base_url": upstream.base_url, "tokenizer": "none",
            "models": {**UPSTREAM_MODELS, "renamed": "plain"},
        }),
    }
    server = GatewayServer(echo_settings(f"sqlite+aiosqlite:///{db}", backends=backends,
                                         max_n=4)).start()
    yield server
    server.stop()


class Sent:
    """What the official client put on the wire (an httpx event hook)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> None:
        self.bodies.append(request.read())

    async def async_hook(self, request: httpx.Request) -> None:
        self.bodies.append(await request.aread())


@pytest.fixture
def sent() -> Sent:
    return Sent()


@pytest.fixture(scope="module")
def key(gateway: GatewayServer) -> str:
    return gateway.tenant_key()


@pytest.fixture
def client(gateway: GatewayServer, key: str, sent: Sent) -> Iterator[openai.OpenAI]:
    http = httpx.Client(event_hooks={"request": [sent]})
    api = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=key, max_retries=0,
                        http_client=http)
    yield api
    api.close()


@pytest.fixture
def aclient(gateway: GatewayServer, key: str, sent: Sent) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(event_hooks={"request": [sent.async_hook]})
    return openai.AsyncOpenAI(base_url=gateway.base_url + "/v1", api_key=key, max_retries=0,
                              http_client=http)


def usage_row(gateway: GatewayServer, request_id: str, timeout: float = 10) -> Any:
    """The metered usage row of one request (the meter writes in the background)."""
    from sluice.gateway.db.models import UsageEvent

    async def fetch() -> Any:
        engine = create_async_engine(gateway.settings.database_url)
        try:
            async with engine.connect() as conn:
                return (await conn.execute(
                    select(UsageEvent).where(UsageEvent.request_id == request_id))).first()
        finally:
            await engine.dispose()

    deadline = time.monotonic() + timeout
    while (row := gateway.run(fetch())) is None:
        assert time.monotonic() < deadline, f"no usage row for {request_id}"
        time.sleep(0.05)
    return row
