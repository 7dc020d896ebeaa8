"""Security headers on every dashboard response, and a mount that leaves /admin/api alone."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# No inline script or style anywhere: scripts and CSS are files under /admin/static.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "form-action 'self'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
])
HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
}


COOKIE_SECURE_SCOPE_KEY = "sluice.dashboard.cookie_secure"


class SecurityHeadersMiddleware:
    """Adds the headers above, and hands the cookie policy (``cookie_secure``: True, False,
    or None for "when the request came over HTTPS") to the handlers through the scope."""

    def __init__(self, app: ASGIApp, cookie_secure: bool | None = None) -> None:
        self.app = app
        self.cookie_secure = cookie_secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[COOKIE_SECURE_SCOPE_KEY] = self.cookie_secure

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers[name] = value
                if headers.get("content-type", "").startswith(("text/html", "text/csv")):
                    # Pages show tenants, keys and audit records: keep them out of caches.
                    headers["cache-control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


class DashboardMount(Mount):
    """``Mount("/admin")`` that never matches ``/admin/api/...``, so the JSON admin API keeps
    its routes (and its 404/405 answers) whichever order the two are mounted in."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path", "")
        if path == "/admin/api" or path.startswith("/admin/api/"):
            return Match.NONE, {}
        return super().matches(scope)
