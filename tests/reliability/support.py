"""Shared pieces of the reliability scenarios: an open-loop load client that records
what every client received, usage read back from Postgres, and gateway RSS.

Figures each scenario measures are printed and, when ``SLUICE_RELIABILITY_REPORT`` names a
file, appended to it as one JSON line (docs/reliability.md is written from those lines).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

FULL = os.environ.get("SLUICE_RELIABILITY_FULL") == "1"


def duration(short_s: float, full_s: float, var: str) -> float:
    """A scenario's length: ``var`` wins, then the full length under SLUICE_RELIABILITY_FULL=1."""
    if os.environ.get(var):
        return float(os.environ[var])
    return full_s if FULL else short_s


def report(scenario: str, **figures: Any) -> None:
    line = {"scenario": scenario, "full": FULL, **figures}
    print(f"\n[reliability] {json.dumps(line)}")
    if path := os.environ.get("SLUICE_RELIABILITY_REPORT"):
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


PROMPTS = [
    "Hello there, how are you today?",
    "Summarise the plot of Hamlet in one sentence please.",
    "Écris une phrase en français avec des accents: déjà vu, naïve, où.",
    "List three prime numbers and explain why they are prime.",
    "naïve café — 東京 — emoji 🙂 mixed text",
]


@dataclass
class Outcome:
    request_id: str | None
    status: int  # HTTP status, or 0 when the connection failed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stream: bool = False
    error: str | None = None


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed_s: float = 0.0

    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200 and o.error is None]

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200 or o.error is not None]

    def tokens(self) -> tuple[int, int]:
        ok = self.ok()
        return sum(o.prompt_tokens for o in ok), sum(o.completion_tokens for o in ok)


def request_body(i: int, model: str = "echo") -> tuple[str, dict[str, Any], bool]:
    """The i-th request of the mix: chat/completions x stream/not, varied prompts."""
    prompt = PROMPTS[i % len(PROMPTS)] + f" #{i}"
    stream = i % 2 == 1
    if i % 4 < 2:
        path, body = "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"model": model, "prompt": prompt}
    body["max_tokens"] = 8 + i % 24
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return path, body, stream


async def send_one(client: httpx.AsyncClient, key: str, i: int, model: str = "echo") -> Outcome:
    path, body, stream = request_body(i, model)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        if not stream:
            r = await client.post(path, json=body, headers=headers)
            rid = r.headers.get("x-request-id")
            if r.status_code != 200:
                return Outcome(rid, r.status_code, error=r.text[:200])
            usage = r.json()["usage"]
            return Outcome(rid, 200, usage["prompt_tokens"], usage["completion_tokens"])
        async with client.stream("POST", path, json=body, headers=headers) as r:
            rid = r.headers.get("x-request-id")
            if r.status_code != 200:
                return Outcome(rid, r.status_code, stream=True, error=(await r.aread())[:200].decode())
            usage, done, error = None, False, None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    error = json.dumps(event["error"])[:200]
                elif event.get("usage"):
                    usage = event["usage"]
            if error or not done or usage is None:
                return Outcome(rid, 200, stream=True, error=error or "stream ended early")
            return Outcome(rid, 200, usage["prompt_tokens"], usage["completion_tokens"], True)
    except httpx.HTTPError as exc:
        return Outcome(None, 0, stream=stream, error=f"{type(exc).__name__}: {exc}")


async def run_load(base_url: str, keys: list[str], *, rate: float, duration_s: float,
                   model: str = "echo", timeout_s: float = 30.0,
                   on_tick: Any = None) -> LoadResult:
    """Open loop: request i is sent at t0 + i/rate whatever the earlier ones are doing
    (a closed loop would slow down with the server and hide queueing)."""
    result = LoadResult()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks: list[asyncio.Task[Outcome]] = []
        total = int(rate * duration_s)
        for i in range(total):
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if on_tick is not None:
                on_tick(loop.time() - t0)
            tasks.append(asyncio.create_task(send_one(client, keys[i % len(keys)], i, model)))
        result.outcomes = list(await asyncio.gather(*tasks))
        result.elapsed_s = loop.time() - t0
    return result


async def usage_rows(database_url: str) -> dict[str, tuple[int, int, int]]:
    """request_id -> (prompt_tokens, completion_tokens, status), read straight from Postgres."""
    import asyncpg
    from sqlalchemy.engine import make_url

    u = make_url(database_url)
    conn = await asyncpg.connect(host=u.host, port=u.port or 5432, user=u.username,
                                 password=u.password, database=u.database)
    try:
        rows = await conn.fetch(
            "SELECT request_id, prompt_tokens, completion_tokens, status FROM usage_events")
        return {r["request_id"]: (r["prompt_tokens"], r["completion_tokens"], r["status"])
                for r in rows}
    finally:
        await conn.close()


async def daily_totals(database_url: str) -> tuple[int, int, int]:
    """(requests, prompt_tokens, completion_tokens) summed over the usage_daily rollup."""
    import asyncpg
    from sqlalchemy.engine import make_url

    u = make_url(database_url)
    conn = await asyncpg.connect(host=u.host, port=u.port or 5432, user=u.username,
                                 password=u.password, database=u.database)
    try:
        row = await conn.fetchrow(
            "SELECT COALESCE(SUM(requests),0) r, COALESCE(SUM(prompt_tokens),0) p, "
            "COALESCE(SUM(completion_tokens),0) c FROM usage_daily")
        return int(row["r"]), int(row["p"]), int(row["c"])
    finally:
        await conn.close()


async def wait_for_rows(database_url: str, expected: int, timeout_s: float = 60.0
                        ) -> dict[str, tuple[int, int, int]]:
    """Usage rows once ``expected`` of them exist (the meter writes in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await usage_rows(database_url)
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.5)


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20
