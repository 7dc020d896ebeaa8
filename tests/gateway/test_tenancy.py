"""Tenant isolation and key lifecycle across processes."""

from __future__ import annotations

import secrets
import time

import httpx
import openai
import pytest
from sqlalchemy import update

from sluice.gateway.accounts.auth import issue_admin_token
from sluice.gateway.db.models import ApiKey, utcnow
from tests.conftest import GatewayServer


def test_usage_is_billed_to_the_callers_tenant_only(sqlite_server: GatewayServer) -> None:
    key_a = sqlite_server.tenant_key("tenant-a")
    key_b = sqlite_server.tenant_key("tenant-b")
    for key, n in ((key_a, 3), (key_b, 1)):
        api = openai.OpenAI(base_url=sqlite_server.base_url + "/v1", api_key=key, max_retries=0)
        for _ in range(n):
            api.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    sqlite_server.run(sqlite_server.gateway.meter.flush())
    token = issue_admin_token(sqlite_server.settings.admin_jwt_secret, "test", 60)
    with httpx.Client(base_url=sqlite_server.base_url) as http:
        admin = {"Authorization": f"Bearer {token}"}
        usage = http.get("/admin/api/usage", params={"group_by": "tenant"}, headers=admin).json()
        tenants = {t["name"]: t["id"] for t in http.get("/admin/api/tenants", headers=admin).json()["data"]}
        by_tenant = {row["tenant"]: row["requests"] for row in usage["data"]}
        assert by_tenant[tenants["tenant-a"]] == 3
        assert by_tenant[tenants["tenant-b"]] == 1
        # A tenant's API key is no admin credential: it reads nothing of anyone's.
        for path in ("/admin/api/usage", "/admin/api/tenants", "/admin/api/keys"):
            r = http.get(path, headers={"Authorization": f"Bearer {key_a}"})
            assert r.status_code == 401 and "tenant-b" not in r.text


@pytest.mark.parametrize("token", [
    "",  # no token
    "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4IiwiYXVkIjoic2x1aWNlLWFkbWluIn0.",  # alg none
])
def test_admin_api_refuses_without_a_valid_token(sqlite_server: GatewayServer, token: str) -> None:
    r = httpx.get(sqlite_server.base_url + "/admin/api/tenants",
                  headers={"Authorization": f"Bearer {token}"} if token else {})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_admin_tokens_expire_and_are_bound_to_the_secret(sqlite_server: GatewayServer) -> None:
    url = sqlite_server.base_url + "/admin/api/tenants"
    wrong = issue_admin_token("another-secret-" + "y" * 32, "x", 60)
    expired = issue_admin_token(sqlite_server.settings.admin_jwt_secret, "x", -10)
    good = issue_admin_token(sqlite_server.settings.admin_jwt_secret, "x", 60)
    assert httpx.get(url, headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
    r = httpx.get(url, headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_expired"
    assert httpx.get(url, headers={"Authorization": f"Bearer {good}"}).status_code == 200


def test_revocation_by_another_process_is_honoured_within_5s(
    sqlite_server: GatewayServer,
) -> None:
    """Another process (the CLI, another replica) revokes the key in the database; this
    gateway never hears of it directly and must refuse the key within its cache TTL."""
    secret = sqlite_server.tenant_key("revoke-xproc")
    api = openai.OpenAI(base_url=sqlite_server.base_url + "/v1", api_key=secret, max_retries=0)
    api.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])

    async def revoke_behind_its_back() -> None:
        from sluice.gateway.db.session import create_engine

        engine = create_engine(sqlite_server.settings.database_url)
        async with engine.begin() as conn:
            await conn.execute(update(ApiKey).where(ApiKey.prefix == secret[3:15])
                               .values(revoked_at=utcnow()))
        await engine.dispose()

    sqlite_server.run(revoke_behind_its_back())
    revoked_at = time.monotonic()
    while True:
        try:
            api.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
        except openai.AuthenticationError:
            break
        assert time.monotonic() - revoked_at < 5.5, "revoked key still accepted after 5 s"
        time.sleep(0.25)


def test_admin_api_creates_tenants_and_keys_and_revokes(sqlite_server: GatewayServer) -> None:
    token = issue_admin_token(sqlite_server.settings.admin_jwt_secret, "ops", 60)
    with httpx.Client(base_url=sqlite_server.base_url,
                      headers={"Authorization": f"Bearer {token}"}) as http:
        tenant = http.post("/admin/api/tenants", json={"name": "via-api", "rpm": 100})
        assert tenant.status_code == 201
        assert http.post("/admin/api/tenants", json={"name": "via-api"}).status_code == 400
        created = http.post(f"/admin/api/tenants/{tenant.json()['id']}/keys",
                            json={"name": "ci", "models": ["echo"], "expires_in": "1d"})
        assert created.status_code == 201
        body = created.json()
        assert body["key"].startswith("sk-") and body["expires_at"]
        listed = http.get("/admin/api/keys", params={"tenant": "via-api"}).json()["data"]
        assert [k["id"] for k in listed] == [body["id"]] and "key" not in listed[0]
        api = openai.OpenAI(base_url=sqlite_server.base_url + "/v1", api_key=body["key"],
                            max_retries=0)
        api.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
        assert http.post(f"/admin/api/keys/{body['id']}/revoke").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            api.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
        assert http.get("/admin/api/runtime").json()["backends"][0]["backend"] == "echo"


def test_an_admin_change_commits_with_its_audit_record_or_not_at_all(
        postgres_server: GatewayServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import select
    from sqlalchemy.exc import OperationalError

    from sluice.gateway.db.accounting import AuditRecord
    from sluice.gateway.ledger.audit import AuditLog

    server = postgres_server
    token = issue_admin_token(server.settings.admin_jwt_secret, "ops", 60)
    admin = {"Authorization": f"Bearer {token}"}
    base = server.base_url + "/admin/api"
    name = f"audited-{secrets.token_hex(3)}"

    async def admin_chain(after: int) -> list[tuple[str, str]]:
        """The "admin" chain's records after seq ``after`` (the chain is shared: earlier
        tests on the session's database appended to it too), as (action, actor)."""
        async with server.gateway.sessions() as session:
            rows = await session.scalars(select(AuditRecord).where(
                AuditRecord.instance_id == "admin", AuditRecord.seq > after)
                .order_by(AuditRecord.seq))
            return [(r.action, r.actor) for r in rows]

    async def last_seq() -> int:
        async with server.gateway.sessions() as session:
            seqs = await session.scalars(select(AuditRecord.seq).where(
                AuditRecord.instance_id == "admin").order_by(AuditRecord.seq.desc()).limit(1))
            return next(iter(seqs), 0)

    start = server.run(last_seq())
    assert httpx.post(base + "/tenants", headers=admin, json={"name": name}).status_code == 201

    # the record is in the database when the response arrives: same transaction, no buffer
    assert server.run(admin_chain(start)) == [("tenant.create", "admin:ops")]

    async def failing_store(self: AuditLog, conn: object, batch: object) -> None:
        raise OperationalError("INSERT INTO audit_log", {}, Exception("disk full"))

    monkeypatch.setattr(AuditLog, "_store", failing_store)
    r = httpx.patch(base + f"/tenants/{name}", headers=admin, json={"rpm": 7})
    assert r.status_code == 503, r.text  # the database failed: retry later, not a 500
    monkeypatch.undo()
    tenant = httpx.get(base + f"/tenants/{name}", headers=admin).json()
    assert tenant["rpm"] is None  # the change rolled back with its audit record
    assert httpx.patch(base + f"/tenants/{name}", headers=admin, json={"rpm": 7}).status_code == 200
    assert server.run(admin_chain(start)) == [("tenant.create", "admin:ops"),
                                         ("tenant.update", "admin:ops")]
    report = server.run(server.gateway.audit.verify())
    assert report.ok, report
