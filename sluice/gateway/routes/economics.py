"""/admin/api prices, budgets and spend (issue 20), for operators holding an admin JWT.

    GET    /admin/api/prices                      current price of every model + history
    POST   /admin/api/prices/{model}              a new price version (from now, or later)
    GET    /admin/api/tenants/{tenant}/budgets    a tenant's budgets, with this period's spend
    POST   /admin/api/tenants/{tenant}/budgets    a budget for the tenant or one of its keys
    DELETE /admin/api/budgets/{budget}            remove a budget
    GET    /admin/api/spend                       cost per day and model, from the rollup
"""

from __future__ import annotations

import datetime as dt

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sluice.gateway.economics import manage
from sluice.gateway.economics.reports import cost_by_day
from sluice.gateway.errors import InvalidRequest
from sluice.gateway.http.streaming import read_json
from sluice.gateway.routes.admin import actor, admin_checked
from sluice.gateway.routes.openai import parse
from sluice.gateway.util import json_response


async def list_prices(request: Request) -> Response:
    state = await admin_checked(request)
    table = state.spend.prices
    return json_response({"data": [manage.price_dict(p) for p in table.current()],
                          "history": {m: [manage.price_dict(p) for p in table.history(m)]
                                      for m in table.models()}})


async def set_price(request: Request) -> Response:
    state = await admin_checked(request)
    body = parse(manage.PriceSet, await read_json(request, 65536))
    price = await manage.set_price(state, request.path_params["model"], body, actor(request))
    return json_response(manage.price_dict(price), status=201)


async def list_budgets(request: Request) -> Response:
    state = await admin_checked(request)
    tenant = await state.accounts.tenant(request.path_params["tenant"])
    return json_response({"data": await manage.list_budgets(state, tenant.id)})


async def create_budget(request: Request) -> Response:
    state = await admin_checked(request)
    tenant = await state.accounts.tenant(request.path_params["tenant"])
    body = parse(manage.BudgetCreate, await read_json(request, 65536))
    return json_response(await manage.create_budget(state, tenant.id, body, actor(request)),
                         status=201)


async def delete_budget(request: Request) -> Response:
    state = await admin_checked(request)
    await manage.delete_budget(state, request.path_params["budget"], actor(request))
    return Response(status_code=204)


def _day(value: str | None, default: dt.date, name: str) -> dt.date:
    if not value:
        return default
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"invalid date '{value[:32]}' (use YYYY-MM-DD)", param=name) from None


async def spend(request: Request) -> Response:
    """Cost per day and model (micro-units, rounded down; exact pico-units beside)."""
    state = await admin_checked(request)
    q = request.query_params
    today = dt.datetime.now(dt.UTC).date()
    start = _day(q.get("from"), today - dt.timedelta(days=30), "from")
    end = _day(q.get("to"), today, "to")
    tenant_id = (await state.accounts.tenant(q["tenant"])).id if q.get("tenant") else None
    rows = await cost_by_day(state.db, start, end, tenant_id)
    return json_response({"from": start.isoformat(), "to": end.isoformat(), "data": rows})


routes = [
    Route("/admin/api/prices", list_prices, methods=["GET"]),
    Route("/admin/api/prices/{model:path}", set_price, methods=["POST"]),
    Route("/admin/api/tenants/{tenant}/budgets", list_budgets, methods=["GET"]),
    Route("/admin/api/tenants/{tenant}/budgets", create_budget, methods=["POST"]),
    Route("/admin/api/budgets/{budget}", delete_budget, methods=["DELETE"]),
    Route("/admin/api/spend", spend, methods=["GET"]),
]
