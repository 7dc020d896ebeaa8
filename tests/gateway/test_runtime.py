"""The serverless runtime: scale 0 -> N -> 0, shared cold starts, bounded queues, crashes."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from sluice.gateway.backends.contract import GenerationRequest, ChatMessage, SamplingParams
from sluice.gateway.errors import ServiceUnavailable
from sluice.gateway.backends.runtime import Pool, WorkerState
from sluice.gateway.settings import BackendConfig, PoolConfig
from sluice.plugins.echo import EchoBackend
from tests.conftest import GatewayServer, echo_settings


def echo_pool(pool: PoolConfig, **options: object) -> tuple[Pool, list[EchoBackend]]:
    made: list[EchoBackend] = []

    def factory() -> EchoBackend:
        backend = EchoBackend(EchoBackend.Options(**options))
        made.append(backend)
        return backend

    return Pool("echo", factory, pool), made


def request(i: int, text: str = "one two three") -> GenerationRequest:
    return GenerationRequest(f"r{i}", "echo", SamplingParams(),
                             messages=(ChatMessage("user", text),))


async def serve(pool: Pool, i: int, text: str = "one two three") -> str:
    async with pool.lease() as worker:
        return "".join([e.text async for e in worker.backend.generate(request(i, text))])


async def test_burst_at_zero_causes_exactly_one_cold_start() -> None:
    pool, made = echo_pool(PoolConfig(min_workers=0, max_workers=4, max_concurrency=200,
                                      idle_timeout_s=60), start_delay_s=0.3)
    await pool.start()
    results = await asyncio.gather(*(serve(pool, i) for i in range(100)))
    assert results == ["one two three"] * 100
    assert pool.cold_starts == 1 and len(made) == 1
    await pool.close()


async def test_scales_zero_to_n_and_back_to_zero_without_losing_requests() -> None:
    pool, made = echo_pool(PoolConfig(min_workers=0, max_workers=3, max_concurrency=2,
                                      idle_timeout_s=0.4, queue_size=100),
                           start_delay_s=0.05, tokens_per_s=200)
    await pool.start()
    assert pool.status()["workers"] == []
    texts = [" ".join(f"w{i}x{j}" for j in range(5)) for i in range(30)]
    results = await asyncio.gather(*(serve(pool, i, t) for i, t in enumerate(texts)))
    assert results == texts  # every request served exactly once, in full
    assert len(made) == 3 and pool.cold_starts == 3  # grew to max_workers under load
    for _ in range(40):  # then idles back down to zero
        await asyncio.sleep(0.1)
        if not pool.status()["workers"]:
            break
    assert pool.status()["workers"] == []
    # ... and comes back on the next request.
    assert await serve(pool, 99) == "one two three"
    assert pool.cold_starts == 4
    await pool.close()


async def test_scale_down_never_drops_inflight_or_queued_work() -> None:
    pool, _ = echo_pool(PoolConfig(min_workers=0, max_workers=1, max_concurrency=1,
                                   idle_timeout_s=0.05, queue_size=50),
                        tokens_per_s=100)
    await pool.start()
    texts = [f"queued request number {i}" for i in range(12)]
    results = await asyncio.gather(*(serve(pool, i, t) for i, t in enumerate(texts)))
    assert results == texts
    await pool.close()


async def test_queue_overflow_gets_503_with_retry_after() -> None:
    pool, _ = echo_pool(PoolConfig(max_workers=1, max_concurrency=1, queue_size=2,
                                   queue_timeout_s=5), tokens_per_s=20)
    await pool.start()
    outcomes = await asyncio.gather(*(serve(pool, i) for i in range(6)), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, ServiceUnavailable)]
    assert len(refused) == 3  # one running, two queued, the rest refused at once
    assert all(int(e.headers["Retry-After"]) >= 1 for e in refused)
    assert outcomes.count("one two three") == 3
    await pool.close()


async def test_repeated_start_failures_back_off_and_surface() -> None:
    class Broken(EchoBackend):
        async def start(self) -> None:
            raise RuntimeError("no GPU here")

    pool = Pool("broken", lambda: Broken(Broken.Options()), PoolConfig())
    await pool.start()
    with pytest.raises(ServiceUnavailable, match="failed to start: RuntimeError: no GPU here"):
        await serve(pool, 0)
    assert not pool.ready and pool.status()["start_failures"] == 1
    with pytest.raises(ServiceUnavailable) as second:
        await serve(pool, 1)  # within the back-off: refused without another start
    assert pool.status()["start_failures"] == 1
    assert int(second.value.headers["Retry-After"]) >= 1
    await pool.close()


def test_worker_killed_mid_stream_is_replaced_and_only_its_requests_fail(
    sqlite_url: str,
) -> None:
    backends = {
        "echo": BackendConfig(plugin="echo"),
        "crashy": BackendConfig(
            plugin="echo",
            options={"model": "crashy", "fail_after_tokens": 2, "fail_fatal": True},
            pool=PoolConfig(max_workers=1),
        ),
    }
    server = GatewayServer(echo_settings(sqlite_url, backends=backends)).start()
    try:
        key = server.tenant_key()
        api = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)
        stream = api.chat.completions.create(
            model="crashy", stream=True,
            messages=[{"role": "user", "content": "this answer will be cut short"}])
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        # The other backend carried on; the crashed worker was replaced by a fresh one.
        ok = api.chat.completions.create(model="echo",
                                         messages=[{"role": "user", "content": "fine"}])
        assert ok.choices[0].message.content == "fine"
        pool = server.gateway.runtime.pools["crashy"]
        short = api.chat.completions.create(model="crashy",
                                            messages=[{"role": "user", "content": "ok"}])
        assert short.choices[0].message.content == "ok"
        assert pool.cold_starts == 2
        assert all(w["state"] != "stopping" for w in pool.status()["workers"])
        # The failed request was metered with what it streamed.
        server.run(server.gateway.meter.flush())
        token = __import__("sluice.gateway.accounts.auth", fromlist=["x"]).issue_admin_token(
            server.settings.admin_jwt_secret, "t", 60)
        usage = httpx.get(server.base_url + "/admin/api/usage", params={"group_by": "model"},
                          headers={"Authorization": f"Bearer {token}"}).json()["data"]
        crashy = [row for row in usage if row["model"] == "crashy"][0]
        assert crashy["requests"] == 2 and crashy["completion_tokens"] == 2 + 1
    finally:
        server.stop()


def test_runtime_status_lists_workers(sqlite_server: GatewayServer) -> None:
    pool = sqlite_server.gateway.runtime.pools["echo"]
    api = openai.OpenAI(base_url=sqlite_server.base_url + "/v1",
                        api_key=sqlite_server.tenant_key(), max_retries=0)
    api.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
    status = pool.status()
    assert status["workers"][0]["state"] in {WorkerState.READY, WorkerState.BUSY}
    assert status["cold_starts"] == 1 and status["queue_depth"] == 0


class SleepyEcho(EchoBackend):
    """Echo that can sleep: waking takes 50 ms, a cold start 300 ms."""

    supports_sleep = True

    def __init__(self, options: EchoBackend.Options) -> None:
        super().__init__(options)
        self.asleep = False
        self.sleeps = 0

    async def sleep(self) -> None:
        self.asleep, self.sleeps = True, self.sleeps + 1

    async def wake(self) -> None:
        await asyncio.sleep(0.05)
        self.asleep = False

    async def generate(self, request):  # type: ignore[no-untyped-def,override]
        assert not self.asleep, "a sleeping worker was given work"
        async for event in super().generate(request):
            yield event


async def test_idle_workers_sleep_and_wake_faster_than_a_cold_start() -> None:
    made: list[SleepyEcho] = []

    def factory() -> SleepyEcho:
        made.append(SleepyEcho(SleepyEcho.Options(start_delay_s=0.3)))
        return made[-1]

    pool = Pool("sleepy", factory, PoolConfig(idle_timeout_s=0.2, idle_action="sleep",
                                              stop_after_sleep_s=1.5))
    await pool.start()
    assert await serve(pool, 0) == "one two three"
    for _ in range(30):
        await asyncio.sleep(0.05)
        if pool.status()["workers"][0]["state"] == "sleeping":
            break
    assert pool.status()["workers"][0]["state"] == "sleeping" and made[0].sleeps == 1
    results = await asyncio.gather(*(serve(pool, i) for i in range(20)))  # all share one wake
    assert results == ["one two three"] * 20
    status = pool.status()
    assert len(made) == 1 and status["cold_starts"] == 1 and status["wakes"] == 1
    assert status["last_wake_s"] < status["last_cold_start_s"]
    for _ in range(60):  # asleep long enough: stopped for good
        await asyncio.sleep(0.05)
        if not pool.status()["workers"]:
            break
    assert pool.status()["workers"] == []
    await pool.close()


# ---- transitions: a request arriving before, during and after stop, sleep and wake ----

class RecordingEcho(EchoBackend):
    """Echo with slow transitions (its Options' delays) that records the order in which
    requests reach it."""

    log: list[str] = []

    async def generate(self, request):  # type: ignore[no-untyped-def,override]
        RecordingEcho.log.append(request.request_id)
        async for event in super().generate(request):
            yield event


def slow_pool(idle_action: str, **pool: object) -> Pool:
    options = RecordingEcho.Options(start_delay_s=0.3, stop_delay_s=0.3, sleep_delay_s=0.3,
                                    wake_delay_s=0.3, tokens_per_s=200)
    config = PoolConfig(min_workers=0, max_workers=1, max_concurrency=1, idle_timeout_s=0.3,
                        idle_action=idle_action, queue_size=50, **pool)  # type: ignore[arg-type]
    return Pool("slow", lambda: RecordingEcho(options), config)


async def until(pool: Pool, check, limit_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + limit_s
    while not check([w["state"] for w in pool.status()["workers"]]):
        assert asyncio.get_running_loop().time() < deadline, pool.status()
        await asyncio.sleep(0.01)


async def served(pool: Pool, rid: str) -> tuple[str, int]:
    """A request's text and the completion tokens of its usage (0 when it has none)."""
    async with pool.lease() as worker:
        req = GenerationRequest(rid, "echo", SamplingParams(), messages=(ChatMessage("user", f"{rid} says hello"),))
        events = [e async for e in worker.backend.generate(req)]
    usage = events[-1].usage
    return "".join(e.text for e in events), usage.completion_tokens if usage else 0


async def expected(rid: str) -> tuple[str, int]:
    """What an echo worker answers (text, completion tokens) outside any pool."""
    req = GenerationRequest(rid, "echo", SamplingParams(), messages=(ChatMessage("user", f"{rid} says hello"),))
    events = [e async for e in EchoBackend(EchoBackend.Options()).generate(req)]
    assert events[-1].usage is not None and events[-1].usage.completion_tokens > 0
    return "".join(e.text for e in events), events[-1].usage.completion_tokens


async def arrivals(pool: Pool, names: list[str]) -> list[asyncio.Task[tuple[str, int]]]:
    """Requests arriving 20 ms apart, in the order of ``names``."""
    tasks = []
    for name in names:
        tasks.append(asyncio.create_task(served(pool, name)))
        await asyncio.sleep(0.02)
    return tasks


def transition_state(transition: str) -> str:
    return {"stop": "stopping", "sleep": "going_to_sleep", "wake": "waking"}[transition]


@pytest.mark.parametrize("moment", ["before", "during", "after"])
@pytest.mark.parametrize("transition", ["stop", "sleep", "wake"])
async def test_requests_around_a_transition_are_served_once_in_order_with_usage(
    transition: str, moment: str,
) -> None:
    pool = slow_pool("stop" if transition == "stop" else "sleep")
    await pool.start()
    RecordingEcho.log = []
    assert await served(pool, "first") == await expected("first")
    if transition == "wake":  # bring it to sleep first: the arrivals below cause the wake
        await until(pool, lambda s: s == ["sleeping"])
    state = transition_state(transition)
    if moment == "during":
        if transition == "wake":
            wake = asyncio.create_task(served(pool, "trigger"))
            await until(pool, lambda s: s == ["waking"])
        else:
            await until(pool, lambda s: s == [state])
    elif moment == "after":
        if transition == "wake":
            assert await served(pool, "trigger") == await expected("trigger")
        else:
            await until(pool, lambda s: s == ([] if transition == "stop" else ["sleeping"]))
    names = [f"{transition}-{moment}-{i}" for i in range(4)]
    results = await asyncio.gather(*await arrivals(pool, names))
    assert results == [await expected(n) for n in names]  # each served, each with its usage
    if moment == "during" and transition == "wake":
        assert await wake == await expected("trigger")
    order = ["first"] + (["trigger"] if transition == "wake" and moment != "before" else []) + names
    assert RecordingEcho.log == order  # once each, in order of arrival
    status = pool.status()
    assert status["cold_starts"] == (2 if transition == "stop" and moment != "before" else 1)
    assert status["wakes"] == (1 if transition == "sleep" and moment != "before" or transition == "wake" else 0)
    await pool.close()


async def test_arrivals_spread_over_a_cold_start_share_it() -> None:
    pool = slow_pool("stop")
    await pool.start()
    RecordingEcho.log = []
    tasks = []
    for i in range(10):  # arrivals across the 0.3 s start
        tasks.append(asyncio.create_task(served(pool, f"r{i}")))
        await asyncio.sleep(0.025)
    assert [t for t, _ in await asyncio.gather(*tasks)] == [f"r{i} says hello" for i in range(10)]
    assert pool.status()["cold_starts"] == 1 and RecordingEcho.log == [f"r{i}" for i in range(10)]
    await pool.close()


async def test_states_say_the_truth_and_transitions_are_timed() -> None:
    pool = slow_pool("sleep", stop_after_sleep_s=0.5)
    await pool.start()
    await served(pool, "a")
    await until(pool, lambda s: s == ["going_to_sleep"])
    worker = pool.workers.workers[0]
    assert not worker.backend.asleep  # not "sleeping" until its sleep() has returned
    await until(pool, lambda s: s == ["sleeping"])
    assert worker.backend.asleep
    await until(pool, lambda s: s == ["stopping"])
    await until(pool, lambda s: s == [])
    t = pool.status()["transitions"]
    for kind in ("start", "sleep", "stop"):
        assert t[kind]["count"] == 1 and 0.3 <= t[kind]["last_s"] < 1.0, (kind, t[kind])
    assert [r["kind"] for r in t["recent"]] == ["start", "sleep", "stop"]
    await pool.close()


def test_through_the_gateway_no_usage_row_is_lost_across_sleep_wake_and_stop(sqlite_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from sluice.gateway.accounts.auth import issue_admin_token

    slow = {"model": "slow", "start_delay_s": 0.3, "stop_delay_s": 0.3, "sleep_delay_s": 0.3,
            "wake_delay_s": 0.3}
    backends = {"slow": BackendConfig(plugin="echo", options=slow, pool=PoolConfig(
        max_workers=1, idle_timeout_s=0.3, idle_action="sleep", stop_after_sleep_s=0.6))}
    server = GatewayServer(echo_settings(sqlite_url, backends=backends)).start()
    try:
        api = openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.tenant_key(), max_retries=0)
        pool = server.gateway.runtime.pools["slow"]

        def ask(i: int) -> int:
            answer = api.chat.completions.create(model="slow", messages=[{"role": "user", "content": f"n{i} x"}])
            assert answer.choices[0].message.content == f"n{i} x"
            return answer.usage.completion_tokens

        def states() -> list[str]:
            return [w["state"] for w in pool.status()["workers"]]

        def wait_for(want: list[str]) -> None:
            deadline = time.monotonic() + 10
            while states() != want:
                assert time.monotonic() < deadline, pool.status()
                time.sleep(0.01)

        tokens = [ask(0)]
        with ThreadPoolExecutor(8) as threads:
            for want in (["going_to_sleep"], ["waking"], ["stopping"]):
                if want == ["waking"]:
                    wait_for(["sleeping"])
                    trigger = threads.submit(ask, 100)
                wait_for(want)
                tokens += list(threads.map(ask, range(len(tokens), len(tokens) + 3)))
                if want == ["waking"]:
                    tokens.append(trigger.result())
        server.run(server.gateway.meter.flush())
        token = issue_admin_token(server.settings.admin_jwt_secret, "t", 60)
        usage = httpx.get(server.base_url + "/admin/api/usage", params={"group_by": "model"},
                          headers={"Authorization": f"Bearer {token}"}).json()["data"]
        [row] = [r for r in usage if r["model"] == "slow"]
        assert row["requests"] == len(tokens) == 11 and row["completion_tokens"] == sum(tokens)
        t = pool.status()["transitions"]
        assert t["sleep"]["count"] >= 2 and t["wake"]["count"] >= 2 and t["stop"]["count"] >= 1
        runtime = httpx.get(server.base_url + "/admin/api/runtime",
                            headers={"Authorization": f"Bearer {token}"}).json()["backends"]
        assert [b["transitions"]["wake"]["count"] for b in runtime if b["backend"] == "slow"] == [t["wake"]["count"]]
        metrics = httpx.get(server.base_url + "/metrics").text
        assert f'sluice_pool_transitions{{backend="slow",kind="wake"}} {float(t["wake"]["count"])}' in metrics
        assert 'sluice_pool_transition_last_seconds{backend="slow",kind="sleep"}' in metrics
    finally:
        server.stop()


async def test_dashboard_runtime_page_shows_transitions_and_their_durations() -> None:
    from sluice.gateway.dashboard.reports import runtime_rows
    from sluice.gateway.dashboard.web import templates

    page = templates.env.get_template("runtime.html")
    pool = slow_pool("sleep")
    await pool.start()
    starting = asyncio.create_task(served(pool, "a"))
    await until(pool, lambda s: s == ["starting"])
    html = page.render(pools=runtime_rows([pool.status()]), request=None)
    assert 'data-transition="start">for 0.' in html  # a transition in progress, with its time so far
    await starting
    await until(pool, lambda s: s == ["sleeping"])
    html = page.render(pools=runtime_rows([pool.status()]), request=None)
    row = html.split('<tr data-kind="sleep">')[1].split("</tr>")[0]
    assert '<td class="num">1</td>' in row and "0.3" in row  # one sleep, of about 0.3 s
    await pool.close()
