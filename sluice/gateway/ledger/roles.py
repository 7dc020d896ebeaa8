"""The gateway's database role: rows, never ownership (the audit trigger stays on).

Only an owner (or a superuser) can ``ALTER TABLE ... DISABLE TRIGGER``, and only a
superuser can ``SET session_replication_role``, the two ways around ``audit_log``'s
append-only trigger. :func:`grant_app_role` (``sluice db grant-app ROLE``, run as the
owner after each migration) gives a plain role what the gateway needs and no more.
"""

from __future__ import annotations

import re

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


class RoleError(Exception):
    """The role cannot be used for the gateway (one line for the operator)."""


GRANTS = (
    "GRANT USAGE ON SCHEMA public TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
    "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}",
    "REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM {role}",
    "REVOKE DELETE, TRUNCATE ON audit_chains FROM {role}",
    "REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON alembic_version FROM {role}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA public "
    "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {role}",
)


async def grant_app_role(engine: AsyncEngine, role: str) -> None:
    """Grant ``role`` (which must exist, and be neither a superuser nor the tables' owner)
    what the gateway needs. Run after every ``sluice migrate``, as the owner."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", role):
        raise RoleError(f"role name must be a plain lower-case identifier: {role!r}")
    if engine.dialect.name != "postgresql":
        raise RoleError("database roles exist only on Postgres")
    async with engine.begin() as conn:
        found = (await conn.execute(text(
            "SELECT rolsuper, pg_has_role(:r, (SELECT tableowner FROM pg_tables "
            "WHERE tablename = 'audit_log'), 'USAGE') FROM pg_roles WHERE rolname = :r"),
            {"r": role})).first()  # fmt: skip
        if found is None:
            raise RoleError(f"no such role: {role} (CREATE ROLE {role} LOGIN PASSWORD '...')")
        if found[0] or found[1]:
            raise RoleError(f"{role} is a superuser or owns the tables: it could switch the "
                           "audit trigger off; use a plain role")  # fmt: skip
        for stmt in GRANTS:
            await conn.execute(text(stmt.format(role=role)))
