"""Dashboard sessions: a signed JWT in an HttpOnly, SameSite=Strict cookie, and CSRF tokens.

The session token carries a random session id (``sid``); the CSRF token every form posts
back is ``HMAC(secret, sid)``, so it is bound to one session and worthless without it.
The login form, which comes before any session, uses a plain double-submit pair: a random
value in a short-lived cookie that the form must echo.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import jwt
from starlette.requests import Request
from starlette.responses import Response

AUDIENCE = "sluice-dashboard"
ISSUER = "sluice"
ALGORITHM = "HS256"
SESSION_COOKIE = "sluice_session"
LOGIN_CSRF_COOKIE = "sluice_login_csrf"
COOKIE_PATH = "/admin"


class SessionInvalid(Exception):
    """No usable session; ``expired`` tells a timed-out session from a bad one."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.expired = expired


@dataclass(frozen=True, slots=True)
class Session:
    username: str
    sid: str
    expires_at: int

    @property
    def actor(self) -> str:
        return f"admin:{self.username}"


def issue(secret: str, username: str, ttl_s: int) -> str:
    now = int(time.time())
    claims = {"sub": username, "sid": secrets.token_urlsafe(16), "aud": AUDIENCE,
              "iss": ISSUER, "iat": now, "exp": now + ttl_s}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(token: str, secret: str) -> Session:
    """The session of a valid token. The algorithm is pinned, so ``alg: none`` and
    tokens signed for another audience (the admin API's) are refused."""
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], audience=AUDIENCE,
                            issuer=ISSUER,
                            options={"require": ["exp", "iat", "sub", "sid", "aud", "iss"]})
    except jwt.ExpiredSignatureError:
        raise SessionInvalid("session expired", expired=True) from None
    except jwt.InvalidTokenError as exc:
        raise SessionInvalid(f"invalid session: {exc}") from None
    return Session(str(claims["sub"]), str(claims["sid"]), int(claims["exp"]))


def from_request(request: Request, secret: str) -> Session:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise SessionInvalid("not logged in")
    return verify(token, secret)


def csrf_token(secret: str, session: Session) -> str:
    return hmac.new(secret.encode(), f"csrf:{session.sid}".encode(), hashlib.sha256).hexdigest()


def csrf_ok(secret: str, session: Session, submitted: str | None) -> bool:
    return bool(submitted) and hmac.compare_digest(csrf_token(secret, session), str(submitted))


def login_csrf_ok(request: Request, submitted: str | None) -> bool:
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE)
    return bool(cookie and submitted) and hmac.compare_digest(str(cookie), str(submitted))


def secure_flag(request: Request, configured: bool | None) -> bool:
    """``configured`` wins; unset, cookies are Secure whenever the request came over HTTPS."""
    return request.url.scheme == "https" if configured is None else configured


def set_cookie(response: Response, request: Request, name: str, value: str, *, max_age: int,
               secure: bool | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, httponly=True,
                        samesite="strict", secure=secure_flag(request, secure))


def clear_cookie(response: Response, request: Request, name: str, *,
                 secure: bool | None) -> None:
    response.delete_cookie(name, path=COOKIE_PATH, httponly=True, samesite="strict",
                           secure=secure_flag(request, secure))
