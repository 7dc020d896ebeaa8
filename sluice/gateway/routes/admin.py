"""/admin/api: tenants, keys, usage and runtime, for operators holding an admin JWT."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from sluice.gateway.accounts.admins import revoke_session, session_revoked
from sluice.gateway.accounts.tenants import (
    KeySpec,
    Limit,
    TenantChanges,
    key_dict,
    parse_duration,
    tenant_dict,
)
from sluice.gateway.accounts.auth import MAX_ADMIN_TOKEN_TTL_S, verify_admin_token
from sluice.gateway.ledger.exports import iter_usage_export
from sluice.gateway.pipeline.guard import GuardPolicy
from sluice.gateway.db.accounting import USAGE_GROUPS, usage_by_group
from sluice.gateway.db.models import to_utc
from sluice.gateway.errors import AuthenticationFailed, InvalidRequest, ServiceUnavailable
from sluice.gateway.routes.openai import parse
from sluice.gateway.state import AppState, app_state
from sluice.gateway.http.streaming import read_json
from sluice.gateway.util import json_response

log = logging.getLogger("sluice.admin")


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=128)]
    rpm: Limit = None
    tpm: Limit = None


class TenantUpdate(TenantChanges):
    """The dashboard's form and this body are checked by the same TenantChanges (in
    Accounts.update_tenant); the guard policy must also load as a GuardPolicy, or every
    request of the tenant would fail when the guard reads it."""

    @field_validator("guard_policy")
    @classmethod
    def _loads(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            GuardPolicy.model_validate(value)
        return value


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


async def list_tenants(request: Request) -> Response:
    gateway = await admin_checked(request)
    return json_response({"data": [tenant_dict(t) for t in await gateway.accounts.list_tenants()]})


async def create_tenant(request: Request) -> Response:
    gateway = await admin_checked(request)
    body = parse(TenantCreate, await read_json(request, 65536))
    tenant = await gateway.accounts.create_tenant(body.name, rpm=body.rpm, tpm=body.tpm,
                                                  actor=actor(request))
    return json_response(tenant_dict(tenant), status=201)


async def get_tenant(request: Request) -> Response:
    gateway = await admin_checked(request)
    return json_response(tenant_dict(await gateway.accounts.tenant(request.path_params["tenant"])))


async def update_tenant(request: Request) -> Response:
    gateway = await admin_checked(request)
    body = parse(TenantUpdate, await read_json(request, 65536))
    changes = body.model_dump(exclude_unset=True)
    tenant = await gateway.accounts.update_tenant(request.path_params["tenant"],
                                                  actor=actor(request), **changes)
    gateway.keys.invalidate()
    return json_response(tenant_dict(tenant))


async def list_keys(request: Request) -> Response:
    gateway = await admin_checked(request)
    tenant = request.path_params.get("tenant") or request.query_params.get("tenant")
    return json_response({"data": [key_dict(k) for k in await gateway.accounts.list_keys(tenant)]})


async def create_key(request: Request) -> Response:
    gateway = await admin_checked(request)
    body = parse(KeySpec, await read_json(request, 65536))
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
    gateway = await admin_checked(request)
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
    gateway = await admin_checked(request)
    q = request.query_params
    today = dt.datetime.now(dt.UTC).date()
    start = _day(q.get("from"), today - dt.timedelta(days=30))
    end = _day(q.get("to"), today)
    group = q.get("group_by", "tenant")
    if group not in USAGE_GROUPS:
        raise InvalidRequest("group_by must be one of tenant, key, model", param="group_by")
    tenant = (await gateway.accounts.tenant(q["tenant"])).id if q.get("tenant") else None
    query = usage_by_group(start=start, end=end, group_by=group, tenant_id=tenant, per_day=True)
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
    return to_utc(parsed)


async def usage_export(request: Request) -> Response:
    """Usage events as CSV or JSON lines, streamed in constant memory."""
    gateway = await admin_checked(request)
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


class TokenRevoke(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    jti: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] | None = None
    expires_at: Annotated[int, Field(ge=0, le=2**40)] | None = None


async def revoke_token(request: Request) -> Response:
    """Revoke an admin token by its ``jti`` (the presented token itself when the body has
    none). Kept on the denylist until the token would have expired (at most a week)."""
    gateway = await admin_checked(request)
    body = parse(TokenRevoke, await read_json(request, 4096))
    claims = request.state.admin
    jti = body.jti or claims["jti"]
    own = jti == claims["jti"]
    expires = claims["exp"] if own else (body.expires_at or
                                         int(time.time()) + MAX_ADMIN_TOKEN_TTL_S)
    await revoke_session(gateway.sessions, jti, min(expires, int(time.time()) + MAX_ADMIN_TOKEN_TTL_S))
    await gateway.audit.record(actor(request), "admin.token_revoke", jti, decision="allow")
    return json_response({"jti": jti, "revoked": True})


async def runtime(request: Request) -> Response:
    gateway = await admin_checked(request)
    return json_response({"backends": gateway.runtime.status()})


def _guarded(endpoint: Callable[[Request], Awaitable[Response]],
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


def openapi() -> dict[str, Any]:
    """An OpenAPI 3.1 description of /admin/api, from the same models that validate it
    (the reliability suite fuzzes it with schemathesis)."""
    bodies = {"TenantCreate": TenantCreate, "TenantUpdate": TenantUpdate, "KeySpec": KeySpec,
              "TokenRevoke": TokenRevoke}
    schemas = {name: model.model_json_schema(ref_template="#/components/schemas/{model}")
               for name, model in bodies.items()}
    for schema in list(schemas.values()):
        schemas.update(schema.pop("$defs", {}))

    def op(summary: str, *, body: str | None = None, path: tuple[str, ...] = (),
           query: tuple[str, ...] = (), ok: str = "200") -> dict[str, Any]:
        operation: dict[str, Any] = {
            "summary": summary,
            "parameters": [{"name": n, "in": "path", "required": True,
                            "schema": {"type": "string"}} for n in path]
            + [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
               for n in query],
            "responses": {ok: {"description": "done"},
                          "400": {"description": "invalid input"},
                          "401": {"description": "no valid admin token"},
                          "404": {"description": "not found"}},
        }
        if body:
            operation["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{body}"}}}}
        return operation

    usage_query = ("from", "to", "group_by", "tenant")
    return {
        "openapi": "3.1.0",
        "info": {"title": "sluice admin API", "version": "1"},
        "components": {"schemas": schemas, "securitySchemes": {
            "admin": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
        "security": [{"admin": []}],
        "paths": {
            "/admin/api/tenants": {"get": op("list tenants"),
                                   "post": op("create a tenant", body="TenantCreate", ok="201")},
            "/admin/api/tenants/{tenant}": {
                "get": op("a tenant", path=("tenant",)),
                "patch": op("change a tenant", body="TenantUpdate", path=("tenant",))},
            "/admin/api/tenants/{tenant}/keys": {
                "get": op("a tenant's keys", path=("tenant",)),
                "post": op("create a key", body="KeySpec", path=("tenant",), ok="201")},
            "/admin/api/keys": {"get": op("all keys", query=("tenant",))},
            "/admin/api/keys/{key}/revoke": {"post": op("revoke a key", path=("key",))},
            "/admin/api/usage": {"get": op("daily usage", query=usage_query)},
            "/admin/api/usage/export": {"get": op("usage events", query=(
                "from", "to", "format", "tenant"))},
            "/admin/api/runtime": {"get": op("backend pools")},
            "/admin/api/tokens/revoke": {"post": op("revoke an admin token",
                                                    body="TokenRevoke")},
        },
    }


async def openapi_document(request: Request) -> Response:
    await admin_checked(request)
    return json_response(openapi())


routes = [
    Route("/admin/api/tenants", _guarded(list_tenants), methods=["GET"]),
    Route("/admin/api/tenants", _guarded(create_tenant), methods=["POST"]),
    Route("/admin/api/tenants/{tenant}", _guarded(get_tenant), methods=["GET"]),
    Route("/admin/api/tenants/{tenant}", _guarded(update_tenant), methods=["PATCH"]),
    Route("/admin/api/tenants/{tenant}/keys", _guarded(list_keys), methods=["GET"]),
    Route("/admin/api/tenants/{tenant}/keys", _guarded(create_key), methods=["POST"]),
    Route("/admin/api/keys", _guarded(list_keys), methods=["GET"]),
    Route("/admin/api/keys/{key}/revoke", _guarded(revoke_key), methods=["POST"]),
    Route("/admin/api/usage", _guarded(usage), methods=["GET"]),
    Route("/admin/api/usage/export", _guarded(usage_export), methods=["GET"]),
    Route("/admin/api/runtime", _guarded(runtime), methods=["GET"]),
    Route("/admin/api/tokens/revoke", _guarded(revoke_token), methods=["POST"]),
    Route("/admin/api/openapi.json", _guarded(openapi_document), methods=["GET"]),
]
