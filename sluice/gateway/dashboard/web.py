"""What every dashboard handler shares: templates, the session guard and CSRF check."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from sluice.gateway.accounts.admins import session_revoked
from sluice.gateway.dashboard import session as sessions
from sluice.gateway.dashboard.session import Session, SessionInvalid
from sluice.gateway.db.models import to_utc
from sluice.gateway.state import app_state

log = logging.getLogger(__name__)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")

Handler = Callable[[Request, Session], Awaitable[Response]]
FormHandler = Callable[[Request, Session, FormData], Awaitable[Response]]


def _when(value: dt.datetime | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):  # from JSON (audit details)
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return to_utc(value).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


templates.env.filters["when"] = _when
templates.env.filters["number"] = _number
templates.env.filters["tojson_pretty"] = lambda v: "" if v is None else json.dumps(v, indent=2)


def secret(request: Request) -> str:
    return app_state(request).settings.admin_jwt_secret


async def current_session(request: Request) -> Session:
    """The request's valid, not logged-out session; SessionInvalid otherwise."""
    found = sessions.from_request(request, secret(request))
    if await session_revoked(app_state(request).sessions, found.sid):
        raise SessionInvalid("session ended by logout")
    return found


def render(request: Request, name: str, context: dict[str, Any], *,
           session: Session | None = None, status: int = 200) -> Response:
    ctx = {"session": session, "nav": request.scope.get("dashboard_nav", ""), **context}
    if session is not None:
        ctx["csrf_token"] = sessions.csrf_token(secret(request), session)
    return templates.TemplateResponse(request, name, ctx, status_code=status)


def _login_redirect(request: Request, reason: SessionInvalid) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    query = f"next={quote(target)}" + ("&expired=1" if reason.expired else "")
    return RedirectResponse(f"/admin/login?{query}", status_code=303)


def database_guard(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A 503 page instead of a 500 while the database is unreachable."""

    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("dashboard %s: database unavailable (%s)", request.url.path, type(exc).__name__)
            return render(request, "error.html", {
                "title": "Database unavailable",
                "message": "The dashboard cannot reach its database. Try again in a moment."}, status=503)

    return guarded


def page(nav: str) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """A GET page: without a valid session, a redirect to the login page; 503 while the
    database is unreachable."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            try:
                current = await current_session(request)
            except SessionInvalid as exc:
                return _login_redirect(request, exc)
            request.scope["dashboard_nav"] = nav
            return await handler(request, current)

        return database_guard(endpoint)

    return wrap


def action(nav: str) -> Callable[[FormHandler], Callable[[Request], Awaitable[Response]]]:
    """A form POST: 401 without a valid session, 403 without its CSRF token."""

    def wrap(handler: FormHandler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            try:
                current = await current_session(request)
            except SessionInvalid as exc:
                message = ("Your session has expired. Log in again." if exc.expired
                           else "You are not logged in.")
                return render(request, "error.html", {"title": "Not logged in",
                              "message": message, "login": True}, status=401)
            async with request.form(max_files=0, max_fields=64) as form:
                submitted = form.get("csrf_token")
                if not sessions.csrf_ok(secret(request), current,
                                        submitted if isinstance(submitted, str) else None):
                    return render(request, "error.html", {
                        "title": "Form expired",
                        "message": "The form's security token is missing or does not belong "
                                   "to this session. Reload the page and try again."},
                        session=current, status=403)
                request.scope["dashboard_nav"] = nav
                return await handler(request, current, form)

        return database_guard(endpoint)

    return wrap


def text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def optional_int(form: FormData, name: str) -> int | None:
    """An empty field is None; anything else must be a positive whole number."""
    value = text(form, name)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a whole number of at least 1 (or empty for no limit)")
    return int(value)
