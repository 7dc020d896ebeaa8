"""The admin API's gate: an admin JWT (signature, audience, issuer, lifetime, not
revoked), the acting operator's name, and database failures as 503s."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import Response

from sluice.gateway.accounts.admin_jwt import verify_admin_token
from sluice.gateway.accounts.admins import session_revoked
from sluice.gateway.errors import AuthenticationFailed, ServiceUnavailable
from sluice.gateway.state import AppState, app_state

log = logging.getLogger("sluice.admin")


def admin(request: Request) -> AppState:
    """The gateway's state, once the caller has shown a valid admin token (signature,
    audience, issuer, lifetime; revocation is checked by :func:`admin_checked`)."""
    gateway = app_state(request)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("admin API requires 'Authorization: Bearer <admin JWT>'")
    request.state.admin = verify_admin_token(token.strip(), gateway.settings.admin_jwt_secret)
    return gateway


async def admin_checked(request: Request) -> AppState:
    """:func:`admin`, and the token's ``jti`` not revoked."""
    gateway = admin(request)
    if await session_revoked(gateway.sessions, request.state.admin["jti"]):
        raise AuthenticationFailed("admin token has been revoked", code="token_revoked")
    return gateway


def actor(request: Request) -> str:
    return f"admin:{request.state.admin['sub']}"


def guarded(endpoint: Callable[[Request], Awaitable[Response]],
             ) -> Callable[[Request], Awaitable[Response]]:
    """The database failing mid-request is a 503 (retry), never a 500."""

    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("admin API %s %s: database error (%s)", request.method,
                        request.url.path, type(exc).__name__)
            raise ServiceUnavailable("the database is unavailable; try again shortly",
                                     retry_after_s=2) from None

    return guarded
