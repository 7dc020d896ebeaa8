"""Tenants and their API keys: create, list, revoke (used by the CLI and the admin API)."""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from sluice.gateway.ledger.audit import AuditLog
from sluice.gateway.accounts.auth import generate_key, hash_key
from sluice.gateway.db.models import ApiKey, Tenant, utcnow
from sluice.gateway.errors import InvalidRequest, NotFound, ServiceUnavailable

M = TypeVar("M", bound=BaseModel)

_DURATION = re.compile(r"^(\d{1,9})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_REF = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # what a tenant name or an id can look like
MAX_KEY_LIFETIME = dt.timedelta(days=3660)  # ten years: far enough, and a datetime can hold it
MAX_LIMIT = 2**31 - 1  # rpm/tpm are INTEGER columns

Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT)] | None
Text = Annotated[str, Field(max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$")]


def parse_duration(text: str) -> dt.timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w``; at most MAX_KEY_LIFETIME."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise InvalidRequest(f"invalid duration '{text[:40]}' (use e.g. 30d, 12h, 90m)",
                             param="expires_in")
    seconds = int(match[1]) * _UNITS[match[2]]
    if not 0 < seconds <= MAX_KEY_LIFETIME.total_seconds():
        raise InvalidRequest(f"expires_in must be between 1s and {MAX_KEY_LIFETIME.days}d",
                             param="expires_in")
    return dt.timedelta(seconds=seconds)


class TenantChanges(BaseModel):
    """What may change on a tenant: the admin API's PATCH body and the dashboard's form
    both go through it (Accounts.update_tenant), so both refuse the same values."""

    model_config = ConfigDict(extra="forbid", strict=True)
    disabled: bool | None = None
    rpm: Limit = None
    tpm: Limit = None
    stripe_customer_id: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9_-]*$")] | None = None
    # Its content is checked against pipeline.guard.GuardPolicy by the callers (admin API,
    # dashboard): accounts/ does not import the pipeline.
    guard_policy: dict[str, Any] | None = None
    store_prompts: bool | None = None

    @model_validator(mode="after")
    def _flags_not_null(self) -> TenantChanges:
        for name in ("disabled", "store_prompts"):  # NOT NULL columns: omit them, or a bool
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} must be true or false")
        return self


class KeySpec(BaseModel):
    """A new key's settings (admin API body, dashboard form, CLI)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Text = ""
    models: Annotated[list[Text], Field(min_length=1, max_length=256)] | None = None
    expires_in: Annotated[str, Field(max_length=16)] | None = None
    rpm: Limit = None
    tpm: Limit = None


def checked(model: type[M], data: Any) -> M:
    """``data`` validated by ``model``, or InvalidRequest naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or None
        message = err["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"{where}: {message}" if where else message,
                             param=where) from None


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    secret: str  # shown once, never stored


def tenant_dict(t: Tenant) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "disabled": t.disabled,
        "rpm": t.rpm,
        "tpm": t.tpm,
        "stripe_customer_id": t.stripe_customer_id,
        "guard_policy": t.guard_policy,
        "store_prompts": t.store_prompts,
        "created_at": t.created_at.isoformat(),
    }


def key_dict(k: ApiKey) -> dict[str, Any]:
    def iso(value: dt.datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "id": k.id,
        "tenant_id": k.tenant_id,
        "prefix": f"sk-{k.prefix}",
        "name": k.name,
        "models": k.models,
        "rpm": k.rpm,
        "tpm": k.tpm,
        "created_at": iso(k.created_at),
        "expires_at": iso(k.expires_at),
        "revoked_at": iso(k.revoked_at),
        "last_used_at": iso(k.last_used_at),
    }


class Accounts:
    """Every change is an audit event when an audit log is attached (``actor`` says who).

    With a shared chain (the gateway's ``admin`` chain, the CLI's ``cli`` chain) the audit
    record is written in the change's own transaction: a change never commits without its
    record. A buffered per-process chain records it right after the commit."""

    def __init__(self, sessions: async_sessionmaker, *, audit: AuditLog | None = None) -> None:
        self.sessions = sessions
        self.audit = audit

    async def _audit(self, session: AsyncSession, actor: str, action: str, target: str,
                     **details: Any) -> Callable[[], Awaitable[None]]:
        """Record the change inside ``session``'s transaction when the chain allows it;
        returns what to await once the transaction has committed."""
        audit = self.audit
        if audit is None:
            return _nothing
        clean = {k: v for k, v in details.items() if v is not None}
        if audit.shared:
            try:
                record = await audit.record_in(await session.connection(), actor, action,
                                               target, decision="allow", details=clean)
            except IntegrityError:  # another writer took the chain's next seq (SQLite)
                raise ServiceUnavailable("a concurrent change; try again", retry_after_s=1) \
                    from None
            return functools.partial(audit.committed, record)
        return functools.partial(audit.record, actor, action, target, decision="allow",
                                 details=clean)

    async def create_tenant(
        self, name: str, *, rpm: int | None = None, tpm: int | None = None, actor: str = "system"
    ) -> Tenant:
        if not _NAME.fullmatch(name):
            raise InvalidRequest(
                "tenant name must be 1-128 characters of letters, digits, '_', '.', '-'",
                param="name",
            )
        checked(TenantChanges, {"rpm": rpm, "tpm": tpm})
        tenant = Tenant(name=name, rpm=rpm, tpm=tpm, created_at=utcnow())
        try:
            async with self.sessions() as session, session.begin():
                session.add(tenant)
                await session.flush()  # a duplicate name fails here, before the audit
                done = await self._audit(session, actor, "tenant.create", tenant.id,
                                         name=name, rpm=rpm, tpm=tpm)
        except IntegrityError:
            raise InvalidRequest(f"tenant '{name}' already exists", param="name") from None
        await done()
        return tenant

    async def tenant(self, ref: str) -> Tenant:
        """A tenant by id or by name."""
        if not _REF.fullmatch(ref):  # nothing stored looks like it (and NUL breaks Postgres)
            raise NotFound(f"no tenant '{ref[:64]}'", code="tenant_not_found")
        async with self.sessions() as session:
            row = await session.scalar(select(Tenant).where((Tenant.id == ref) | (Tenant.name == ref)))
        if row is None:
            raise NotFound(f"no tenant '{ref}'", code="tenant_not_found")
        return row

    async def list_tenants(self) -> list[Tenant]:
        async with self.sessions() as session:
            return list(await session.scalars(select(Tenant).order_by(Tenant.created_at)))

    async def update_tenant(self, ref: str, *, actor: str = "system", **changes: Any) -> Tenant:
        changes = checked(TenantChanges, changes).model_dump(exclude_unset=True)
        tenant = await self.tenant(ref)
        async with self.sessions() as session, session.begin():
            tenant = await session.get_one(Tenant, tenant.id)
            for name, value in changes.items():
                setattr(tenant, name, value)
            done = await self._audit(session, actor, "tenant.update", tenant.id,
                                     changes=changes)
        await done()
        return tenant

    async def create_key(
        self,
        tenant_ref: str,
        *,
        name: str = "",
        models: list[str] | None = None,
        expires_in: dt.timedelta | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        actor: str = "system",
    ) -> CreatedKey:
        checked(KeySpec, {"name": name, "models": models, "rpm": rpm, "tpm": tpm})
        if expires_in is not None and expires_in > MAX_KEY_LIFETIME:  # (parse_duration: > 0)
            raise InvalidRequest(f"expires_in must be at most {MAX_KEY_LIFETIME.days}d",
                                 param="expires_in")
        tenant = await self.tenant(tenant_ref)
        secret, prefix = generate_key()
        now = utcnow()
        key = ApiKey(
            tenant_id=tenant.id,
            prefix=prefix,
            secret_hash=hash_key(secret),
            name=name,
            models=models,
            rpm=rpm,
            tpm=tpm,
            created_at=now,
            expires_at=now + expires_in if expires_in else None,
        )
        async with self.sessions() as session, session.begin():
            session.add(key)
            await session.flush()
            done = await self._audit(session, actor, "key.create", key.id, tenant=tenant.id,
                                     prefix=prefix, models=models, expires_at=key.expires_at)
        await done()
        return CreatedKey(key=key, secret=secret)

    async def list_keys(self, tenant_ref: str | None = None) -> list[ApiKey]:
        query = select(ApiKey).order_by(ApiKey.created_at)
        if tenant_ref is not None:
            query = query.where(ApiKey.tenant_id == (await self.tenant(tenant_ref)).id)
        async with self.sessions() as session:
            return list(await session.scalars(query))

    async def key(self, key_id: str, *, tenant_id: str | None = None) -> ApiKey:
        if not _REF.fullmatch(key_id):
            raise NotFound(f"no API key '{key_id[:64]}'", code="key_not_found")
        async with self.sessions() as session:
            key = await session.get(ApiKey, key_id)
        if key is None or (tenant_id is not None and key.tenant_id != tenant_id):
            raise NotFound(f"no API key '{key_id}'", code="key_not_found")
        return key

    async def revoke_key(self, key_id: str, *, actor: str = "system") -> ApiKey:
        if not _REF.fullmatch(key_id):
            raise NotFound(f"no API key '{key_id[:64]}'", code="key_not_found")
        async with self.sessions() as session, session.begin():
            key = await session.get(ApiKey, key_id)
            if key is None:
                raise NotFound(f"no API key '{key_id}'", code="key_not_found")
            if key.revoked_at is None:
                key.revoked_at = utcnow()
            done = await self._audit(session, actor, "key.revoke", key.id, tenant=key.tenant_id)
        await done()
        return key


async def _nothing() -> None:
    return None
