"""A backend worker crashing mid-stream: the client gets a clean SSE error event and
``[DONE]``, the runtime replaces the worker (the next requests succeed), and the failed
request's usage is recorded with the tokens the client was sent."""

from __future__ import annotations

import asyncio
import json

import httpx

from sluice.gateway.accounts.auth import issue_admin_token
from sluice.gateway.settings import BackendConfig, PoolConfig
from tests.conftest import GatewayServer, echo_settings
from tests.reliability.support import report, wait_for_rows

FAIL_AFTER = 3
LONG = "one two three four five six seven eight nine ten eleven twelve"
SHORT = "Hi"  # fewer tokens than FAIL_AFTER: this answer completes


def _stream(client: httpx.Client, key: str, text: str) -> tuple[str, list[dict], bool]:
    body = {"model": "crashy", "messages": [{"role": "user", "content": text}],
            "stream": True, "stream_options": {"include_usage": True}}
    events, done = [], False
    with client.stream("POST", "/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
        return r.headers["x-request-id"], events, done


def test_pool_recovers_from_a_crash_mid_stream(postgres_url: str) -> None:
    backends = {"crashy": BackendConfig(
        plugin="echo", options={"model": "crashy", "fail_after_tokens": FAIL_AFTER,
                                "fail_fatal": True, "tokens_per_s": 200},
        pool=PoolConfig(max_workers=1))}
    server = GatewayServer(echo_settings(postgres_url, backends=backends)).start()
    try:
        key = server.tenant_key()
        admin = issue_admin_token(server.settings.admin_jwt_secret, "test", 300)
        crashed, recovered = [], 0
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            for _ in range(5):
                rid, events, done = _stream(client, key, LONG)
                errors = [e["error"] for e in events if "error" in e]
                text = "".join(c["delta"].get("content") or ""
                               for e in events for c in e.get("choices", []))
                assert done and len(errors) == 1, events
                assert errors[0]["type"] and errors[0]["message"] and "code" in errors[0]
                assert "error" in events[-1]  # nothing after the error but [DONE]
                assert text and LONG.startswith(text.strip())
                crashed.append(rid)
                # non-streamed: the same crash is an OpenAI-shaped 502, never a 500
                r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                json={"model": "crashy",
                                      "messages": [{"role": "user", "content": LONG}]})
                assert r.status_code == 502 and r.json()["error"]["code"], r.text
                crashed.append(r.headers["x-request-id"])
                rid, events, done = _stream(client, key, SHORT)
                assert done and not any("error" in e for e in events)
                assert events[-1]["usage"]["completion_tokens"] >= 1
                recovered += 1
            runtime = client.get("/admin/api/runtime",
                                 headers={"Authorization": f"Bearer {admin}"}).json()
        rows = asyncio.run(_rows_for(postgres_url, crashed))
        report("backend_crash", crashes=len(crashed), recovered_requests=recovered,
               usage_rows_for_crashed=len(rows),
               crashed_completion_tokens=sorted({r[1] for r in rows.values()}),
               statuses=sorted({r[2] for r in rows.values()}),
               workers=[w["state"] for b in runtime["backends"] for w in b["workers"]])
        assert len(rows) == len(crashed)  # every failed request is metered
        assert all(r[2] == 502 for r in rows.values())
        assert all(r[1] == FAIL_AFTER for r in rows.values())
    finally:
        server.stop()


async def _rows_for(url: str, request_ids: list[str]) -> dict[str, tuple[int, int, int]]:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        rows = await wait_for_rows(url, 0, timeout_s=0)
        found = {rid: rows[rid] for rid in request_ids if rid in rows}
        if len(found) == len(request_ids) or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.2)
