"""Security properties a tenant or an attacker would probe.

- one tenant's key never reads or bills another tenant's data, through any endpoint;
- admin JWT attacks (alg none, wrong key, expired, algorithm confusion, missing claims)
  are refused;
- API keys are compared in constant time, including for unknown prefixes;
- request bodies and headers are bounded (413 / 4xx, never 500).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import pytest

import sluice.gateway.accounts.auth
from sluice.gateway.accounts.auth import ADMIN_AUDIENCE, ADMIN_ISSUER, KeyStore, issue_admin_token
from sluice.gateway.errors import AuthenticationFailed
from tests.conftest import GatewayServer, ProcessServer



def _tenant(server: GatewayServer, name: str) -> tuple[str, str, str]:
    """(tenant id, key secret, key id) of a new tenant ``name``."""
    async def make() -> tuple[str, str, str]:
        tenant = await server.gateway.accounts.create_tenant(name)
        created = await server.gateway.accounts.create_key(name)
        return tenant.id, created.secret, created.key.id
    return server.run(make())  # type: ignore[no-any-return]


def _chat(client: httpx.Client, key: str, **headers: str) -> httpx.Response:
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}", **headers},
                       json={"model": "echo", "messages": [{"role": "user", "content": "bill me"}]})


def test_a_tenant_key_reaches_nothing_of_another_tenant(postgres_server: GatewayServer,
                                                        postgres_url: str) -> None:
    suffix = str(time.monotonic_ns())
    a_id, a_key, a_key_id = _tenant(postgres_server, f"iso-a-{suffix}")
    b_id, b_key, b_key_id = _tenant(postgres_server, f"iso-b-{suffix}")
    with httpx.Client(base_url=postgres_server.base_url, timeout=30) as client:
        r_b = _chat(client, b_key)
        assert r_b.status_code == 200
        b_request = r_b.headers["x-request-id"]
        # A client-chosen request id must not collide with (and so drop) B's usage row.
        r_a = _chat(client, a_key, **{"x-request-id": b_request})
        assert r_a.status_code == 200 and r_a.headers["x-request-id"] != b_request
        # A's public prefix with B's secret (and the reverse) is no key at all.
        for spliced in (a_key[:15] + b_key[15:], b_key[:15] + a_key[15:]):
            assert _chat(client, spliced).status_code == 401
        # Every admin route, aimed at B's tenant and key, with A's tenant key: 401.
        admin_calls = [
            ("GET", "/admin/api/tenants"), ("POST", "/admin/api/tenants"),
            ("GET", f"/admin/api/tenants/iso-b-{suffix}"),
            ("PATCH", f"/admin/api/tenants/iso-b-{suffix}"),
            ("GET", f"/admin/api/tenants/iso-b-{suffix}/keys"),
            ("POST", f"/admin/api/tenants/iso-b-{suffix}/keys"),
            ("GET", "/admin/api/keys"), ("POST", f"/admin/api/keys/{b_key_id}/revoke"),
            ("GET", f"/admin/api/usage?tenant=iso-b-{suffix}"),
            ("GET", "/admin/api/usage/export"), ("GET", "/admin/api/runtime"),
        ]
        for method, path in admin_calls:
            r = client.request(method, path, headers={"Authorization": f"Bearer {a_key}"},
                               json={"name": "x", "disabled": True} if method != "GET" else None)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json()["error"]["type"]
        # The /v1 read endpoints list models only; nothing tenant-specific leaks.
        for path in ("/v1/models", "/v1/models/echo"):
            r = client.get(path, headers={"Authorization": f"Bearer {a_key}"})
            assert r.status_code == 200 and b_id not in r.text and f"iso-b-{suffix}" not in r.text
        assert _chat(client, b_key).status_code == 200  # B's key was not revoked by A

    async def rows_by_tenant() -> dict[str, Any]:
        import asyncpg
        from sqlalchemy.engine import make_url

        u = make_url(postgres_url)
        conn = await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)
        try:
            for _ in range(100):
                rows = await conn.fetch("SELECT request_id, tenant_id, key_id FROM usage_events "
                                        "WHERE tenant_id = ANY($1::text[])", [a_id, b_id])
                if len(rows) >= 3:
                    return {r["request_id"]: (r["tenant_id"], r["key_id"]) for r in rows}
                await asyncio.sleep(0.1)
            return {r["request_id"]: (r["tenant_id"], r["key_id"]) for r in rows}
        finally:
            await conn.close()

    rows = asyncio.run(rows_by_tenant())
    assert rows[b_request] == (b_id, b_key_id)
    assert rows[r_a.headers["x-request-id"]] == (a_id, a_key_id)
    assert sorted(t for t, _ in rows.values()) == sorted([a_id, b_id, b_id])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], sign: Any) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _attack_tokens(secret: str) -> dict[str, str]:
    now = int(time.time())
    good = {"sub": "mallory", "aud": ADMIN_AUDIENCE, "iss": ADMIN_ISSUER, "iat": now,
            "exp": now + 600}
    hs = lambda alg: lambda m: hmac.new(secret.encode(), m, alg).digest()  # noqa: E731
    no_aud = {k: v for k, v in good.items() if k != "aud"}
    no_exp = {k: v for k, v in good.items() if k != "exp"}
    valid = issue_admin_token(secret, "ok", 600)
    head, body, sig = valid.split(".")
    tampered_body = _b64(json.dumps({**good, "sub": "root"}).encode())
    return {
        "alg_none": _forge({"alg": "none", "typ": "JWT"}, good, lambda m: b""),
        "alg_None_case": _forge({"alg": "None", "typ": "JWT"}, good, lambda m: b""),
        "wrong_key": jwt.encode(good, secret + "x", algorithm="HS256"),
        "expired": jwt.encode({**good, "iat": now - 7200, "exp": now - 3600}, secret,
                              algorithm="HS256"),
        "missing_aud": jwt.encode(no_aud, secret, algorithm="HS256"),
        "wrong_aud": jwt.encode({**good, "aud": "sluice-tenant"}, secret, algorithm="HS256"),
        "wrong_iss": jwt.encode({**good, "iss": "evil"}, secret, algorithm="HS256"),
        "missing_exp": jwt.encode(no_exp, secret, algorithm="HS256"),
        # Algorithm confusion: another HMAC size with the same secret, and public-key
        # algorithms whose "signature" is an HMAC made with the secret as the key.
        "confusion_HS512": _forge({"alg": "HS512", "typ": "JWT"}, good, hs(hashlib.sha512)),
        "confusion_RS256": _forge({"alg": "RS256", "typ": "JWT"}, good, hs(hashlib.sha256)),
        "confusion_ES256": _forge({"alg": "ES256", "typ": "JWT"}, good, hs(hashlib.sha256)),
        "tampered_payload": f"{head}.{tampered_body}.{sig}",
        "signature_stripped": f"{head}.{body}.",
        "garbage": "not.a.jwt",
    }


def test_admin_jwt_attacks_are_refused(postgres_server: GatewayServer) -> None:
    secret = postgres_server.settings.admin_jwt_secret
    with httpx.Client(base_url=postgres_server.base_url, timeout=30) as client:
        ok = client.get("/admin/api/tenants",
                        headers={"Authorization": f"Bearer {issue_admin_token(secret, 'ok', 60)}"})
        assert ok.status_code == 200  # the control: a real token works
        for name, token in _attack_tokens(secret).items():
            for path in ("/admin/api/tenants", "/admin/api/usage", "/admin/api/runtime"):
                r = client.get(path, headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 401, (name, path, r.status_code, r.text)


def test_key_comparison_is_constant_time_for_unknown_prefixes(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The code path, not a stopwatch: every presented key of the right shape is hashed and
    compared with hmac.compare_digest, whether or not its prefix exists."""
    from sluice.gateway.accounts.tenants import Accounts
    from sluice.gateway.db.session import create_engine, sessionmaker

    compared: list[tuple[str, str]] = []

    def compare_digest(a: str, b: str) -> bool:
        compared.append((a, b))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(sluice.gateway.accounts.auth, "hmac", SimpleNamespace(compare_digest=compare_digest))

    async def main() -> None:
        engine = create_engine(sqlite_url)
        sessions = sessionmaker(engine)
        try:
            await Accounts(sessions).create_tenant("ct")
            real = (await Accounts(sessions).create_key("ct")).secret
            keys = KeyStore(sessions, cache_ttl_s=0)
            unknown_prefix = "sk-" + "Z" * 12 + real[15:]
            wrong_secret = real[:15] + ("a" if real[15] != "a" else "b") + real[16:]
            for presented in (unknown_prefix, wrong_secret):
                before = len(compared)
                with pytest.raises(AuthenticationFailed):
                    await keys.authenticate(f"Bearer {presented}")
                assert len(compared) == before + 1
                digest, expected = compared[-1]
                assert digest == sluice.gateway.accounts.auth.hash_key(presented) and len(expected) == 64
            assert (await keys.authenticate(f"Bearer {real}")).tenant_name == "ct"
        finally:
            await engine.dispose()

    asyncio.run(main())


@pytest.fixture(scope="module")
def process_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    """`sluice serve` as deployed (h11), on SQLite: limits are the HTTP server's job."""
    from sluice.gateway.db.session import migrate

    tmp = tmp_path_factory.mktemp("bounds")
    url = f"sqlite+aiosqlite:///{tmp / 'sluice.db'}"
    migrate(url)
    server = ProcessServer(url, tmp).wait_ready()
    yield server
    server.stop()


def _raw_status(port: int, request: bytes) -> int | None:
    """Send raw bytes; the status code, or None when the server closed without answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass  # the server may close while we are still sending
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            return None
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None


def test_bodies_and_headers_are_bounded(process_server: ProcessServer) -> None:
    key = asyncio.run(process_server.tenant_key("bounds"))
    auth = {"Authorization": f"Bearer {key}"}
    big = {"model": "echo", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    with httpx.Client(base_url=process_server.base_url, timeout=30) as client:
        r = client.post("/v1/chat/completions", json=big, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"]

        def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
            yield b'{"model": "echo", "messages": [{"role": "user", "content": "'
            for _ in range(64):
                yield b"y" * 65536
            yield b'"}]}'

        r = client.post("/v1/chat/completions", content=chunked(),
                        headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 413
    port = process_server.port
    huge_header = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20)
                   + b"\r\n\r\n")
    many_headers = (b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                    + b"".join(b"X-H%d: v\r\n" % i for i in range(20000)) + b"\r\n")
    huge_auth = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-"
                 + b"k" * 60000 + b"\r\n\r\n")
    for request in (huge_header, many_headers, huge_auth):
        status = _raw_status(port, request)
        # h11 answers 431/400 or drops the connection; what must never happen is a 5xx.
        assert status is None or 400 <= status < 500, status
    assert httpx.get(process_server.base_url + "/healthz").status_code == 200
