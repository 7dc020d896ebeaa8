"""/admin/api usage, usage export, runtime and admin-token revocation routes."""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from sluice.gateway.accounts.admin_jwt import MAX_ADMIN_TOKEN_TTL_S
from sluice.gateway.accounts.admins import revoke_session
from sluice.gateway.db.accounting import USAGE_GROUPS, usage_by_group
from sluice.gateway.db.models import to_utc
from sluice.gateway.errors import InvalidRequest
from sluice.gateway.http.streaming import read_json
from sluice.gateway.ledger.exports import iter_usage_export
from sluice.gateway.routes.admin_access import actor, admin_checked
from sluice.gateway.routes.openai import parse
from sluice.gateway.util import json_response


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
