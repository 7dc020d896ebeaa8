"""Serverless transitions of a running gateway, measured over HTTP (issue 17).

usage: transitions.py BASE_URL KEY MODEL ADMIN_TOKEN OUT.json [--first-token-only]

Run it against a gateway whose pool has one worker up and ``idle_action = "sleep"``
(e.g. right after ``e2e_client.py --no-sleep``). It measures, in order:
1. the first sleep: from the moment the pool shows the worker leaving ``ready`` (polled
   every 20 ms) until nvidia-smi shows the GPU memory released (< 8000 MiB), and the
   sleep transition's duration as the pool timed it; the GPU memory held asleep;
2. a wake: time to the first token of a request sent to the sleeping worker 3 s after
   its first sleep began (or once the sleep is over, if it took longer);
3. a request sent the moment a later sleep begins (it arrives during the sleep);
4. a request sent 3 s after a later sleep began.
The pool's transition record (/admin/api/runtime) is saved with the results, which are
written after each step. ``--first-token-only``: one request's time to first token (a
cold start when the pool is at zero), nothing else.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx

BASE, KEY, MODEL, ADMIN, OUT = sys.argv[1:6]
res: dict = {}


def gpu_mib() -> float | str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return float(out.splitlines()[0])
    except Exception as exc:  # noqa: BLE001
        return f"error {exc}"


async def first_token_s(c: httpx.AsyncClient, salt: int) -> float | None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"[{salt}] tell me about transitions"}],
            "max_tokens": 16, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    async with c.stream("POST", f"{BASE}/v1/chat/completions", json=body,
                        headers={"Authorization": f"Bearer {KEY}"}) as r:
        if r.status_code != 200:
            res.setdefault("errors", []).append((r.status_code, (await r.aread()).decode()[:300]))
            return None
        first = None
        async for line in r.aiter_lines():  # read to the end: the next request finds the worker idle
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                if any(ch.get("delta", {}).get("content") for ch in json.loads(line[6:]).get("choices", [])):
                    first = time.perf_counter() - t0
    return first


async def runtime(c: httpx.AsyncClient) -> dict:
    rt = (await c.get(f"{BASE}/admin/api/runtime", headers={"Authorization": f"Bearer {ADMIN}"})).json()
    return rt["backends"][0]


async def wait_state(c: httpx.AsyncClient, states: tuple[str, ...], limit_s: float = 120) -> str | None:
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        workers = (await runtime(c))["workers"]
        if workers and workers[0]["state"] in states:
            return workers[0]["state"]
        await asyncio.sleep(0.02)
    return None


def save() -> None:
    json.dump(res, open(OUT, "w"), indent=1)


async def main() -> None:
    async with httpx.AsyncClient(timeout=300) as c:
        if "--first-token-only" in sys.argv:
            res["first_token_s"] = await first_token_s(c, 0)
            res["runtime"] = await runtime(c)
            save()
            print(json.dumps({"first_token_s": res["first_token_s"]}))
            return
        # 1. the first sleep
        res["first_sleep_seen_state"] = await wait_state(c, ("going_to_sleep", "sleeping"))
        t = time.perf_counter()
        trace = []
        while time.perf_counter() - t < 90:
            m = gpu_mib()
            trace.append((round(time.perf_counter() - t, 2), m))
            if not isinstance(m, float) or m < 8000:  # released (or no nvidia-smi: a CPU dry run)
                break
            await asyncio.sleep(0.2)
        res["first_sleep_release_after_seen_s"] = time.perf_counter() - t
        res["first_sleep_mem_trace"] = trace
        await wait_state(c, ("sleeping",))
        res["first_sleep_transition_s"] = (await runtime(c))["transitions"]["sleep"]["last_s"]
        res["gpu_mib_asleep"] = gpu_mib()
        save()
        # 2. wake -> first token: a request sent 3 s after the first sleep began (the
        # issue's row), or at once if the sleep took longer than that
        await asyncio.sleep(max(0.0, 3.0 - (time.perf_counter() - t)))
        res["wake_sent_after_first_sleep_began_s"] = round(time.perf_counter() - t, 2)
        res["wake_first_token_s"] = await first_token_s(c, 1)
        res["wake_transition_s"] = (await runtime(c))["transitions"]["wake"]["last_s"]
        save()
        # 3. a request the moment a sleep begins
        res["during_sleep_seen_state"] = await wait_state(c, ("going_to_sleep", "sleeping"))
        res["during_sleep_first_token_s"] = await first_token_s(c, 2)
        save()
        # 4. a request 3 s after a sleep began
        await wait_state(c, ("going_to_sleep", "sleeping"))
        await asyncio.sleep(3)
        res["three_s_into_sleep_first_token_s"] = await first_token_s(c, 3)
        res["runtime"] = await runtime(c)
    save()
    print(json.dumps({k: v for k, v in res.items() if k != "runtime"}, indent=1))


asyncio.run(main())
