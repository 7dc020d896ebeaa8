"""Dashboard administrators: argon2 password hashes, and sessions ended by logout."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
import datetime as dt

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from sluice.gateway.db.models import Admin, RevokedSession, utcnow
from sluice.gateway.errors import InvalidRequest

_hasher = PasswordHasher()


async def create_admin(sessions: async_sessionmaker, username: str, password: str) -> Admin:
    if len(password) < 12:
        raise InvalidRequest("admin passwords must be at least 12 characters")
    admin = Admin(username=username, password_hash=_hasher.hash(password), created_at=utcnow())
    try:
        async with sessions() as session, session.begin():
            session.add(admin)
    except IntegrityError:
        raise InvalidRequest(f"admin '{username}' already exists") from None
    return admin


async def check_password(sessions: async_sessionmaker, username: str, password: str) -> Admin | None:
    """The admin if the password is right; None otherwise (same cost either way)."""
    async with sessions() as session:
        admin = await session.scalar(select(Admin).where(Admin.username == username))
    try:
        _hasher.verify(admin.password_hash if admin else _DUMMY, password)
    except VerificationError:
        return None
    return admin


_DUMMY = _hasher.hash("not-a-password-of-anyone")


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
