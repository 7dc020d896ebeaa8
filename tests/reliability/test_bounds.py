"""Bounds (issue 18, items 7 and 8): slow connections are released, aborted uploads are
one log line, proxy headers are trusted only from configured addresses, the key cache is
bounded, admin inputs are validated, admin tokens expire and can be revoked, a scoped key
cannot enumerate models, and the JWT secret is long and private."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import GatewayServer, ProcessServer, echo_settings
from tests.reliability.support import report


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    return s


def _closed_by_server(s: socket.socket) -> bytes | None:
    """What the server sent before closing; None while the connection is still open."""
    s.setblocking(False)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return data
    return data


@pytest.fixture
def proc(tmp_path: Path, sqlite_url: str) -> Any:
    server = ProcessServer(sqlite_url, tmp_path, env={
        "SLUICE_HEADER_TIMEOUT_S": "1", "SLUICE_BODY_IDLE_S": "1", "SLUICE_BODY_TIMEOUT_S": "3",
        "SLUICE_LOG_LEVEL": "info"}).wait_ready()
    yield server
    server.stop()


def test_slow_connections_are_released(proc: ProcessServer, tmp_path: Path) -> None:
    key = asyncio.run(proc.tenant_key("slow"))
    # slow-loris: 100 connections that never finish their request head
    loris = [_connect(proc.port) for _ in range(100)]
    for s in loris:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    # a body that stops after 10 of 1,000 bytes
    body = _connect(proc.port)
    body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nAuthorization: Bearer " + key.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
                 + b'{"model": ')
    started = time.monotonic()
    open_loris = len(loris)
    while time.monotonic() - started < 6:
        for s in loris:  # keep dripping header lines: each byte used to reset uvicorn's timer
            try:
                s.sendall(b"X-Drip: 1\r\n")
            except OSError:
                pass
        open_loris = sum(_closed_by_server(s) is None for s in loris)
        if open_loris == 0:
            break
        time.sleep(0.3)
    released_after = time.monotonic() - started
    answer = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        got = _closed_by_server(body)
        if got is not None:
            answer = got
            break
        time.sleep(0.1)
    assert open_loris == 0, f"{open_loris} of 100 slow connections still open"
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert httpx.get(proc.base_url + "/healthz", timeout=5).status_code == 200
    report("slow_connections", slowloris=100, released_after_s=round(released_after, 1),
           slow_body=answer.split(b"\r\n")[0].decode())
    for s in [*loris, body]:
        s.close()


def _response(s: socket.socket) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length (head and body may come apart)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
                  if k.strip().lower() == b"content-length")
    while len(body) < length:
        body += s.recv(65536)
    return data


def test_a_kept_alive_connection_outlives_the_header_deadline(proc: ProcessServer) -> None:
    """Idle between two requests for longer than the header deadline (1 s here), a
    kept-alive connection still serves the next one: only a request head that has begun
    is timed (closing an idle connection as a client reuses it is a reset for the client)."""
    s = _connect(proc.port)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    s.settimeout(5)
    s.sendall(request)
    assert _response(s).startswith(b"HTTP/1.1 200")
    time.sleep(2.5)
    s.sendall(request)
    assert _response(s).startswith(b"HTTP/1.1 200")
    s.sendall(b"GET /healthz HTTP/1.1\r\n")  # a head begun and never finished is still timed
    deadline = time.monotonic() + 5
    while (closed := _closed_by_server(s)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert closed is not None
    s.close()


def test_an_aborted_upload_is_one_quiet_line(proc: ProcessServer, tmp_path: Path) -> None:
    key = asyncio.run(proc.tenant_key("abort"))
    for _ in range(5):
        s = _connect(proc.port)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 100000\r\n\r\n"
                  + b'{"model": "echo", "prompt": "' + b"a" * 5000)
        time.sleep(0.05)
        s.close()
    time.sleep(1.0)
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
    assert " ERROR" not in log and "ERROR:" not in log
    assert log.count("client went away during POST /v1/completions") == 5


def test_forwarded_for_is_trusted_only_from_configured_proxies(
        tmp_path: Path, sqlite_url: str) -> None:
    """Per-address login throttling is what a spoofed X-Forwarded-For would dodge."""
    from tests.reliability.test_availability import _bad_login_from

    outcomes = {}
    for trusted in ("", "127.0.0.1"):
        where = tmp_path / (trusted or "none")
        where.mkdir()
        server = ProcessServer(sqlite_url, where, env={"SLUICE_TRUSTED_PROXIES": trusted})
        server.wait_ready()
        try:
            # six accounts, one failure each, each "from" another address
            outcomes[trusted] = [asyncio.run(_bad_login_from(server.base_url, f"user{i}",
                                                             f"203.0.113.{i}"))
                                 for i in range(6)]
        finally:
            server.stop()
    # loopback is not trusted by default: all six come from 127.0.0.1, locked after five
    assert outcomes[""] == [401, 401, 401, 401, 429, 429]
    # from a configured proxy, the forwarded address counts: six addresses, six 401s
    assert outcomes["127.0.0.1"] == [401] * 6


# ---------------------------------------------------------------- in-process


@pytest.fixture
def server(sqlite_url: str) -> Any:
    s = GatewayServer(echo_settings(sqlite_url)).start()
    yield s
    s.stop()


def _admin(server: GatewayServer, ttl: int = 600) -> dict[str, str]:
    from sluice.gateway.accounts.auth import issue_admin_token

    return {"Authorization": f"Bearer {issue_admin_token(server.settings.admin_jwt_secret, 'ops', ttl)}"}


def test_admin_api_refuses_bad_input_with_4xx_never_5xx(server: GatewayServer) -> None:
    h = _admin(server)
    base = server.base_url + "/admin/api"
    t = httpx.post(base + "/tenants", headers=h, json={"name": "acme"}).json()
    cases = [
        ("POST", "/tenants", {"name": "x" * 5000}),
        ("POST", "/tenants", {"name": "bad\x00name"}),
        ("POST", "/tenants", {"name": "ok-name", "rpm": 10**30}),
        ("POST", "/tenants", {"name": "ok-name2", "rpm": 2**31}),
        ("PATCH", "/tenants/acme", {"rpm": 99999999999999999999}),
        ("PATCH", "/tenants/acme", {"tpm": -1}),
        ("PATCH", "/tenants/acme", {"guard_policy": {"input_mode": "sometimes"}}),
        ("PATCH", "/tenants/acme", {"guard_policy": {"excluded_categories": ["S99"]}}),
        ("PATCH", "/tenants/acme", {"stripe_customer_id": "cus\x00" + "x" * 100}),
        ("PATCH", "/tenants/bad%00ref", {"rpm": 5}),
        ("PATCH", "/tenants/" + "y" * 3000, {"rpm": 5}),
        ("POST", "/tenants/acme/keys", {"expires_in": "999999999999999999d"}),
        ("POST", "/tenants/acme/keys", {"expires_in": "99999w"}),
        ("POST", "/tenants/acme/keys", {"name": "n" * 500}),
        ("POST", "/tenants/acme/keys", {"name": "a\x00b"}),
        ("POST", "/tenants/acme/keys", {"models": ["m\x00"]}),
        ("POST", "/tenants/acme/keys", {"models": ["x" * 1000]}),
        ("POST", "/tenants/acme/keys", {"rpm": 2**63}),
        ("POST", "/keys/key%00x/revoke", {}),
        ("GET", "/tenants/%00", None),
        ("GET", "/keys?tenant=%00", None),
        ("GET", "/usage?tenant=%00", None),
    ]
    statuses = []
    for method, path, body in cases:
        r = httpx.request(method, base + path, headers=h, json=body)
        statuses.append(r.status_code)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text[:300])
        assert "error" in r.json()
    # nothing invalid was stored: the tenant's requests still work
    key = server.tenant_key("acme")
    ok = httpx.post(server.base_url + "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200
    assert httpx.get(base + f"/tenants/{t['id']}", headers=h).json()["rpm"] is None
    report("admin_bad_input", cases=len(cases), statuses=sorted(set(statuses)))


def test_admin_tokens_are_capped_and_revocable(server: GatewayServer) -> None:
    from sluice.gateway.accounts.auth import ADMIN_AUDIENCE, ADMIN_ISSUER

    base = server.base_url + "/admin/api"
    h = _admin(server)
    assert httpx.get(base + "/tenants", headers=h).status_code == 200
    other = _admin(server)
    other_jti = jwt.decode(other["Authorization"][7:], options={"verify_signature": False})["jti"]
    r = httpx.post(base + "/tokens/revoke", headers=h, json={"jti": other_jti})
    assert r.status_code == 200
    assert httpx.get(base + "/tenants", headers=other).status_code == 401
    assert httpx.post(base + "/tokens/revoke", headers=h, json={}).status_code == 200  # itself
    revoked = httpx.get(base + "/tenants", headers=h)
    assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "token_revoked"
    # signed with the right secret, but a year long: refused
    now = int(time.time())
    long = jwt.encode({"sub": "ops", "aud": ADMIN_AUDIENCE, "iss": ADMIN_ISSUER, "iat": now,
                       "exp": now + 365 * 86400, "jti": "abcdefgh12345678"},
                      server.settings.admin_jwt_secret, algorithm="HS256")
    assert httpx.get(base + "/tenants", headers={"Authorization": f"Bearer {long}"}).status_code == 401
    # and none is issued longer than the cap
    from sluice.gateway.accounts.auth import MAX_ADMIN_TOKEN_TTL_S, issue_admin_token

    claims = jwt.decode(issue_admin_token(server.settings.admin_jwt_secret, "x", 10**9),
                        options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == MAX_ADMIN_TOKEN_TTL_S


def test_a_scoped_key_cannot_tell_forbidden_models_from_unknown_ones(
        server: GatewayServer) -> None:
    key = server.tenant_key("scoped", models=["echo"])
    h = {"Authorization": f"Bearer {key}"}
    answers = {}
    for model in ("slow-echo", "no-such-model"):
        r = httpx.post(server.base_url + "/v1/chat/completions", headers=h,
                       json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        body = r.json()["error"]
        answers[model] = (r.status_code, body["code"], body["message"].replace(model, "M"))
        m = httpx.get(server.base_url + f"/v1/models/{model}", headers=h)
        assert m.status_code == 404
    assert answers["slow-echo"] == answers["no-such-model"]
    assert answers["slow-echo"][0] == 404


async def test_unknown_key_prefixes_are_cached_in_bounded_memory(
        sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from sluice.gateway.accounts import auth
    from sluice.gateway.db.session import create_engine, sessionmaker
    from sluice.gateway.errors import AuthenticationFailed

    monkeypatch.setattr(auth, "MAX_UNKNOWN_PREFIXES", 200)
    engine = create_engine(sqlite_url)
    store = auth.KeyStore(sessionmaker(engine), cache_ttl_s=60)
    try:
        for i in range(1_000):
            made_up = f"sk-{i:012d}" + "x" * auth.SECRET_LEN
            with pytest.raises(AuthenticationFailed):
                await store.authenticate(f"Bearer {made_up}")
        assert store.cached() == (0, 200)
        # a recent unknown prefix is still answered from the cache (no query)
        with pytest.raises(AuthenticationFailed):
            await store.authenticate(f"Bearer sk-{999:012d}" + "x" * auth.SECRET_LEN)
    finally:
        await engine.dispose()


def test_jwt_secret_must_be_long_and_its_file_private(tmp_path: Path) -> None:
    from sluice.gateway.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="admin_jwt_secret"):
        Settings.from_env({"SLUICE_ADMIN_JWT_SECRET": "x", "SLUICE_DATA_DIR": str(tmp_path)})
    old = os.umask(0)  # the most permissive umask: the file must still be 0600
    try:
        settings = Settings.from_env({"SLUICE_DATA_DIR": str(tmp_path / "d")})
    finally:
        os.umask(old)
    path = tmp_path / "d" / "jwt_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(settings.admin_jwt_secret) >= 32
    assert [p.name for p in path.parent.iterdir()] == ["jwt_secret"]  # no temp file left
    again = Settings.from_env({"SLUICE_DATA_DIR": str(tmp_path / "d")})
    assert again.admin_jwt_secret == settings.admin_jwt_secret
    assert re.fullmatch(r"[A-Za-z0-9_-]+", settings.admin_jwt_secret)


async def test_pooled_sqlite_connections_recover_after_a_read_only_episode(
        sqlite_url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from sluice.gateway.db.session import create_engine

    engine = create_engine(sqlite_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
        # the pool's connection turns read-only (as one opened while the file was)
        async with engine.connect() as conn:
            await conn.execute(text("PRAGMA query_only = ON"))
        with pytest.raises(OperationalError, match="readonly"):
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))
        # the next write gets a fresh connection: it works, without a restart
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO t VALUES (2)"))
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT x FROM t"))).scalars().all() == [2]
    finally:
        await engine.dispose()


def test_streaming_overload_is_a_503_before_any_byte(sqlite_url: str) -> None:
    from sluice.gateway.settings import BackendConfig

    backends = {"echo": BackendConfig(plugin="echo", options={"tokens_per_s": 4}, pool={
        "min_workers": 1, "max_workers": 1, "max_concurrency": 1, "queue_size": 0})}
    server = GatewayServer(echo_settings(sqlite_url, backends=backends)).start()
    try:
        h = {"Authorization": f"Bearer {server.tenant_key('streams')}"}
        body = {"model": "echo", "stream": True, "max_tokens": 12,
                "messages": [{"role": "user", "content": "word " * 20}]}

        async def run() -> tuple[int, httpx.Response]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
                async with client.stream("POST", "/v1/chat/completions", headers=h,
                                         json=body) as first:
                    async for _ in first.aiter_bytes():  # the only slot is held by this stream
                        second = await client.post("/v1/chat/completions", headers=h, json={
                            **body, "messages": [{"role": "user", "content": "another"}]})
                        break
                    return first.status_code, second

        first, second = asyncio.run(run())
    finally:
        server.stop()
    assert first == 200
    assert second.status_code == 503, second.text  # not 200 + an error event
    assert second.headers.get("retry-after") and "data:" not in second.text
    assert second.json()["error"]["code"] == "service_unavailable"
