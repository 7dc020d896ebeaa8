"""API-key authentication (tenants' callers); admin JWTs (operators) are in admin_jwt.py.

API keys look like ``sk-<12-char prefix><40-char secret>``. The prefix is public and
indexes the row; only the SHA-256 of the whole key is stored. A key has ~238 bits of
entropy, so a fast hash is the right tool (a password hash would only slow every
request). Lookups are cached for ``key_cache_ttl_s`` so a revocation is honoured by
every process within that many seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import secrets
import string
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker

# Admin JWTs live in accounts/admin_jwt.py; importable from here as before.
from sluice.gateway.accounts.admin_jwt import (  # noqa: F401
    ADMIN_AUDIENCE,
    ADMIN_ISSUER,
    MAX_ADMIN_TOKEN_TTL_S,
    check_jwt_secret,
    issue_admin_token,
    verify_admin_token,
)
from sluice.gateway.db.models import ApiKey, Tenant, utcnow
from sluice.gateway.errors import (
    AuthenticationFailed,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
)
from sluice.gateway.ledger.key_cache import KeyCacheFile

log = logging.getLogger("sluice.auth")

KEY_PREFIX = "sk-"
PREFIX_LEN = 12
SECRET_LEN = 40
_ALPHABET = string.ascii_letters + string.digits

# How long a cached key stays usable while the database cannot be reached.
STALE_IF_ERROR_S = 600.0
# Bounds of the in-memory key cache (least recently used go first).
MAX_KNOWN_PREFIXES = 100_000
MAX_UNKNOWN_PREFIXES = 10_000


def generate_key() -> tuple[str, str]:
    """A new key and its public prefix."""
    prefix = "".join(secrets.choice(_ALPHABET) for _ in range(PREFIX_LEN))
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_LEN))
    return f"{KEY_PREFIX}{prefix}{secret}", prefix


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: resolved from an API key, passed down the request path."""

    tenant_id: str
    tenant_name: str
    key_id: str
    models: frozenset[str] | None
    key_rpm: int | None
    key_tpm: int | None
    tenant_rpm: int | None
    tenant_tpm: int | None
    guard_policy: dict[str, Any] | None
    store_prompts: bool
    never_used: bool = False  # no use recorded when the key was looked up

    def check_model(self, model: str, shown: str | None = None) -> None:
        """NotFound, word for word what an unknown model gets, for a model this key may
        not use: a scoped key must not learn which other models exist (``shown``: the
        name the client asked for, when ``model`` is what an alias resolved to)."""
        if self.models is not None and model not in self.models:
            raise NotFound(f"The model '{shown or model}' does not exist", param="model",
                           code="model_not_found")


@dataclass(frozen=True, slots=True)
class _Entry:
    secret_hash: str
    principal: Principal
    expires_at: dt.datetime | None
    revoked: bool
    disabled: bool


class KeyStore:
    """Resolves ``Authorization: Bearer sk-...`` to a :class:`Principal`."""

    def __init__(self, sessions: async_sessionmaker, *, cache_ttl_s: float = 5.0,
                 persisted: KeyCacheFile | None = None) -> None:
        self._sessions = sessions
        self._ttl = cache_ttl_s
        self._persisted = persisted  # on disk, for SLUICE_DB_OUTAGE=serve (ledger/key_cache.py)
        # Known prefixes and, apart, unknown ones: both LRU-bounded, so made-up keys
        # (anyone can send them, unauthenticated) cannot grow memory.
        self._cache: OrderedDict[str, tuple[float, _Entry]] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[_Entry | None]] = {}
        self._used: set[str] = set()

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer sk-...'."
            )
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key.startswith(KEY_PREFIX):
            raise AuthenticationFailed("Incorrect API key provided.")
        if len(key) != len(KEY_PREFIX) + PREFIX_LEN + SECRET_LEN:
            raise AuthenticationFailed("Incorrect API key provided.")
        entry = await self._lookup(key[len(KEY_PREFIX) : len(KEY_PREFIX) + PREFIX_LEN])
        # Compare even when the prefix is unknown, so timing does not tell prefixes apart.
        expected = entry.secret_hash if entry else "0" * 64
        if not hmac.compare_digest(hash_key(key), expected) or entry is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        if entry.revoked:
            raise AuthenticationFailed("This API key has been revoked.", code="key_revoked")
        if entry.expires_at is not None and entry.expires_at <= utcnow():
            raise AuthenticationFailed("This API key has expired.", code="key_expired")
        if entry.disabled:
            raise PermissionDenied("This tenant is disabled.", code="tenant_disabled")
        self._used.add(entry.principal.key_id)
        return entry.principal

    def invalidate(self, prefix: str | None = None) -> None:
        if prefix is None:
            self._cache.clear()
            self._unknown.clear()
        else:
            self._cache.pop(prefix, None)
            self._unknown.pop(prefix, None)

    def cached(self) -> tuple[int, int]:
        """(known, unknown) prefixes held in memory."""
        return len(self._cache), len(self._unknown)

    def _cached(self, prefix: str) -> tuple[float, _Entry | None] | None:
        if (hit := self._cache.get(prefix)) is not None:
            self._cache.move_to_end(prefix)
            return hit
        if (at := self._unknown.get(prefix)) is not None:
            return at, None
        return None

    def _remember(self, prefix: str, entry: _Entry | None) -> None:
        now = time.monotonic()
        if entry is None:
            self._cache.pop(prefix, None)
            table: OrderedDict[str, Any] = self._unknown
            table[prefix], bound = now, MAX_UNKNOWN_PREFIXES
        else:
            self._unknown.pop(prefix, None)
            table = self._cache
            table[prefix], bound = (now, entry), MAX_KNOWN_PREFIXES
        table.move_to_end(prefix)
        while len(table) > bound:
            table.popitem(last=False)

    async def flush_last_used(self) -> None:
        """Write ``last_used_at`` for keys used since the last flush (one UPDATE)."""
        if not self._used:
            return
        used, self._used = self._used, set()
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(ApiKey).where(ApiKey.id.in_(used)).values(last_used_at=utcnow())
            )

    async def _lookup(self, prefix: str) -> _Entry | None:
        now = time.monotonic()
        hit = self._cached(prefix)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        if (pending := self._inflight.get(prefix)) is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_Entry | None] = asyncio.get_running_loop().create_future()
        self._inflight[prefix] = future
        try:
            try:
                entry = await self._load(prefix)
            except (SQLAlchemyError, OSError) as exc:
                # The database is unreachable: serve what we knew (stale-if-error, bounded),
                # or tell the client to come back, never a 500.
                if hit is not None and now - hit[0] < STALE_IF_ERROR_S:
                    log.warning("key lookup failed (%s); serving the cached entry", exc)
                    entry = hit[1]
                elif self._persisted and (saved := self._persisted.load(prefix)) is not None:
                    log.warning("key lookup failed (%s); serving the persisted entry", exc)
                    entry = _entry_from_json(saved)
                else:
                    raise ServiceUnavailable(
                        "cannot verify the API key right now; try again shortly",
                        retry_after_s=2) from None
            else:
                self._remember(prefix, entry)
                if self._persisted is not None:
                    self._persisted.save(prefix, None if entry is None else _entry_json(entry))
            future.set_result(entry)
            return entry
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            del self._inflight[prefix]

    async def _load(self, prefix: str) -> _Entry | None:
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(ApiKey, Tenant)
                    .join(Tenant, Tenant.id == ApiKey.tenant_id)
                    .where(ApiKey.prefix == prefix)
                )
            ).first()
        if row is None:
            return None
        key, tenant = row
        principal = Principal(
            tenant_id=tenant.id,
            tenant_name=tenant.name,
            key_id=key.id,
            models=frozenset(key.models) if key.models is not None else None,
            key_rpm=key.rpm,
            key_tpm=key.tpm,
            tenant_rpm=tenant.rpm,
            tenant_tpm=tenant.tpm,
            guard_policy=tenant.guard_policy,
            store_prompts=tenant.store_prompts,
            never_used=key.last_used_at is None,
        )
        expires = key.expires_at  # aware UTC (db.models.UTCDateTime)
        return _Entry(
            secret_hash=key.secret_hash,
            principal=principal,
            expires_at=expires,
            revoked=key.revoked_at is not None,
            disabled=tenant.disabled,
        )


def _entry_json(entry: _Entry) -> dict[str, Any]:
    principal = dataclasses.asdict(entry.principal)
    principal["models"] = None if entry.principal.models is None else sorted(entry.principal.models)
    expires = None if entry.expires_at is None else entry.expires_at.isoformat()
    return {"secret_hash": entry.secret_hash, "principal": principal, "expires_at": expires,
            "revoked": entry.revoked, "disabled": entry.disabled}  # fmt: skip


def _entry_from_json(data: dict[str, Any]) -> _Entry:
    principal = dict(data["principal"])
    if principal["models"] is not None:
        principal["models"] = frozenset(principal["models"])
    expires = data["expires_at"]
    return _Entry(secret_hash=data["secret_hash"], principal=Principal(**principal),
                  expires_at=None if expires is None else dt.datetime.fromisoformat(expires),
                  revoked=data["revoked"], disabled=data["disabled"])  # fmt: skip
