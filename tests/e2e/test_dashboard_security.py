"""The dashboard refuses what it must: no session, bad sessions, missing CSRF tokens; and
every response carries the security headers."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

import httpx
import jwt
import pytest

from sluice.gateway.accounts.auth import issue_admin_token
from sluice.gateway.dashboard import session as sessions
from tests.conftest import GatewayServer
from tests.e2e.conftest import ADMIN_PASSWORD, ADMIN_USER

PAGES = ["/admin/", "/admin/tenants", "/admin/keys", "/admin/usage", "/admin/usage.csv",
         "/admin/guard", "/admin/audit", "/admin/runtime", "/admin/tenants/acme"]
FORMS = ["/admin/tenants", "/admin/tenants/acme", "/admin/keys", "/admin/keys/key_x/revoke",
         "/admin/logout"]


def client(server: GatewayServer) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, follow_redirects=False, timeout=30)


@contextlib.contextmanager
def login(server: GatewayServer) -> Iterator[httpx.Client]:
    with client(server) as c:
        token = csrf_of(c, "/admin/login")
        r = c.post("/admin/login", data={"username": ADMIN_USER, "password": ADMIN_PASSWORD,
                                         "csrf_token": token, "next": "/admin/"})
        assert r.status_code == 303 and r.headers["location"] == "/admin/"
        yield c


def csrf_of(c: httpx.Client, path: str = "/admin/tenants") -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', c.get(path).text)
    assert match, f"no CSRF token on {path}"
    return match[1]


def test_pages_redirect_to_login_without_a_session(dashboard_server: GatewayServer) -> None:
    with client(dashboard_server) as c:
        for path in PAGES:
            r = c.get(path)
            assert r.status_code == 303, path
            assert r.headers["location"].startswith("/admin/login?next="), path
        for path in FORMS:
            r = c.post(path, data={"name": "x", "csrf_token": "anything"})
            assert r.status_code == 401, path
            assert "not logged in" in r.text
        assert c.get("/admin").headers["location"] == "/admin/"


def _cookie(server: GatewayServer, token: str) -> httpx.Client:
    c = client(server)
    c.cookies.set(sessions.SESSION_COOKIE, token, domain="127.0.0.1", path="/admin")
    return c


def test_forged_expired_alg_none_and_admin_api_tokens_are_refused(
        dashboard_server: GatewayServer) -> None:
    secret = dashboard_server.settings.admin_jwt_secret
    now = int(time.time())
    claims = {"sub": ADMIN_USER, "sid": "s", "aud": sessions.AUDIENCE, "iss": sessions.ISSUER,
              "iat": now, "exp": now + 600}
    unsigned = jwt.encode(claims, None, algorithm="none")
    bad = {
        "forged": jwt.encode(claims, "not-the-secret-of-this-gateway-at-all", algorithm="HS256"),
        "alg none": unsigned,
        "alg none, no signature dot": unsigned.rstrip("."),
        "expired": jwt.encode({**claims, "iat": now - 700, "exp": now - 100}, secret,
                              algorithm="HS256"),
        "admin API token": issue_admin_token(secret, ADMIN_USER, 600),
        "garbage": "not.a.jwt",
    }
    good = jwt.encode(claims, secret, algorithm="HS256")
    with _cookie(dashboard_server, good) as c:
        assert c.get("/admin/tenants").status_code == 200  # the control: a valid token works
    for name, token in bad.items():
        with _cookie(dashboard_server, token) as c:
            r = c.get("/admin/tenants")
            assert r.status_code == 303, name
            assert r.headers["location"].startswith("/admin/login"), name
            assert ("expired=1" in r.headers["location"]) == (name == "expired"), name
            r = c.post("/admin/tenants", data={"name": "evil", "csrf_token": "x"})
            assert r.status_code == 401, name
    tenants = dashboard_server.run(dashboard_server.gateway.accounts.list_tenants())
    assert [t.name for t in tenants] == []


def test_posts_without_the_sessions_csrf_token_are_refused(
        dashboard_server: GatewayServer) -> None:
    with login(dashboard_server) as c, login(dashboard_server) as other:
        foreign = csrf_of(other)
        for path in FORMS:
            assert c.post(path, data={"name": "evil"}).status_code == 403, path
            assert c.post(path, data={"name": "evil", "csrf_token": foreign}).status_code == 403
        r = c.post("/admin/tenants", data={"name": "acme", "csrf_token": csrf_of(c)})
        assert r.status_code == 303
    names = [t.name for t in dashboard_server.run(dashboard_server.gateway.accounts.list_tenants())]
    assert names == ["acme"]


def test_logout_ends_the_session_on_the_server(dashboard_server: GatewayServer) -> None:
    """A copy of the session cookie taken before logout (a shared machine, a stolen cookie)
    is refused afterwards; another session of the same admin is untouched."""
    with login(dashboard_server) as c, login(dashboard_server) as other:
        stolen = c.cookies[sessions.SESSION_COOKIE]
        r = c.post("/admin/logout", data={"csrf_token": csrf_of(c)})
        assert r.status_code == 303 and r.headers["location"] == "/admin/login?logged_out=1"
        with _cookie(dashboard_server, stolen) as replay:
            r = replay.get("/admin/tenants")
            assert r.status_code == 303 and r.headers["location"].startswith("/admin/login")
            assert "expired=1" not in r.headers["location"]
            r = replay.post("/admin/tenants", data={"name": "evil", "csrf_token": "x"})
            assert r.status_code == 401
            assert replay.get("/admin/login").status_code == 200  # the form, not a redirect
        assert other.get("/admin/tenants").status_code == 200
    assert [t.name for t in dashboard_server.run(dashboard_server.gateway.accounts.list_tenants())] == []


def test_login_form_needs_its_csrf_pair_and_the_right_password(
        dashboard_server: GatewayServer) -> None:
    with client(dashboard_server) as c:
        r = c.post("/admin/login", data={"username": ADMIN_USER, "password": ADMIN_PASSWORD})
        assert r.status_code == 403
        token = csrf_of(c, "/admin/login")
        r = c.post("/admin/login", data={"username": ADMIN_USER, "password": "wrong password!",
                                         "csrf_token": token})
        assert r.status_code == 401 and "Wrong username or password" in r.text
        assert sessions.SESSION_COOKIE not in c.cookies
        token = csrf_of(c, "/admin/login")
        r = c.post("/admin/login", data={"username": ADMIN_USER, "password": ADMIN_PASSWORD,
                                         "csrf_token": token, "next": "//evil.example/"})
        assert r.status_code == 303 and r.headers["location"] == "/admin/"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin" in cookie
        assert "Secure" not in cookie  # plain http and cookie_secure unset


@pytest.mark.parametrize("path", ["/admin/login", "/admin/static/dashboard.css"])
def test_security_headers(dashboard_server: GatewayServer, path: str) -> None:
    with client(dashboard_server) as c:
        _check_headers(c.get(path))


def test_security_headers_on_pages_and_the_json_api_untouched(
        dashboard_server: GatewayServer) -> None:
    with login(dashboard_server) as c:
        for path in PAGES[:-1]:
            r = c.get(path)
            assert r.status_code == 200, path
            _check_headers(r)
        # /admin/api is still the JSON admin API, not a dashboard page.
        r = c.get("/admin/api/tenants")
        assert r.status_code == 401 and r.json()["error"]["type"]
        assert "content-security-policy" not in r.headers


def _check_headers(r: httpx.Response) -> None:
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "same-origin"


def test_cookie_secure_flag_follows_configuration() -> None:
    from starlette.requests import Request
    from starlette.responses import Response

    def cookie(scheme: str, configured: bool | None) -> str:
        request = Request({"type": "http", "scheme": scheme, "path": "/admin/login",
                           "headers": [(b"host", b"example.com")], "query_string": b""})
        response = Response()
        sessions.set_cookie(response, request, "c", "v", max_age=60, secure=configured)
        return response.headers["set-cookie"]

    assert "Secure" in cookie("https", None)
    assert "Secure" not in cookie("http", None)
    assert "Secure" in cookie("http", True)
    assert "Secure" not in cookie("https", False)

