"""The lifespan closes the gateway's resources in reverse order of opening: a request in
flight at shutdown is served to the end, and its usage row is written before the database
goes away."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
from sqlalchemy import select

from sluice.gateway.db.models import UsageEvent
from sluice.gateway.db.session import create_engine
from tests.conftest import GatewayServer, echo_settings


async def _usage_rows(url: str) -> list[tuple[str, int, int]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(select(UsageEvent.model, UsageEvent.status,
                                             UsageEvent.completion_tokens))
            return [tuple(r) for r in rows]  # type: ignore[misc]
    finally:
        await engine.dispose()


def _in_flight(server: GatewayServer, backend: str) -> int:
    status = server.gateway.runtime.pools[backend].status()
    return sum(w["inflight"] for w in status["workers"])


def test_shutdown_serves_in_flight_requests_and_writes_their_usage(sqlite_url: str) -> None:
    server = GatewayServer(echo_settings(sqlite_url)).start()
    assert server.app.state.sluice is server.gateway  # the AppState, set by the lifespan
    key = server.tenant_key()
    answers: list[httpx.Response] = []

    def call() -> None:  # slow-echo sends 5 tokens a second: this takes about a second
        answers.append(httpx.post(
            f"{server.base_url}/v1/chat/completions", timeout=30,
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "slow-echo", "messages": [{"role": "user", "content": "a b c d e"}]}))

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while _in_flight(server, "slow-echo") == 0:
        assert time.monotonic() < deadline, "the request never reached the backend"
        time.sleep(0.01)
    server.stop()  # while the request is still generating
    caller.join(30)

    assert len(answers) == 1 and answers[0].status_code == 200
    assert answers[0].json()["choices"][0]["message"]["content"] == "a b c d e"
    rows = asyncio.run(_usage_rows(sqlite_url))
    assert rows == [("slow-echo", 200, answers[0].json()["usage"]["completion_tokens"])]
