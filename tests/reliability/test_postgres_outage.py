"""Postgres goes away for >= 10 s under concurrent load and comes back.

The gateway reaches Postgres through a TCP proxy (loadtests/tcp_proxy.py) that the test
cuts: connections are reset and new ones refused. Requests keep being served (keys come
from the key cache), usage goes to the spool (SLUICE_SPOOL_DIR) and is replayed after
recovery: the usage rows then equal exactly what clients received.

Two edges are held too: a key whose cache entry has expired during the outage is served
from the stale entry (never a 500), and usage recorded during the outage is on disk, so
it survives the gateway being killed before the database returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from loadtests.tcp_proxy import TcpProxy
from tests.conftest import ProcessServer, drop_postgres_database, make_postgres_database
from tests.reliability.support import daily_totals, duration, report, run_load, wait_for_rows

OUTAGE_AT_S = 3.0
OUTAGE_S = 12.0


@contextlib.contextmanager
def proxied_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_cache_ttl_s: float
                    ) -> Iterator[tuple[ProcessServer, TcpProxy, str, str]]:
    """(server, proxy, direct url, proxied url): `sluice serve` whose database is behind
    the proxy; the direct url reads the truth while the proxy is cut."""
    url = make_postgres_database("sluice_outage")
    u = make_url(url)
    proxy = TcpProxy(u.host or "127.0.0.1", u.port or 5432).start()
    proxied = u.set(port=proxy.port).render_as_string(hide_password=False)
    monkeypatch.setenv("SLUICE_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("SLUICE_KEY_CACHE_TTL_S", str(key_cache_ttl_s))
    server = ProcessServer(proxied, tmp_path)
    try:
        server.wait_ready()
        yield server, proxy, url, proxied
    finally:
        if server.proc.poll() is None:
            server.stop()
        proxy.stop()
        drop_postgres_database(url)


def test_usage_survives_postgres_outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seconds = duration(20, 120, "SLUICE_OUTAGE_LOAD_S")
    spool = tmp_path / "spool"
    observed: dict[str, float] = {}
    # Keys stay cached longer than the outage: authentication needs no database (with the
    # default 5 s TTL a cache miss fails; see test_key_lookup_during_outage_is_not_500).
    with proxied_gateway(tmp_path, monkeypatch, key_cache_ttl_s=120) as (server, proxy, url, _):
        keys = asyncio.run(_keys(server))
        warm = asyncio.run(run_load(server.base_url, keys, rate=20, duration_s=1))
        assert not warm.failures(), warm.failures()[:3]

        def outage() -> None:
            time.sleep(OUTAGE_AT_S)
            proxy.cut()
            cut_at = time.monotonic()
            time.sleep(OUTAGE_S - 2)
            observed["readyz_during"] = httpx.get(server.base_url + "/readyz", timeout=5).status_code
            observed["spool_bytes_during"] = (spool / "usage.spool").stat().st_size
            time.sleep(2)
            observed["outage_s"] = time.monotonic() - cut_at
            proxy.restore()

        chaos = threading.Thread(target=outage, daemon=True)
        chaos.start()
        load = asyncio.run(run_load(server.base_url, keys, rate=20, duration_s=seconds))
        chaos.join(30)
        sent = warm.outcomes + load.outcomes
        ok = [o for o in sent if o.status == 200 and not o.error]
        asyncio.run(wait_for_rows(url, len(ok), timeout_s=90))
        time.sleep(1.0)  # a late duplicate would show up now
        rows = asyncio.run(wait_for_rows(url, len(ok), timeout_s=1))
        daily = asyncio.run(daily_totals(url))
        readyz_after = httpx.get(server.base_url + "/readyz", timeout=5).status_code
        failures = [o for o in sent if o not in ok]
        lost = [o.request_id for o in ok if o.request_id not in rows]
        mismatched = [o.request_id for o in ok if o.request_id in rows
                      and rows[o.request_id][:2] != (o.prompt_tokens, o.completion_tokens)]
        client_tokens = (sum(o.prompt_tokens for o in ok), sum(o.completion_tokens for o in ok))
        report(
            "postgres_outage", duration_s=round(load.elapsed_s, 1),
            outage_s=round(observed["outage_s"], 1), requests=len(sent), errors=len(failures),
            usage_rows=len(rows), lost_events=len(lost), doubled_events=daily[0] - len(rows),
            mismatched_rows=len(mismatched), client_tokens=list(client_tokens),
            daily_totals=list(daily), readyz_during=observed["readyz_during"],
            readyz_after=readyz_after, spool_bytes_during=observed["spool_bytes_during"],
        )
        assert observed["outage_s"] >= 10
        assert observed["readyz_during"] == 503
        assert observed["spool_bytes_during"] > 100  # the spool path was taken
        assert not failures, failures[:3]
        assert not lost and not mismatched
        assert len(rows) == len(ok)
        assert daily == (len(ok), *client_tokens)  # the rollup counted each row once
        assert readyz_after == 200


def test_key_lookup_during_outage_is_not_500(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with proxied_gateway(tmp_path, monkeypatch, key_cache_ttl_s=1) as (server, proxy, _, _p):
        keys = asyncio.run(_keys(server))
        assert not asyncio.run(run_load(server.base_url, keys, rate=10, duration_s=1)).failures()
        proxy.cut()
        time.sleep(1.5)  # the cached keys expire
        load = asyncio.run(run_load(server.base_url, keys, rate=10, duration_s=2))
        proxy.restore()
        statuses = sorted({o.status for o in load.outcomes})
        report("postgres_outage_cold_key", requests=len(load.outcomes), statuses=statuses,
               http_500=sum(o.status == 500 for o in load.outcomes))
        assert 500 not in statuses


def test_usage_served_during_outage_survives_a_gateway_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with proxied_gateway(tmp_path, monkeypatch, key_cache_ttl_s=120) as (
            server, proxy, url, proxied):
        keys = asyncio.run(_keys(server))
        warm = asyncio.run(run_load(server.base_url, keys, rate=10, duration_s=1))
        proxy.cut()
        load = asyncio.run(run_load(server.base_url, keys, rate=10, duration_s=4))
        time.sleep(1.5)  # longer than the meter's flush interval: all of it "written"
        server.proc.send_signal(signal.SIGKILL)  # OOM killer, node failure
        server.proc.wait()
        server.log.close()
        proxy.restore()
        restarted = ProcessServer(proxied, tmp_path).wait_ready()  # replays the spool
        try:
            ok = [o for o in warm.outcomes + load.outcomes if o.status == 200 and not o.error]
            rows = asyncio.run(wait_for_rows(url, len(ok), timeout_s=8))
        finally:
            restarted.stop()
        lost = sum(o.request_id not in rows for o in ok)
        report("postgres_outage_then_crash", served=len(ok), usage_rows=len(rows),
               lost_events=lost)
        assert lost == 0


async def _keys(server: ProcessServer) -> list[str]:
    return [await server.tenant_key(t) for t in ("outage-a", "outage-b", "outage-c")]


def test_dashboard_during_outage_is_503_not_500(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every dashboard request checks its session against the logout table: while Postgres
    is cut the pages and forms answer 503 and the login form still renders; afterwards the
    same session works again."""
    import re

    from sluice.gateway.accounts.admins import create_admin
    from sluice.gateway.db.session import create_engine, sessionmaker

    with proxied_gateway(tmp_path, monkeypatch, key_cache_ttl_s=1) as (server, proxy, url, _):
        async def admin() -> None:
            engine = create_engine(url)
            await create_admin(sessionmaker(engine), "ops", "a-long-password-1")
            await engine.dispose()

        asyncio.run(admin())
        def client() -> httpx.Client:
            return httpx.Client(base_url=server.base_url, follow_redirects=False, timeout=30)

        def csrf(c: httpx.Client, path: str) -> str:
            match = re.search(r'name="csrf_token" value="([^"]+)"', c.get(path).text)
            assert match, path
            return match[1]

        with client() as c, client() as fresh:
            r = c.post("/admin/login", data={"username": "ops", "password": "a-long-password-1",
                                             "csrf_token": csrf(c, "/admin/login"), "next": "/admin/"})
            assert r.status_code == 303
            token = csrf(c, "/admin/tenants")
            proxy.cut()
            try:
                pages = [c.get(p) for p in ("/admin/", "/admin/tenants", "/admin/keys")]
                form = c.post("/admin/tenants", data={"name": "acme", "csrf_token": token})
                login_page = fresh.get("/admin/login")
                login_token = re.search(r'name="csrf_token" value="([^"]+)"', login_page.text)
                assert login_token
                login = fresh.post("/admin/login", data={"username": "ops", "password": "a-long-password-1",
                                                         "csrf_token": login_token[1]})
            finally:
                proxy.restore()
            after = c.get("/admin/tenants")
        report("postgres_outage_dashboard", pages=[p.status_code for p in pages], form=form.status_code,
               login_page=login_page.status_code, login=login.status_code, after=after.status_code)
        assert [p.status_code for p in pages] == [503, 503, 503]
        assert "Database unavailable" in pages[0].text
        assert form.status_code == 503
        assert login_page.status_code == 200 and login.status_code == 503
        assert after.status_code == 200
