"""/admin/api: tenants and keys, the OpenAPI document and the route table, for operators
holding an admin JWT. The gate is routes/admin_access.py; usage, runtime and admin-token
routes are routes/admin_ops.py."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sluice.gateway.accounts.tenants import (
    KeySpec,
    Limit,
    TenantChanges,
    key_dict,
    parse_duration,
    tenant_dict,
)
from sluice.gateway.http.streaming import read_json
from sluice.gateway.pipeline.guard import GuardPolicy
from sluice.gateway.routes.admin_access import actor, admin, admin_checked
from sluice.gateway.routes.admin_access import guarded as _guarded
from sluice.gateway.routes.admin_ops import TokenRevoke, revoke_token, runtime, usage, usage_export
from sluice.gateway.routes.openai import parse
from sluice.gateway.util import json_response

__all__ = ["actor", "admin", "admin_checked", "openapi", "routes"]


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
