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
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StrictInt, field_validator
from sqlalchemy import delete, func, select
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sluice.gateway.db.models import ApiKey, UsageDaily, new_id
from sluice.gateway.economics import PICO_PER_MICRO
from sluice.gateway.economics.budgets import BudgetRule, period_window
from sluice.gateway.economics.config import MAX_PRICE_MICROS, PriceConfig
from sluice.gateway.economics.prices import Price, add_price
from sluice.gateway.economics.tables import Budget
from sluice.gateway.errors import InvalidRequest, NotFound
from sluice.gateway.http.streaming import read_json
from sluice.gateway.routes.admin import actor, admin_checked
from sluice.gateway.routes.openai import parse
from sluice.gateway.util import json_response

MAX_BUDGET_MICROS = 10**15  # a billion currency units: above it, a typo


class BudgetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    key_id: str | None = Field(None, max_length=32)
    period: Literal["day", "month"]
    limit_micros: int = Field(ge=1, le=MAX_BUDGET_MICROS)
    mode: Literal["hard", "soft"] = "hard"
    thresholds: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=lambda: [50, 80, 100], max_length=10)
    webhook_url: AnyHttpUrl | None = None

    @field_validator("webhook_url")
    @classmethod
    def _short(cls, url: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if url is not None and len(str(url)) > 2048:
            raise ValueError("webhook_url longer than 2048 characters")
        return url


class PriceSet(PriceConfig):
    """A price version from the admin API: integers only (no floats, no "1.5")."""

    input: StrictInt = Field(ge=0, le=MAX_PRICE_MICROS)
    output: StrictInt = Field(ge=0, le=MAX_PRICE_MICROS)
    cached_input: StrictInt | None = Field(None, ge=0, le=MAX_PRICE_MICROS)


def _price(p: Price) -> dict[str, Any]:
    return {"model": p.model, "input": p.input, "output": p.output,
            "cached_input": p.cached_input, "effective_from": p.effective_from.isoformat(),
            "unit": "micro-units per million tokens"}


async def list_prices(request: Request) -> Response:
    state = await admin_checked(request)
    table = state.spend.prices
    return json_response({"data": [_price(p) for p in table.current()],
                          "history": {m: [_price(p) for p in table.history(m)]
                                      for m in table.models()}})


async def set_price(request: Request) -> Response:
    state = await admin_checked(request)
    model = request.path_params["model"]
    if state.registry.get(model) is None:
        raise NotFound(f"The model '{model[:128]}' does not exist", param="model",
                       code="model_not_found")
    body = parse(PriceSet, await read_json(request, 65536))
    try:
        price = await add_price(state.db, model, body, source=actor(request))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="effective_from") from None
    state.spend.prices.add(price)
    await state.audit.record(actor(request), "price.set", model, decision="allow",
                             details=_price(price))
    return json_response(_price(price), status=201)


async def _budget_dict(state: Any, row: Any) -> dict[str, Any]:
    rule = BudgetRule.from_row(row)
    label, *_ = period_window(rule.period, dt.datetime.now(dt.UTC))
    spent = await state.spend.budgets.spent(rule, label)
    return {"id": row.id, "tenant_id": row.tenant_id, "key_id": row.key_id,
            "period": row.period, "limit_micros": int(row.limit_micros), "mode": row.mode,
            "thresholds": row.thresholds, "webhook_url": row.webhook_url,
            "current_period": label, "spent_micros": spent}


async def list_budgets(request: Request) -> Response:
    state = await admin_checked(request)
    tenant = await state.accounts.tenant(request.path_params["tenant"])
    async with state.db.connect() as conn:
        rows = (await conn.execute(select(Budget).where(Budget.tenant_id == tenant.id)
                                   .order_by(Budget.created_at))).all()
    return json_response({"data": [await _budget_dict(state, r) for r in rows]})


async def create_budget(request: Request) -> Response:
    state = await admin_checked(request)
    tenant = await state.accounts.tenant(request.path_params["tenant"])
    body = parse(BudgetCreate, await read_json(request, 65536))
    async with state.db.begin() as conn:
        if body.key_id is not None:
            owner = await conn.scalar(select(ApiKey.tenant_id).where(ApiKey.id == body.key_id))
            if owner != tenant.id:
                raise NotFound(f"tenant '{tenant.name}' has no key '{body.key_id}'",
                               param="key_id", code="key_not_found")
        values = {"id": new_id("bud"), "tenant_id": tenant.id,
                  "key_id": body.key_id, "period": body.period,
                  "limit_micros": body.limit_micros, "mode": body.mode,
                  "thresholds": sorted(set(body.thresholds)),
                  "webhook_url": str(body.webhook_url) if body.webhook_url else None,
                  "created_at": dt.datetime.now(dt.UTC)}
        await conn.execute(Budget.__table__.insert().values(**values))
    state.spend.budgets.invalidate(tenant.id)
    await state.audit.record(actor(request), "budget.create", values["id"], decision="allow",
                             details={k: v for k, v in values.items() if k != "created_at"})
    async with state.db.connect() as conn:
        row = (await conn.execute(select(Budget).where(Budget.id == values["id"]))).one()
    return json_response(await _budget_dict(state, row), status=201)


async def delete_budget(request: Request) -> Response:
    state = await admin_checked(request)
    budget_id = request.path_params["budget"][:64]
    async with state.db.begin() as conn:
        tenant_id = await conn.scalar(select(Budget.tenant_id).where(Budget.id == budget_id))
        if tenant_id is None:
            raise NotFound(f"no budget '{budget_id}'", code="budget_not_found")
        await conn.execute(delete(Budget).where(Budget.id == budget_id))
    state.spend.budgets.invalidate(tenant_id)
    await state.audit.record(actor(request), "budget.delete", budget_id, decision="allow",
                             details={"tenant_id": tenant_id})
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
    query = (select(UsageDaily.day, UsageDaily.model, func.sum(UsageDaily.requests),
                    func.sum(UsageDaily.cost_pico))
             .where(UsageDaily.day >= start, UsageDaily.day <= end)
             .group_by(UsageDaily.day, UsageDaily.model)
             .order_by(UsageDaily.day, UsageDaily.model))
    if tenant := q.get("tenant"):
        query = query.where(UsageDaily.tenant_id == (await state.accounts.tenant(tenant)).id)
    async with state.db.connect() as conn:
        rows = (await conn.execute(query)).all()
    return json_response({"from": start.isoformat(), "to": end.isoformat(), "data": [
        {"day": day.isoformat(), "model": model, "requests": int(n),
         "cost_pico": int(cost), "cost_micros": int(cost) // PICO_PER_MICRO}
        for day, model, n, cost in rows]})


routes = [
    Route("/admin/api/prices", list_prices, methods=["GET"]),
    Route("/admin/api/prices/{model:path}", set_price, methods=["POST"]),
    Route("/admin/api/tenants/{tenant}/budgets", list_budgets, methods=["GET"]),
    Route("/admin/api/tenants/{tenant}/budgets", create_budget, methods=["POST"]),
    Route("/admin/api/budgets/{budget}", delete_budget, methods=["DELETE"]),
    Route("/admin/api/spend", spend, methods=["GET"]),
]
