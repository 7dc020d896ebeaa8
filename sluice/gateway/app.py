"""``create_app(settings)``: the routes, error handlers and middleware; the resources are
built in the lifespan (sluice/gateway/state.py) and live in ``app.state.sluice``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from sluice.gateway import dashboard
from sluice.gateway.errors import SluiceError, from_status
from sluice.gateway.http.middleware import BodyTimeout, RequestIdMiddleware
from sluice.gateway.routes import admin, economics, health, openai
from sluice.gateway.settings import Settings
from sluice.gateway.state import check_backends, open_state
from sluice.gateway.telemetry import Telemetry


def create_app(settings: Settings | None = None, *, telemetry: Telemetry | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    check_backends(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            app.state.sluice = await open_state(settings, stack, telemetry=telemetry)
            yield

    async def sluice_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SluiceError)
        return exc.to_response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        return from_status(exc.status_code, message).to_response()

    app = Starlette(
        routes=[
            *openai.routes,
            *admin.routes,
            *economics.routes,
            *health.routes,
            *dashboard.build_routes(cookie_secure=settings.dashboard_cookie_secure),
        ],
        lifespan=lifespan,
        exception_handlers={SluiceError: sluice_error, HTTPException: http_error},
    )
    app.add_middleware(BodyTimeout, total_s=settings.body_timeout_s,
                       idle_s=settings.body_idle_s)  # slow uploads: 408 (edge)
    app.add_middleware(RequestIdMiddleware)
    return app
