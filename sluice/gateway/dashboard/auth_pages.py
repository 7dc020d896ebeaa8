"""Log in (username + argon2 password), log out."""

from __future__ import annotations

import math
import secrets

from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from sluice.gateway.accounts.admins import check_password, revoke_session
from sluice.gateway.dashboard import session as sessions
from sluice.gateway.dashboard.security import COOKIE_SECURE_SCOPE_KEY
from sluice.gateway.dashboard.session import Session, SessionInvalid
from sluice.gateway.state import app_state
from sluice.gateway.dashboard.web import (
    action,
    current_session,
    database_guard,
    render,
    secret,
    text,
)

LOGIN_CSRF_TTL_S = 900


def _cookie_secure(request: Request) -> bool | None:
    return request.scope.get(COOKIE_SECURE_SCOPE_KEY)  # type: ignore[no-any-return]


def _safe_next(value: str | None) -> str:
    """Only a path of the dashboard itself: never another site (``//evil``, ``https:``)."""
    if value and value.startswith("/admin/") and not value.startswith("/admin/api") \
            and "\\" not in value and "//" not in value:
        return value
    return "/admin/"


def _login_form(request: Request, *, error: str = "", notice: str = "",
                status: int = 200, username: str = "") -> Response:
    token = secrets.token_urlsafe(24)
    response = render(request, "login.html", {
        "login_csrf": token, "error": error, "notice": notice, "username": username,
        "next": _safe_next(request.query_params.get("next"))}, status=status)
    sessions.set_cookie(response, request, sessions.LOGIN_CSRF_COOKIE, token,
                        max_age=LOGIN_CSRF_TTL_S, secure=_cookie_secure(request))
    return response


async def login_page(request: Request) -> Response:
    try:
        await current_session(request)
        return RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
    except (SessionInvalid, SQLAlchemyError, OSError):
        pass  # no usable session (or no database to check it with): the form
    q = request.query_params
    notice = ("Your session has expired. Log in again." if q.get("expired")
              else "You have logged out." if q.get("logged_out") else "")
    return _login_form(request, notice=notice)


@database_guard
async def login(request: Request) -> Response:
    async with request.form(max_files=0, max_fields=8) as form:
        submitted = form.get("csrf_token")
        if not sessions.login_csrf_ok(request, submitted if isinstance(submitted, str) else None):
            return _login_form(request, status=403,
                               error="The login form expired. Please try again.")
        return await _check_login(request, form)


async def _check_login(request: Request, form: FormData) -> Response:
    gw = app_state(request)
    username = text(form, "username")[:64]
    password = form.get("password")
    address = request.client.host if request.client else "-"
    if (wait := gw.logins.retry_after(username, address)) > 0:
        gw.logins.refused(username)  # counted in the next audit record, not one row each
        return _throttled(request, username, wait)
    admin = None
    if username and isinstance(password, str) and password and len(password) <= 1024:
        admin = await check_password(gw.sessions, username, password,
                                     run=gw.workers.run)
    if admin is None:
        verdict = gw.logins.failure(username, address)
        if verdict.audit:  # once per account and window; the count of the rest with it
            await gw.audit.record(f"admin:{username or '?'}", "admin.login", "dashboard",
                                  decision="deny",
                                  details={"client": address,
                                           "suppressed_since_last": verdict.suppressed})
        if verdict.retry_after_s > 0:
            return _throttled(request, username, verdict.retry_after_s)
        return _login_form(request, status=401, username=username,
                           error="Wrong username or password.")
    gw.logins.success(username, address)
    await gw.audit.record(f"admin:{admin.username}", "admin.login", "dashboard",
                          decision="allow")
    ttl = gw.settings.admin_jwt_ttl_s
    token = sessions.issue(secret(request), admin.username, ttl)
    response = RedirectResponse(_safe_next(text(form, "next")), status_code=303)
    secure = _cookie_secure(request)
    sessions.set_cookie(response, request, sessions.SESSION_COOKIE, token, max_age=ttl,
                        secure=secure)
    sessions.clear_cookie(response, request, sessions.LOGIN_CSRF_COOKIE, secure=secure)
    return response


def _throttled(request: Request, username: str, wait_s: float) -> Response:
    seconds = max(1, math.ceil(wait_s))
    response = _login_form(request, status=429, username=username,
                           error=f"Too many failed logins. Try again in {seconds} s.")
    response.headers["Retry-After"] = str(seconds)
    return response


@action("")
async def logout(request: Request, session: Session, form: FormData) -> Response:
    gw = app_state(request)
    await revoke_session(gw.sessions, session.sid, session.expires_at)
    await gw.audit.record(session.actor, "admin.logout", "dashboard", decision="allow")
    response = RedirectResponse("/admin/login?logged_out=1", status_code=303)
    sessions.clear_cookie(response, request, sessions.SESSION_COOKIE,
                          secure=_cookie_secure(request))
    return response
