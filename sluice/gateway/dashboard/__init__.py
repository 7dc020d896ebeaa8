"""The admin dashboard: server-rendered pages under /admin (issue 8).

Mount with ``app.router.routes.extend(dashboard.routes)`` (or ``build_routes(cookie_secure=...)``
to pin the session cookie's Secure flag). The mount never matches ``/admin/api/...``, so the
JSON admin API is untouched whatever the order. Nothing needs starting in the lifespan: the
pages use the gateway's :class:`~sluice.gateway.state.AppState` (``app.state.sluice``).
"""

from __future__ import annotations

from pathlib import Path

from starlette.middleware import Middleware
from starlette.responses import RedirectResponse, Response
from starlette.requests import Request
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from sluice.gateway.dashboard import accounts_pages, auth_pages, money_pages, report_pages
from sluice.gateway.dashboard.security import DashboardMount, SecurityHeadersMiddleware

STATIC_DIR = Path(__file__).parent / "static"


async def _root(request: Request) -> Response:
    return RedirectResponse("/admin/", status_code=307)


def build_routes(*, cookie_secure: bool | None = None) -> list[BaseRoute]:
    """``cookie_secure``: True or False pins the cookies' Secure flag; None sets it when the
    request came over HTTPS (set True behind a TLS-terminating proxy)."""
    pages = [
        Route("/", report_pages.overview, methods=["GET"]),
        Route("/login", auth_pages.login_page, methods=["GET"]),
        Route("/login", auth_pages.login, methods=["POST"]),
        Route("/logout", auth_pages.logout, methods=["POST"]),
        Route("/tenants", accounts_pages.tenants, methods=["GET"]),
        Route("/tenants", accounts_pages.create_tenant, methods=["POST"]),
        Route("/tenants/{tenant}", accounts_pages.tenant, methods=["GET"]),
        Route("/tenants/{tenant}", accounts_pages.update_tenant, methods=["POST"]),
        Route("/keys", accounts_pages.keys, methods=["GET"]),
        Route("/keys", accounts_pages.create_key, methods=["POST"]),
        Route("/keys/{key}/revoke", accounts_pages.revoke_key, methods=["POST"]),
        Route("/usage", report_pages.usage, methods=["GET"]),
        Route("/usage.csv", report_pages.usage_csv, methods=["GET"]),
        Route("/guard", report_pages.guard_events, methods=["GET"]),
        Route("/audit", report_pages.audit, methods=["GET"]),
        Route("/runtime", report_pages.runtime, methods=["GET"]),
        Route("/money", money_pages.money, methods=["GET"]),
        Route("/money/prices", money_pages.set_price, methods=["POST"]),
        Route("/money/budgets", money_pages.create_budget, methods=["POST"]),
        Route("/money/budgets/{budget}/delete", money_pages.delete_budget, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="dashboard-static"),
    ]
    return [
        Route("/admin", _root, methods=["GET"]),
        DashboardMount("/admin", routes=pages, name="dashboard",
                       middleware=[Middleware(SecurityHeadersMiddleware,
                                              cookie_secure=cookie_secure)]),
    ]


routes: list[BaseRoute] = build_routes()
