"""/admin/api: tenants, keys, usage and runtime, for operators holding an admin JWT."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from sluice.gateway.accounts.tenants import key_dict, parse_duration, tenant_dict
from sluice.gateway.accounts.auth import verify_admin_token
from sluice.gateway.ledger.exports import iter_usage_export
from sluice.gateway.db.models import UsageDaily
from sluice.gateway.errors import AuthenticationFailed, InvalidRequest
from sluice.gateway.routes.openai import parse
from sluice.gateway.state import AppState, app_state
from sluice.gateway.http.streaming import read_json
from sluice.gateway.util import json_response

Limit = Annotated[int, Field(ge=1)] | None


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    rpm: Limit = None
    tpm: Limit = None


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    disabled: bool | None = None
    rpm: Limit = None
    tpm: Limit = None
    stripe_customer_id: str | None = None
    guard_policy: dict[str, Any] | None = None
    store_prompts: bool | None = None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = ""
    models: list[str] | None = None
    expires_in: str | None = None
    rpm: Limit = None
    tpm: Limit = None


def admin(request: Request) -> AppState:
    """The gateway's state, once the caller has shown a valid admin token."""
    gateway = app_state(request)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("admin API requires 'Authorization: Bearer <admin JWT>'")
    request.state.admin = verify_admin_token(token.strip(), gateway.settings.admin_jwt_secret)
    return gateway


def actor(request: Request) -> str:
    return f"admin:{request.state.admin['sub']}"


async def list_tenants(request: Request) -> Response:
    gateway = admin(request)
    return json_response({"data": [tenant_dict(t) for t in await gateway.accounts.list_tenants()]})


async def create_tenant(request: Request) -> Response:
    gateway = admin(request)
    body = parse(TenantCreate, await read_json(request, 65536))
    tenant = await gateway.accounts.create_tenant(body.name, rpm=body.rpm, tpm=body.tpm,
                                                  actor=actor(request))
    return json_response(tenant_dict(tenant), status=201)


async def get_tenant(request: Request) -> Response:
    gateway = admin(request)
    return json_response(tenant_dict(await gateway.accounts.tenant(request.path_params["tenant"])))


async def update_tenant(request: Request) -> Response:
    gateway = admin(request)
    body = parse(TenantUpdate, await read_json(request, 65536))
    changes = body.model_dump(exclude_unset=True)
    tenant = await gateway.accounts.update_tenant(request.path_params["tenant"],
                                                  actor=actor(request), **changes)
    gateway.keys.invalidate()
    return json_response(tenant_dict(tenant))


async def list_keys(request: Request) -> Response:
    gateway = admin(request)
    tenant = request.path_params.get("tenant") or request.query_params.get("tenant")
    return json_response({"data": [key_dict(k) for k in await gateway.accounts.list_keys(tenant)]})


async def create_key(request: Request) -> Response:
    gateway = admin(request)
    body = parse(KeyCreate, await read_json(request, 65536))
    expires = parse_duration(body.expires_in) if body.expires_in else None
    created = await gateway.accounts.create_key(
        request.path_params["tenant"],
        name=body.name,
        models=body.models,
        expires_in=expires,
        rpm=body.rpm,
        tpm=body.tpm,
        actor=actor(request),
    )
    return json_response({**key_dict(created.key), "key": created.secret}, status=201)


async def revoke_key(request: Request) -> Response:
    gateway = admin(request)
    key = await gateway.accounts.revoke_key(request.path_params["key"], actor=actor(request))
    gateway.keys.invalidate(key.prefix)
    return json_response(key_dict(key))


def _day(value: str | None, default: dt.date) -> dt.date:
    if not value:
        return default
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"invalid date '{value}' (use YYYY-MM-DD)") from None


async def usage(request: Request) -> Response:
    """Daily usage from the rollup, grouped by tenant, key or model."""
    gateway = admin(request)
    q = request.query_params
    today = dt.datetime.now(dt.UTC).date()
    start = _day(q.get("from"), today - dt.timedelta(days=30))
    end = _day(q.get("to"), today)
    group = q.get("group_by", "tenant")
    columns = {"tenant": UsageDaily.tenant_id, "key": UsageDaily.key_id, "model": UsageDaily.model}
    if group not in columns:
        raise InvalidRequest("group_by must be one of tenant, key, model", param="group_by")
    column = columns[group]
    query = (
        select(
            UsageDaily.day,
            column,
            func.sum(UsageDaily.requests),
            func.sum(UsageDaily.prompt_tokens),
            func.sum(UsageDaily.completion_tokens),
        )
        .where(UsageDaily.day >= start, UsageDaily.day <= end)
        .group_by(UsageDaily.day, column)
        .order_by(UsageDaily.day, column)
    )
    if tenant := q.get("tenant"):
        query = query.where(UsageDaily.tenant_id == (await gateway.accounts.tenant(tenant)).id)
    async with gateway.sessions() as session:
        rows = (await session.execute(query)).all()
    return json_response(
        {
            "from": start.isoformat(),
            "to": end.isoformat(),
            "group_by": group,
            "data": [
                {
                    "day": day.isoformat(),
                    group: name,
                    "requests": int(n),
                    "prompt_tokens": int(p),
                    "completion_tokens": int(c),
                }
                for day, name, n, p, c in rows
            ],
        }
    )


def _instant(value: str | None, default: dt.datetime) -> dt.datetime:
    if not value:
        return default
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"invalid time '{value}' (use ISO 8601)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


async def usage_export(request: Request) -> Response:
    """Usage events as CSV or JSON lines, streamed in constant memory."""
    gateway = admin(request)
    q = request.query_params
    now = dt.datetime.now(dt.UTC)
    start = _instant(q.get("from"), now - dt.timedelta(days=30))
    end = _instant(q.get("to"), now)
    fmt = q.get("format", "csv")
    if fmt not in ("csv", "jsonl"):
        raise InvalidRequest("format must be csv or jsonl", param="format")
    tenant = (await gateway.accounts.tenant(q["tenant"])).id if q.get("tenant") else None
    await gateway.audit.record(actor(request), "usage.export", tenant or "*", decision="allow",
                               details={"from": start.isoformat(), "to": end.isoformat(),
                                        "format": fmt})
    body = iter_usage_export(gateway.db, start=start, end=end, tenant=tenant,
                             fmt=fmt)  # type: ignore[arg-type]
    media = "text/csv" if fmt == "csv" else "application/x-ndjson"
    name = f"usage-{start.date()}-{end.date()}.{fmt}"
    return StreamingResponse(body, media_type=media,
                             headers={"content-disposition": f'attachment; filename="{name}"'})


async def runtime(request: Request) -> Response:
    gateway = admin(request)
    return json_response({"backends": gateway.runtime.status()})


routes = [
    Route("/admin/api/tenants", list_tenants, methods=["GET"]),
    Route("/admin/api/tenants", create_tenant, methods=["POST"]),
    Route("/admin/api/tenants/{tenant}", get_tenant, methods=["GET"]),
    Route("/admin/api/tenants/{tenant}", update_tenant, methods=["PATCH"]),
    Route("/admin/api/tenants/{tenant}/keys", list_keys, methods=["GET"]),
    Route("/admin/api/tenants/{tenant}/keys", create_key, methods=["POST"]),
    Route("/admin/api/keys", list_keys, methods=["GET"]),
    Route("/admin/api/keys/{key}/revoke", revoke_key, methods=["POST"]),
    Route("/admin/api/usage", usage, methods=["GET"]),
    Route("/admin/api/usage/export", usage_export, methods=["GET"]),
    Route("/admin/api/runtime", runtime, methods=["GET"]),
]
