"""Dashboard administrators: argon2 password hashes, and sessions ended by logout.

argon2 costs ~0.1 s of CPU per hash by design; it runs on a worker thread (``run``: the
gateway's bounded CPU pool, ``asyncio.to_thread`` by default), never on the event loop.
argon2-cffi releases the GIL while it hashes, so the loop keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from sluice.gateway.db.models import Admin, RevokedSession, utcnow
from sluice.gateway.errors import InvalidRequest

_hasher = PasswordHasher()

Run = Callable[..., Awaitable[Any]]  # run(fn, *args) on a worker thread (CpuPool.run)


async def create_admin(sessions: async_sessionmaker, username: str, password: str, *,
                       run: Run = asyncio.to_thread) -> Admin:
    if len(password) < 12:
        raise InvalidRequest("admin passwords must be at least 12 characters")
    if len(password) > 1024:
        raise InvalidRequest("admin passwords must be at most 1024 characters")
    admin = Admin(username=username, password_hash=await run(_hasher.hash, password),
                  created_at=utcnow())
    try:
        async with sessions() as session, session.begin():
            session.add(admin)
    except IntegrityError:
        raise InvalidRequest(f"admin '{username}' already exists") from None
    return admin


async def check_password(sessions: async_sessionmaker, username: str, password: str, *,
                         run: Run = asyncio.to_thread) -> Admin | None:
    """The admin if the password is right; None otherwise (same cost either way)."""
    async with sessions() as session:
        admin = await session.scalar(select(Admin).where(Admin.username == username))
    if not await run(_verify, admin.password_hash if admin else None, password):
        return None
    return admin


def _verify(stored: str | None, password: str) -> bool:
    try:
        return bool(_hasher.verify(stored or _dummy_hash(), password)) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def _dummy_hash() -> str:
    """Hashed against for unknown users, so they cost what a real one does."""
    return _hasher.hash("not-a-password-of-anyone")


async def revoke_session(sessions: async_sessionmaker, sid: str, expires_at: int) -> None:
    """Record a logged-out session id until its token expires; drop rows already past that."""
    now = utcnow()
    async with sessions() as session, session.begin():
        await session.execute(delete(RevokedSession).where(RevokedSession.expires_at < now))
        if await session.get(RevokedSession, sid) is None:
            session.add(RevokedSession(sid=sid, expires_at=dt.datetime.fromtimestamp(expires_at, dt.UTC),
                                       revoked_at=now))


async def session_revoked(sessions: async_sessionmaker, sid: str) -> bool:
    async with sessions() as session:
        return await session.get(RevokedSession, sid) is not None
