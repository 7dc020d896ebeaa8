"""Admin JWTs (operators): issuing, checking the signing secret, verifying.

HS256 with the algorithm pinned; every token carries exp/iat/aud/iss/jti, lives at most
MAX_ADMIN_TOKEN_TTL_S and can be revoked by its jti (the denylist is the caller's).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt

from sluice.gateway.errors import AuthenticationFailed

ADMIN_AUDIENCE = "sluice-admin"
ADMIN_ISSUER = "sluice"
ADMIN_ALGORITHM = "HS256"
MAX_ADMIN_TOKEN_TTL_S = 7 * 86400  # an admin token, however issued, lives at most a week
MIN_JWT_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key of at least the hash's size


def issue_admin_token(secret: str, subject: str, ttl_s: int) -> str:
    """A signed admin token; its lifetime is capped at MAX_ADMIN_TOKEN_TTL_S. Each carries
    a random ``jti`` by which it can be revoked before it expires."""
    check_jwt_secret(secret)
    now = int(time.time())
    claims = {
        "sub": subject,
        "aud": ADMIN_AUDIENCE,
        "iss": ADMIN_ISSUER,
        "iat": now,
        "exp": now + min(int(ttl_s), MAX_ADMIN_TOKEN_TTL_S),
        "jti": secrets.token_urlsafe(16),
    }
    return jwt.encode(claims, secret, algorithm=ADMIN_ALGORITHM)


def check_jwt_secret(secret: str) -> None:
    """A signing secret short enough to guess is refused (HS256 is only as strong as it)."""
    if len(secret.encode()) < MIN_JWT_SECRET_BYTES:
        raise ValueError(f"the admin JWT secret must be at least {MIN_JWT_SECRET_BYTES} bytes "
                         f"(got {len(secret.encode())}); generate one with "
                         "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`")


def verify_admin_token(token: str, secret: str) -> dict[str, Any]:
    """Claims of a valid admin token; AuthenticationFailed otherwise.

    The algorithm is pinned (no ``none``, no key confusion); exp/iat/aud/iss/jti are
    required, and a token that claims a lifetime over MAX_ADMIN_TOKEN_TTL_S is refused
    even when its signature is good. Revocation (the jti denylist) is checked by the caller,
    which has the database.
    """
    if len(secret.encode()) < MIN_JWT_SECRET_BYTES:  # unset or guessable: nothing verifies
        raise AuthenticationFailed("invalid admin token", code="invalid_token")
    claims = _decode_admin(token, secret)
    if claims["exp"] - claims["iat"] > MAX_ADMIN_TOKEN_TTL_S or claims["iat"] > time.time() + 60:
        raise AuthenticationFailed("admin token lifetime exceeds the maximum",
                                   code="invalid_token")
    if not isinstance(claims["jti"], str) or not 8 <= len(claims["jti"]) <= 64:
        raise AuthenticationFailed("invalid admin token", code="invalid_token")
    return claims


def _decode_admin(token: str, secret: str) -> dict[str, Any]:
    try:
        return jwt.decode(
            token,
            secret,
            algorithms=[ADMIN_ALGORITHM],
            audience=ADMIN_AUDIENCE,
            issuer=ADMIN_ISSUER,
            options={"require": ["exp", "iat", "sub", "aud", "iss", "jti"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthenticationFailed("admin token has expired", code="token_expired") from None
    except jwt.InvalidTokenError:
        raise AuthenticationFailed("invalid admin token", code="invalid_token") from None
