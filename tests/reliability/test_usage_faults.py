"""No usage lost to a fault: kill -9 mid-stream, kill -9 during a Postgres outage, a full
disk under the spool, a start while Postgres is down.

Every scenario runs `sluice serve` as its own process on a Postgres database of its own,
reaching it through a TCP proxy the test can cut (loadtests/tcp_proxy.py). "Lost" is a
request the client saw admitted (it got the response head, with its x-request-id) that
has no usage row after a restart; "doubled" is the rollup counting more requests than
there are rows. The disk-full scenario mounts a small tmpfs (root only; the same failure
is fault-injected in tests/gateway/test_wal.py everywhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
from sqlalchemy.engine import make_url

from loadtests.tcp_proxy import TcpProxy
from tests.conftest import (
    ECHO_CONFIG, ProcessServer, drop_postgres_database, free_port, make_postgres_database,
)  # fmt: skip
from tests.reliability.support import daily_totals, report, run_load, usage_rows, wait_for_rows

STREAM_CONFIG = ECHO_CONFIG + """
[backends.stream-echo]
plugin = "echo"
[backends.stream-echo.options]
model = "stream-echo"
tokens_per_s = 20
"""
LONG_PROMPT = " ".join(f"word{i}" for i in range(400))  # echo answers with the prompt


@contextlib.contextmanager
def gateway(tmp_path: Path, spool: Path | None = None,
            ) -> Iterator[tuple[ProcessServer, TcpProxy, str, str]]:  # fmt: skip
    url = make_postgres_database("sluice_faults")
    u = make_url(url)
    proxy = TcpProxy(u.host or "127.0.0.1", u.port or 5432).start()
    proxied = u.set(port=proxy.port).render_as_string(hide_password=False)
    env = {"SLUICE_SPOOL_DIR": str(spool or tmp_path / "spool"), "SLUICE_KEY_CACHE_TTL_S": "120"}
    servers: list[ProcessServer] = []

    def start() -> ProcessServer:
        servers.append(ProcessServer(proxied, tmp_path, STREAM_CONFIG, env=env))
        return servers[-1]

    try:
        yield start, proxy, url, proxied  # type: ignore[misc]
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.stop()
        proxy.stop()
        drop_postgres_database(url)


def kill9(server: ProcessServer) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    server.log.close()


async def stream_until_dropped(base_url: str, key: str, received: dict[str, int],
                               started: asyncio.Event, n: int) -> None:  # fmt: skip
    """A long stream; counts content chunks (1 token each: ASCII) until the gateway dies."""
    body = {"model": "stream-echo", "stream": True, "max_tokens": 2000,
            "messages": [{"role": "user", "content": LONG_PROMPT}]}  # fmt: skip
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {key}"}) as r:
                rid = r.headers["x-request-id"]
                received[rid] = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = orjson.loads(line[6:])
                        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            received[rid] += 1
                            if sum(received.values()) >= n:
                                started.set()
        except httpx.HTTPError:
            pass  # the gateway was killed under us


def test_kill_9_mid_stream_bills_what_was_sent(tmp_path: Path) -> None:
    with gateway(tmp_path) as (start, proxy, url, _):
        server = start().wait_ready()
        key = asyncio.run(server.tenant_key("faults"))
        received: dict[str, int] = {}
        done_before: list = []

        async def scenario() -> None:
            started = asyncio.Event()
            streams = [asyncio.create_task(stream_until_dropped(server.base_url, key, received,
                                                                started, 40)) for _ in range(10)]
            await asyncio.wait_for(started.wait(), 30)
            # Short requests right up to the kill ("the last ~0.2 s of completed requests").
            load = asyncio.create_task(run_load(server.base_url, [key], rate=50, duration_s=1.0))
            await asyncio.sleep(0.6)
            kill9(server)
            done_before.extend((await load).outcomes)
            await asyncio.gather(*streams)

        asyncio.run(scenario())
        restarted = start().wait_ready()  # recovers the WAL the killed process left
        admitted = {o.request_id for o in done_before if o.request_id} | set(received)
        rows = asyncio.run(wait_for_rows(url, len(admitted), timeout_s=20))
        time.sleep(1.0)
        rows = asyncio.run(usage_rows(url))
        daily = asyncio.run(daily_totals(url))
        restarted.stop()
        lost = sorted(admitted - set(rows))
        billed = {rid: rows[rid][1] for rid in received if rid in rows}
        exact = sum(billed[r] == received[r] for r in billed)
        over = {r: billed[r] - received[r] for r in billed if billed[r] != received[r]}
        report("kill9_mid_stream", streams=len(received), received_tokens=sum(received.values()),
               billed_tokens=sum(billed.values()), exact_streams=exact, over_billed=over,
               short_requests=len(done_before), admitted=len(admitted), lost_events=len(lost),
               doubled_events=daily[0] - len(rows))  # fmt: skip
        assert len(received) == 10 and not lost
        assert daily[0] == len(rows)  # 0 doubled
        # Billed = what was handed to the socket: at most the one chunk in flight more.
        assert all(0 <= d <= 1 for d in over.values()), over


def test_kill_9_during_postgres_outage_loses_nothing(tmp_path: Path) -> None:
    with gateway(tmp_path) as (start, proxy, url, _):
        server = start().wait_ready()
        keys = [asyncio.run(server.tenant_key(t)) for t in ("fa", "fb")]
        warm = asyncio.run(run_load(server.base_url, keys, rate=20, duration_s=1))
        proxy.cut()

        async def scenario() -> list:
            load = asyncio.create_task(run_load(server.base_url, keys, rate=30, duration_s=4.0))
            slow = asyncio.create_task(run_load(server.base_url, keys, rate=5, duration_s=4.0,
                                                model="stream-echo"))  # ~1 s each
            await asyncio.sleep(3.0)  # in the middle of the load: requests in flight
            kill9(server)
            return (await load).outcomes + (await slow).outcomes

        outcomes = asyncio.run(scenario())
        proxy.restore()
        restarted = start().wait_ready()
        admitted = {o.request_id for o in warm.outcomes + outcomes if o.request_id}
        served = [o for o in warm.outcomes + outcomes if o.status == 200 and not o.error]
        rows = asyncio.run(wait_for_rows(url, len(admitted), timeout_s=20))
        time.sleep(1.0)
        rows = asyncio.run(usage_rows(url))
        daily = asyncio.run(daily_totals(url))
        restarted.stop()
        lost = [r for r in admitted if r not in rows]
        # In flight at the kill (the client saw no id): recovered from the WAL, status 500.
        recovered = {r: v for r, v in rows.items() if r not in admitted}
        wrong = [o.request_id for o in served if rows.get(o.request_id, (0, 0))[:2]
                 != (o.prompt_tokens, o.completion_tokens)]  # fmt: skip
        report("kill9_during_outage", requests=len(warm.outcomes + outcomes),
               admitted=len(admitted), served=len(served), recovered_in_flight=len(recovered),
               usage_rows=len(rows), lost_events=len(lost), doubled_events=daily[0] - len(rows),
               mismatched=len(wrong))  # fmt: skip
        assert recovered and all(v[2] == 500 for v in recovered.values()), recovered
        assert not lost and daily[0] == len(rows) and not wrong


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


def test_disk_full_refuses_instead_of_serving_unmetered(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("mounting a tmpfs needs root (the fault-injected variant is in test_wal.py)")
    try:
        with gateway(tmp_path, spool=disk / "spool") as (start, proxy, url, _):
            server = start().wait_ready()
            key = asyncio.run(server.tenant_key("disk"))
            warm = asyncio.run(run_load(server.base_url, [key], rate=10, duration_s=0.5))
            assert not warm.failures()  # the key is known (cached) before the cut
            proxy.cut()  # usage must go to the spool: the disk is all there is
            filler = disk / "filler"
            full_at: list[float] = []

            def fill(elapsed: float) -> None:  # 1.5 s into the load: ENOSPC from then on
                if elapsed >= 1.5 and not full_at:
                    full_at.append(elapsed)
                    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k",
                                    "count=1000"], capture_output=True)  # fmt: skip

            load = asyncio.run(run_load(server.base_url, [key], rate=40, duration_s=4,
                                        on_tick=fill))  # fmt: skip
            statuses = sorted({o.status for o in load.outcomes})
            served = [o for o in warm.outcomes + load.outcomes if o.status == 200 and not o.error]
            filler.unlink()
            proxy.restore()
            time.sleep(2.0)
            after = asyncio.run(run_load(server.base_url, [key], rate=10, duration_s=1))
            served += [o for o in after.outcomes if o.status == 200 and not o.error]
            server.stop()  # graceful: the spool replays, then everything is written
            rows = asyncio.run(wait_for_rows(url, len(served), timeout_s=20))
            daily = asyncio.run(daily_totals(url))
            lost = [o.request_id for o in served if o.request_id not in rows]
            report("disk_full", requests=len(load.outcomes), statuses=statuses,
                   served=len(served),
                   refused_503=sum(o.status == 503 for o in load.outcomes),
                   served_after=len(after.ok()), lost_events=len(lost),
                   doubled_events=daily[0] - len(rows))  # fmt: skip
            assert 500 not in statuses and 503 in statuses and len(served) >= 40
            assert not lost and daily[0] == len(rows)
            assert len(after.ok()) == len(after.outcomes)  # serving again once there is room
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_start_while_postgres_is_down_serves_known_keys(tmp_path: Path) -> None:
    with gateway(tmp_path) as (start, proxy, url, _):
        server = start().wait_ready()
        key = asyncio.run(server.tenant_key("known"))
        first = asyncio.run(run_load(server.base_url, [key], rate=10, duration_s=1))
        unknown = asyncio.run(server.tenant_key("never-seen"))
        server.stop()
        proxy.cut()
        down = start().wait_ready()  # used to fail: "run `sluice migrate` first"
        during = asyncio.run(run_load(down.base_url, [key], rate=10, duration_s=2))
        r = httpx.post(down.base_url + "/v1/chat/completions", timeout=10,
                       headers={"Authorization": f"Bearer {unknown}"},
                       json={"model": "echo", "messages": [{"role": "user", "content": "x"}]})
        proxy.restore()
        served = [o for o in first.outcomes + during.outcomes if o.status == 200 and not o.error]
        rows = asyncio.run(wait_for_rows(url, len(served), timeout_s=20))
        down.stop()
        lost = [o.request_id for o in served if o.request_id not in rows]
        report("start_during_outage", served_during=len(during.ok()),
               requests_during=len(during.outcomes), unknown_key_status=r.status_code,
               lost_events=len(lost))  # fmt: skip
        assert len(during.ok()) == len(during.outcomes) and r.status_code == 503
        assert not lost


def test_serve_says_why_it_cannot_start(tmp_path: Path) -> None:
    """Unreachable with SLUICE_DB_OUTAGE=refuse, or reachable but not migrated: one line
    each, and only the second says to migrate."""
    def serve(url: str, outage: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "SLUICE_DATABASE_URL": url, "SLUICE_DB_OUTAGE": outage,
               "SLUICE_DATA_DIR": str(tmp_path / "data")}  # fmt: skip
        return subprocess.run([sys.executable, "-m", "sluice.gateway.cli", "serve", "--port",
                               str(free_port())], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    down = serve("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere", "refuse")
    assert down.returncode == 2 and "database unreachable" in down.stderr
    assert "migrate" not in down.stderr and "Traceback" not in down.stderr

    name = f"sluice_nomig_{os.getpid()}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(host="127.0.0.1", user="postgres", database="test")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))  # reachable, never migrated
    try:
        bare = serve(f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}", "serve")
    finally:
        asyncio.run(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))
    assert bare.returncode == 2 and "run `sluice migrate` first" in bare.stderr, bare.stderr
    assert "Traceback" not in bare.stderr
